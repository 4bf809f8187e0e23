"""One rank's share of the model and its KV cache: runs a microbatch given its descriptor.

`forward` never waits on the host: inputs cross in one non-blocking copy, busy time is measured
with CUDA events read later, and the last stage's tokens leave as device tensors plus pinned host
copies with an event that says when those are filled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pipeserve.config import EngineConfig
from pipeserve.model.attention import BackendSpec, create_backend, resolve_backend_name
from pipeserve.model.config import ModelConfig, parse_dtype
from pipeserve.model.forward_batch import ForwardBatch, to_device
from pipeserve.model.llama import VisualRows
from pipeserve.model.loader import load_weights
from pipeserve.model.parallel import ParallelContext
from pipeserve.model.registry import build_stage_model
from pipeserve.runner.busy import BusyClock
from pipeserve.runner.kv_cache import KVPool, ReqToToken, TokenPool
from pipeserve.runner.memory import reserved_bytes
from pipeserve.runner.sample_step import SampledTokens, sample_step
from pipeserve.runner.visual import VisualStore
from pipeserve.scheduler.descriptor import BatchDescriptor

logger = logging.getLogger("pipeserve.runner")


class ModelRunner:
    def __init__(
        self,
        cfg: EngineConfig,
        model_cfg: ModelConfig,
        ctx: ParallelContext,
        device: torch.device,
        progress: Callable[[str], None] | None = None,
        eos_ids: set[int] | None = None,  # needed on the last stage
    ) -> None:
        self.cfg, self.model_cfg, self.ctx, self.device = cfg, model_cfg, ctx, device
        self.dtype = parse_dtype(cfg.dtype)
        if device.type == "cuda":
            # NOTE: cuDNN attention builds a plan per new shape; the key length grows every decode
            # step, so it would plan on every call. Flash and memory-efficient kernels do not.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.context_length = cfg.context_length or model_cfg.max_position_embeddings
        self.model = build_stage_model(model_cfg, ctx, self.dtype, device, cfg.pp_layer_partition)
        if ctx.pp_size > 1 and ctx.tp_rank == 0:
            logger.info(
                "stage %d of %d: layers %d-%d of %d%s",
                ctx.pp_rank,
                ctx.pp_size,
                self.model.start,
                self.model.end - 1,
                model_cfg.num_layers,
                " and the lm_head" if ctx.is_last_stage else "",
            )
        load_weights(self.model, cfg.model_path, progress)
        if device.type == "cuda":
            self.model.rotary.build_table(self.context_length + 1, self.dtype)
        self.kv: KVPool | None = None
        self.table = ReqToToken(cfg.max_running_requests, self.context_length, device)
        needs_tokens = ctx.is_first_stage or ctx.is_last_stage
        self.tokens = (
            TokenPool(cfg.max_running_requests, self.context_length, device)
            if needs_tokens
            else None
        )
        # stage 0 of a vision-language model: the images encoded and not yet consumed
        self.visual_store = (
            VisualStore(self.model, device, cfg.deterministic)
            if self.model.visual is not None
            else None
        )
        self.backend_name = resolve_backend_name(
            cfg.attention_backend, device.type, cfg.deterministic
        )
        self.backend = None
        self.graphs = None
        self.busy = BusyClock(device)
        self.eos_ids: torch.Tensor | None = None  # last stage: EOS ids, for min_new_tokens
        if ctx.is_last_stage and eos_ids:
            eos = sorted(e for e in eos_ids if e < model_cfg.vocab_size)
            self.eos_ids = torch.tensor(eos, dtype=torch.int64, device=device)

    # ---- KV sizing ---------------------------------------------------------------------------------
    @property
    def bytes_per_slot(self) -> int:
        attn = self.model.layers[0].self_attn
        return KVPool.bytes_per_slot(
            len(self.model.layers), attn.kv_heads, attn.head_dim, self.dtype
        )

    def affordable_slots(self) -> int:
        """KV slots this rank can hold within its budget (the world then agrees on the minimum).
        On CUDA the budget leaves room for activations, sampling and CUDA graphs."""
        if self.cfg.max_total_tokens is not None:
            return self.cfg.max_total_tokens
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = reserved_bytes(self.cfg, self.model_cfg, self.ctx, self.dtype)
            budget = min(free - total * (1.0 - self.cfg.mem_fraction_static), free - reserve)
            logger.info(
                "KV budget %.2f GiB (free %.2f GiB, %.2f GiB kept for activations and graphs)",
                budget / 2**30,
                free / 2**30,
                max(reserve, total * (1.0 - self.cfg.mem_fraction_static)) / 2**30,
            )
        else:
            budget = self.cfg.kv_cache_bytes
        ceiling = self.cfg.max_running_requests * self.context_length
        return max(2, min(int(budget // self.bytes_per_slot), ceiling))

    def allocate_kv(self, num_slots: int) -> None:
        attn = self.model.layers[0].self_attn
        self.kv = KVPool(
            len(self.model.layers), num_slots, attn.kv_heads, attn.head_dim, self.dtype, self.device
        )
        spec = BackendSpec(
            attn.heads, attn.kv_heads, attn.head_dim, self.cfg.micro_batch_cap, self.device
        )
        self.backend = create_backend(self.backend_name, spec, self.table.slots)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """CUDA: one prefill per length class on the pad row (it writes only the pad slot), so
        that Triton compiles and tunes its kernels at start-up, not inside the first requests
        (one token: the one-row projections, which graphs-off decodes use)."""
        if self.device.type != "cuda":
            return
        for n in (1, 8, 100, 600):
            n = min(n, self.context_length - 1)
            fb = ForwardBatch.build([self.table.pad_row], [0], [n], [0] * n, self.device)
            hidden = None
            if not self.ctx.is_first_stage:
                hidden = torch.zeros(
                    n, self.model_cfg.hidden_size, dtype=self.dtype, device=self.device
                )
            self.run_model(fb, hidden, None if hidden is None else torch.zeros_like(hidden))
        torch.cuda.synchronize(self.device)

    def capture_graphs(self) -> None:
        """CUDA graphs of decode microbatches, when the device, backend and config allow them."""
        if self.device.type != "cuda" or self.cfg.disable_cuda_graph:
            return
        if not self.backend.supports_cuda_graph:
            logger.info(
                "CUDA graphs off: the %s attention backend cannot run in them", self.backend_name
            )
            return
        from pipeserve.runner.cuda_graphs import CudaGraphRunner

        max_bs = min(self.cfg.cuda_graph_max_bs, self.cfg.micro_batch_cap)
        self.graphs = CudaGraphRunner(self, max_bs)
        self.graphs.capture()

    # ---- forward -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, desc: BatchDescriptor, proxy: dict | None) -> dict | SampledTokens:
        """First and middle stages return {"hidden_states", "residual"}; the last stage returns the
        tokens sampled by the requests that sample this step."""
        with self.busy.measure():
            return self._forward(desc, proxy)

    def _forward(self, desc: BatchDescriptor, proxy: dict | None) -> dict | SampledTokens:
        if self.tokens is not None:
            self.tokens.fill(*desc.fill_parts())
        self.table.fill(*desc.prefix_parts())  # cached prefixes' KV, on every stage
        hidden_in = residual_in = None
        if proxy is not None:
            hidden_in, residual_in = proxy["hidden_states"], proxy["residual"]
        visual = self._visual_rows(desc, proxy)
        replayed = self.graphs is not None and self.graphs.can_run(desc)
        if replayed:
            out = self.graphs.replay(desc, hidden_in, residual_in)
        else:
            args = (desc.ints("req_pool_idx"), desc.ints("prefix_len"), desc.ints("extend_len"))
            fb = ForwardBatch.build(
                *args, desc.out_slots, self.device, rope_delta=desc.ints("rope_delta")
            )
            if len(desc.mrope):
                fb.mrope_positions = to_device(desc.mrope, self.device).view(3, -1)
            rows = None  # every row samples: a decode batch whose requests all sample
            if self.ctx.is_last_stage and not (fb.is_decode and desc.sampled().all()):
                rows = to_device(desc.sample_rows(), self.device)
            out = self.run_model(fb, hidden_in, residual_in, rows, visual)
        if not self.ctx.is_last_stage:
            hidden, residual = out
            proxy_out = {"hidden_states": hidden, "residual": residual}
            later = self.model.end < self.model.num_deepstack  # a later stage adds DeepStack
            if later and visual is not None and visual.deepstack is not None:
                proxy_out["deepstack"] = visual.deepstack
            return proxy_out
        logits = out[: int(desc.sampled().sum())]
        # the sampled tokens' token-pool places: on the device already after a replay
        places = self.graphs.sample_places(desc.num_reqs) if replayed else None
        return sample_step(self, desc, logits, places)

    def _visual_rows(self, desc: BatchDescriptor, proxy: dict | None) -> VisualRows | None:
        """The step's image tokens: stage 0 encodes the step's images and takes their embeddings;
        a later stage takes the DeepStack features that came with the proxy."""
        if self.visual_store is not None:
            self.visual_store.forget_rows(desc.fill_parts()[0])
            self.visual_store.encode(desc)
            return self.visual_store.rows_of(desc)
        if proxy is not None and "deepstack" in proxy:
            rows = to_device(desc.visual_parts()[0], self.device)
            return VisualRows(rows, deepstack=proxy["deepstack"])
        return None

    def run_model(
        self,
        fb: ForwardBatch,
        hidden: torch.Tensor | None,
        residual: torch.Tensor | None,
        sample_rows: torch.Tensor | None = None,
        visual: VisualRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """The stage's layers on one batch (the body CUDA graphs capture): the slot table update,
        stage 0's input ids from the token pool, the layers, and on the last stage the logits of
        `sample_rows` (None: every row)."""
        self.table.write(fb)
        if fb.attn is None:
            self.backend.prepare_metadata(fb)
        input_ids = None
        if self.ctx.is_first_stage:
            input_ids = self.tokens.read(fb.token_rows, fb.positions)
        hidden, residual = self.model(
            fb, self.kv.layers, self.backend, input_ids, hidden, residual, visual
        )
        if not self.ctx.is_last_stage:
            return hidden, residual
        if sample_rows is not None:
            hidden, residual = hidden[sample_rows], residual[sample_rows]
        return self.model.compute_logits(hidden, residual)
