"""The engine's configuration: one frozen dataclass, "auto" values resolved before it is frozen."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeserve.env import Env

if TYPE_CHECKING:
    from pipeserve.ipc.sockets import IpcAddresses

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "data", "default_model")
DETERMINISTIC_TORCH_ON_CUDA = (
    "--deterministic on CUDA needs the triton attention backend (its torch variant relies on "
    "cuBLAS, whose reductions may follow the batch); use --attention-backend triton or auto"
)
DEFAULT_VL_MODEL_DIR = os.path.join(os.path.dirname(__file__), "data", "default_vl")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped in the package: its directory and the name the API serves it under."""

    path: str
    served_name: str


# --model-path names of the embedded models (a name, not a directory: it wins over a relative
# directory of that name, which "./default" still reaches); no model path means "default"
EMBEDDED_MODELS = {
    "default": EmbeddedModel(DEFAULT_MODEL_DIR, "pipeserve-default"),
    "default-vl": EmbeddedModel(DEFAULT_VL_MODEL_DIR, "pipeserve-default-vl"),
}


def model_name(model_path: str) -> str:
    """The name a resolved model path is served under: an embedded model's, else the directory's."""
    path = model_path.rstrip("/")
    for model in EMBEDDED_MODELS.values():
        if path == model.path:
            return model.served_name
    return os.path.basename(path)


@dataclass(frozen=True)
class EngineConfig:
    model_path: str = DEFAULT_MODEL_DIR
    tokenizer_path: str | None = None  # None: the model directory
    skip_tokenizer_init: bool = False  # no tokenizer: token ids in, token ids out
    # a vision-language model's images, checked by the front ends (frontend/image_sources.py)
    max_images_per_request: int = 8
    max_image_pixels: int = 4096 * 4096  # decoded width * height of one image, before resizing
    allow_image_fetch: bool = False  # http(s) image URLs are fetched (else refused)
    tp_size: int = 1
    pp_size: int = 1
    device: str = "auto"  # "cpu", "cuda" or "auto" (cuda when available)
    dtype: str = "auto"  # "float32", "bfloat16", "float16" or "auto" (checkpoint's; float32 on CPU)
    context_length: int | None = None  # None: the model's max_position_embeddings
    max_running_requests: int = 256
    max_total_tokens: int | None = None  # KV slots; None: sized from the memory budget
    mem_fraction_static: float = 0.85  # CUDA: share of GPU memory for weights + KV cache
    kv_cache_bytes: int = 2 << 30  # CPU: KV cache budget per rank
    # tokens per microbatch (prefill chunks + decodes); None: 8192 on CUDA, 1024 on CPU
    chunked_prefill_size: int | None = None
    pp_async_batch_depth: int = 0  # microbatches in flight beyond pp_size
    pp_max_micro_batch_size: int | None = None  # requests per microbatch; None: max_running // pp
    pp_comm_mode: str = "async"  # "async", or "sync": the tensor-by-tensor baseline for benchmarks
    pp_layer_partition: str | None = None  # "a,b,...": layers per stage
    attention_backend: str = "auto"  # "torch", "triton" or "auto" (triton on CUDA, torch on CPU)
    cuda_graph_max_bs: int = 512  # decode microbatches up to this size replay CUDA graphs
    disable_cuda_graph: bool = False
    disable_radix_cache: bool = False  # stage 0's prefix cache (SGLang's RadixAttention) off
    # batch-invariant kernels: a request's tokens and logprobs do not depend on its batch, the
    # pipeline size or prefill chunking (the tensor-parallel size excepted)
    deterministic: bool = False
    pp_trace: str | None = None  # write a Chrome/Perfetto trace of the pipeline to this path
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # "host:port" of rank 0; None: a free port on 127.0.0.1
    cpu_threads: int | None = None  # torch threads per rank on CPU; None: usable cores // ranks
    p2p_timeout_s: float = 60.0
    ready_timeout_s: float = 1800.0  # for every rank to load its weights and report ready
    keepalive_s: float = 5.0  # an idle pipeline sends an empty microbatch this often
    log_level: str = "info"

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def num_microbatches(self) -> int:
        return self.pp_size + self.pp_async_batch_depth

    @property
    def micro_batch_cap(self) -> int:
        if self.pp_max_micro_batch_size is not None:
            return self.pp_max_micro_batch_size
        return max(1, self.max_running_requests // self.pp_size)

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def resolve_config(**kwargs: Any) -> EngineConfig:
    """Builds an EngineConfig from keyword arguments, validating them and resolving every "auto"."""
    unknown = set(kwargs) - {f.name for f in dataclasses.fields(EngineConfig)}
    if unknown:
        raise TypeError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
    if kwargs.get("pp_trace") is None:
        kwargs["pp_trace"] = Env.read().trace
    cfg = EngineConfig(**{k: v for k, v in kwargs.items() if v is not None or k == "model_path"})
    embedded = EMBEDDED_MODELS.get(cfg.model_path or "default")
    if embedded is not None:
        cfg = cfg.replace(model_path=embedded.path)
    _validate(cfg)
    _validate_model(cfg)
    _check_dist_init_addr(cfg.dist_init_addr)
    device = _resolve_device(cfg.device)
    check_devices(cfg, device, visible_gpus() if device == "cuda" else 0)
    if cfg.deterministic and device == "cuda" and cfg.attention_backend == "torch":
        raise ValueError(DETERMINISTIC_TORCH_ON_CUDA)
    chunk = cfg.chunked_prefill_size or (8192 if device == "cuda" else 1024)
    return cfg.replace(device=device, dtype=_resolve_dtype(cfg, device), chunked_prefill_size=chunk)


def _validate(cfg: EngineConfig) -> None:
    checks = [
        (cfg.tp_size >= 1, "tp_size must be >= 1"),
        (cfg.pp_size >= 1, "pp_size must be >= 1"),
        (cfg.max_running_requests >= 1, "max_running_requests must be >= 1"),
        (
            cfg.chunked_prefill_size is None or cfg.chunked_prefill_size >= 1,
            "chunked_prefill_size must be >= 1",
        ),
        (cfg.pp_async_batch_depth >= 0, "pp_async_batch_depth must be >= 0"),
        (
            cfg.pp_max_micro_batch_size is None or cfg.pp_max_micro_batch_size >= 1,
            "pp_max_micro_batch_size must be >= 1",
        ),
        (
            cfg.pp_comm_mode in ("async", "sync"),
            f"pp_comm_mode must be 'async' or 'sync', got {cfg.pp_comm_mode!r}",
        ),
        (
            cfg.device in ("auto", "cpu", "cuda"),
            f"device must be 'auto', 'cpu' or 'cuda', got {cfg.device!r}",
        ),
        (0.0 < cfg.mem_fraction_static < 1.0, "mem_fraction_static must be in (0, 1)"),
        (cfg.nnodes >= 1 and 0 <= cfg.node_rank < cfg.nnodes, "node_rank must be in [0, nnodes)"),
        (cfg.world_size % cfg.nnodes == 0, "tp_size * pp_size must be divisible by nnodes"),
        (cfg.context_length is None or cfg.context_length >= 2, "context_length must be >= 2"),
        (
            cfg.max_total_tokens is None or cfg.max_total_tokens >= 2,
            "max_total_tokens must be >= 2",
        ),
        (cfg.p2p_timeout_s > 0 and cfg.keepalive_s > 0, "timeouts must be positive"),
        (
            cfg.attention_backend in ("auto", "torch", "triton"),
            f"attention_backend must be 'auto', 'torch' or 'triton', got {cfg.attention_backend!r}",
        ),
        (cfg.cuda_graph_max_bs >= 1, "cuda_graph_max_bs must be >= 1"),
        (cfg.max_images_per_request >= 0, "max_images_per_request must be >= 0"),
        (cfg.max_image_pixels >= 1, "max_image_pixels must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if not os.path.isdir(cfg.model_path):
        raise FileNotFoundError(f"model path {cfg.model_path!r} is not a directory")


def _validate_model(cfg: EngineConfig) -> None:
    """The model against the parallel sizes, checked before any rank starts (a rank would find a
    mismatch only after start-up): tensor parallelism splits the attention heads, the KV heads and
    the MLP's intermediate size (the vocabulary is padded); every stage needs a layer."""
    from pipeserve.model.config import ModelConfig, stage_layers

    model = ModelConfig.from_dir(cfg.model_path)
    for what, size in (
        ("num_attention_heads", model.num_heads),
        ("num_key_value_heads", model.num_kv_heads),
        ("intermediate_size", model.intermediate_size),
    ):
        if size % cfg.tp_size:
            raise ValueError(
                f"tp_size {cfg.tp_size} does not divide the model's {what} ({size}); "
                "choose a tp_size that divides it"
            )
    stage_layers(model, cfg.pp_size, cfg.pp_layer_partition)
    if cfg.context_length is not None and cfg.context_length > model.max_position_embeddings:
        raise ValueError(
            f"context_length (--context-length) {cfg.context_length} is above the model's "
            f"max_position_embeddings ({model.max_position_embeddings})"
        )


def visible_gpus() -> int:
    """CUDA devices this process may use (after CUDA_VISIBLE_DEVICES); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_devices(cfg: EngineConfig, device: str, gpus: int) -> None:
    """On CUDA, every rank of this node needs a GPU of its own (`gpus`: those visible here)."""
    if device != "cuda":
        return
    if gpus == 0:
        raise ValueError(
            f"device (--device) {cfg.device!r} needs CUDA; this host has no CUDA device that "
            "torch can use (torch.cuda.is_available() is False); use --device cpu"
        )
    if cfg.ranks_per_node > gpus:
        raise ValueError(
            f"--pp-size {cfg.pp_size} x --tp-size {cfg.tp_size} over --nnodes {cfg.nnodes} puts "
            f"{cfg.ranks_per_node} ranks on this node, one GPU each (--device cuda); this host "
            f"has {gpus} visible GPU(s)"
        )


def _check_dist_init_addr(addr: str | None) -> None:
    """`host:port` (an IPv6 host in brackets), the host resolvable from here."""
    if addr is None:
        return
    host, _, port = addr.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"dist_init_addr (--dist-init-addr) {addr!r} is not host:port")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError as e:
        raise ValueError(
            f"dist_init_addr (--dist-init-addr) {addr!r}: cannot resolve host {host!r} "
            f"({e.strerror or e})"
        ) from None


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    if not _torch_built_for_gpus():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_built_for_gpus() -> bool:
    """Whether the installed torch is a CUDA (or ROCm) build, read from its version file: on a CPU
    build "auto" is "cpu" without the seconds that importing torch takes."""
    spec = importlib.util.find_spec("torch")
    try:
        with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
            lines = f.read().splitlines()
    except (AttributeError, TypeError, OSError):  # no such file: let torch answer
        return True
    builds = {}  # "cuda" / "hip": the version it was built for, "None" if not
    for line in lines:
        found = re.match(r"(cuda|hip)\b[^=]*=(.*)$", line)
        if found:
            builds[found.group(1)] = found.group(2).strip()
    return builds.get("cuda") != "None" or builds.get("hip", "None") != "None"


def _resolve_dtype(cfg: EngineConfig, device: str) -> str:
    from pipeserve.model.config import ModelConfig, dtype_name

    if cfg.dtype != "auto":
        return dtype_name(cfg.dtype)
    if device == "cpu":
        return "float32"
    return ModelConfig.from_dir(cfg.model_path).dtype


@dataclass(frozen=True)
class RankSpec:
    """What one rank process is told when it is spawned, besides the EngineConfig."""

    rank: int
    local_rank: int
    dist_init: str  # tcp://host:port of rank 0's rendezvous
    ipc: IpcAddresses
    threads: int
