"""One rank's share of the model and its KV cache: runs a microbatch given its descriptor."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pipeserve.config import EngineConfig
from pipeserve.engine.batch import FLOAT_COL, INT_COL, BatchDescriptor
from pipeserve.engine.kv_cache import KVPool, ReqToToken
from pipeserve.engine.sampler import SamplingBatch, TokenHistory, sample
from pipeserve.model.attention import build_attention_batch
from pipeserve.model.config import ModelConfig, parse_dtype
from pipeserve.model.loader import load_weights
from pipeserve.model.parallel import ParallelContext
from pipeserve.model.registry import build_stage_model


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
        load_weights(self.model, cfg.model_path, progress)
        self.kv: KVPool | None = None
        self.table = ReqToToken(
            cfg.max_running_requests, self.context_length, device, keep_token_ids=ctx.is_last_stage
        )
        self.busy_s = 0.0  # wall time spent in forward passes
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
        """KV slots this rank can hold within its budget (the world then agrees on the minimum)."""
        if self.cfg.max_total_tokens is not None:
            return self.cfg.max_total_tokens
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1.0 - self.cfg.mem_fraction_static)
        else:
            budget = self.cfg.kv_cache_bytes
        ceiling = self.cfg.max_running_requests * self.context_length
        return max(2, min(int(budget // self.bytes_per_slot), ceiling))

    def allocate_kv(self, num_slots: int) -> None:
        attn = self.model.layers[0].self_attn
        self.kv = KVPool(
            len(self.model.layers), num_slots, attn.kv_heads, attn.head_dim, self.dtype, self.device
        )

    # ---- forward -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, desc: BatchDescriptor, proxy: dict | None) -> dict:
        """First and middle stages return {"hidden_states", "residual"}; the last stage returns the
        sampled tokens ({"next_token_ids", ...}) of the requests that sample this step."""
        start = time.perf_counter()
        out = self._forward(desc, proxy)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.busy_s += time.perf_counter() - start
        return out

    def _forward(self, desc: BatchDescriptor, proxy: dict | None) -> dict:
        pool_idx = desc.ints("req_pool_idx").tolist()
        prefix, extend = desc.ints("prefix_len").tolist(), desc.ints("extend_len").tolist()
        self.table.write(pool_idx, prefix, extend, desc.out_slots, desc.input_ids)
        attn = build_attention_batch(
            self.table.slots, pool_idx, prefix, extend, desc.out_slots, self.device
        )
        if self.ctx.is_first_stage:
            hidden, residual = self.model(
                attn, self.kv.layers, input_ids=desc.input_ids.to(self.device)
            )
        else:
            hidden, residual = self.model(
                attn, self.kv.layers, hidden=proxy["hidden_states"], residual=proxy["residual"]
            )
        if not self.ctx.is_last_stage:
            return {"hidden_states": hidden, "residual": residual}
        rows = desc.sample_rows().to(self.device)
        logits = self.model.compute_logits(hidden[rows], residual[rows])
        return self._sample(desc, logits)

    def _sample(self, desc: BatchDescriptor, logits: torch.Tensor) -> dict:
        picked = desc.ints("sample").bool()
        ints = desc.req_ints[picked]
        floats = desc.req_floats[picked]
        batch = sampling_batch(ints, floats, self.device)
        batch.eos_ids = self.eos_ids
        if bool(
            (batch.repetition_penalty != 1).any()
            or (batch.frequency_penalty != 0).any()
            or (batch.presence_penalty != 0).any()
        ):
            batch.history = self._history(ints)
        result = sample(logits, batch)
        tokens = {"next_token_ids": result.next_token_ids.cpu()}
        if result.logprobs is not None:
            tokens["logprobs"] = result.logprobs.cpu()
        if result.top_logprob_ids is not None:
            tokens["top_logprob_ids"] = result.top_logprob_ids.cpu()
            tokens["top_logprobs"] = result.top_logprobs.cpu()
        return tokens

    def _history(self, ints: torch.Tensor) -> TokenHistory:
        """Every token of the sampled requests so far, from the last stage's token-id table."""
        ids, rows, is_out = [], [], []
        cols = [INT_COL[c] for c in ("req_pool_idx", "prefix_len", "extend_len", "prompt_len")]
        for i, (req, prefix, n, prompt_len) in enumerate(ints[:, cols].tolist()):
            seq = self.table.token_ids[req, : prefix + n]
            ids.append(seq)
            rows.append(torch.full_like(seq, i))
            is_out.append(torch.arange(prefix + n) >= prompt_len)
        cat = lambda xs: torch.cat(xs).to(self.device)  # noqa: E731
        return TokenHistory(cat(ids), cat(rows), cat(is_out))


def sampling_batch(ints: torch.Tensor, floats: torch.Tensor, device: torch.device) -> SamplingBatch:
    """The sampled rows' per-request columns (see batch.REQ_*_COLUMNS) as a SamplingBatch."""
    ints, floats = ints.to(device), floats.to(device)
    f = {name: floats[:, i] for name, i in FLOAT_COL.items()}
    return SamplingBatch(
        temperature=f["temperature"],
        top_p=f["top_p"],
        top_k=f["top_k"].to(torch.int64),
        min_p=f["min_p"],
        repetition_penalty=f["repetition_penalty"],
        frequency_penalty=f["frequency_penalty"],
        presence_penalty=f["presence_penalty"],
        seed=ints[:, INT_COL["seed"]],
        step=ints[:, INT_COL["step"]],
        top_logprobs_num=ints[:, INT_COL["top_logprobs_num"]],
        return_logprob=ints[:, INT_COL["return_logprob"]].bool(),
        ban_eos=ints[:, INT_COL["ban_eos"]].bool(),
    )
