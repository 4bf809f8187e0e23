"""Server configuration: the engine's config plus the HTTP side, built once from argparse.

Flag names follow SGLang's where SGLang has one; every default comes from the dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace

from pipeserve.config import EngineConfig, model_name, resolve_config
from pipeserve.utils import usable_cores


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str | None = None  # None: the model directory's name
    max_queued_requests: int | None = None  # None: queue without bound; else 503 beyond it
    max_request_body_bytes: int = 32 << 20  # larger bodies get 413
    # SIGTERM/SIGINT: seconds unfinished requests may take before they end with a 503; below
    # Kubernetes' default 30 s grace, so that they get their answer before a SIGKILL
    shutdown_timeout_s: float = 25.0
    # HTTP front-end processes on the one port (None: from the host's cores, auto_api_servers)
    api_server_count: int | None = None
    stream_interval: int = 1  # tokens per streamed chunk of a choice (the last may be shorter)

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return model_name(self.engine.model_path)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


# (flag, EngineConfig field, type, help)
_ENGINE_FLAGS = [
    (
        "--model-path",
        "model_path",
        str,
        "Hugging Face model directory, or an embedded model: default (text) or default-vl "
        "(vision-language) (default: default)",
    ),
    (
        "--tokenizer-path",
        "tokenizer_path",
        str,
        "tokenizer directory (default: the model directory)",
    ),
    ("--pp-size", "pp_size", int, "pipeline-parallel stages"),
    ("--tp-size", "tp_size", int, "tensor-parallel ranks per stage"),
    ("--device", "device", str, "cpu, cuda or auto"),
    ("--dtype", "dtype", str, "auto, float32, bfloat16 or float16"),
    (
        "--context-length",
        "context_length",
        int,
        "maximum tokens per request (default: the model's)",
    ),
    ("--max-running-requests", "max_running_requests", int, "requests decoded at once"),
    (
        "--max-total-tokens",
        "max_total_tokens",
        int,
        "KV cache slots (default: from the memory budget)",
    ),
    (
        "--mem-fraction-static",
        "mem_fraction_static",
        float,
        "CUDA: share of GPU memory for weights and KV cache",
    ),
    ("--kv-cache-bytes", "kv_cache_bytes", int, "CPU: KV cache bytes per rank"),
    (
        "--chunked-prefill-size",
        "chunked_prefill_size",
        int,
        "tokens per microbatch (None: 8192 on CUDA, 1024 on CPU)",
    ),
    ("--pp-max-micro-batch-size", "pp_max_micro_batch_size", int, "requests per microbatch"),
    (
        "--pp-async-batch-depth",
        "pp_async_batch_depth",
        int,
        "microbatches in flight beyond pp-size",
    ),
    (
        "--pp-comm-mode",
        "pp_comm_mode",
        str,
        "async, or sync (the tensor-by-tensor baseline, for benchmarks)",
    ),
    ("--pp-layer-partition", "pp_layer_partition", str, "layers per stage, e.g. 3,5"),
    (
        "--attention-backend",
        "attention_backend",
        str,
        "auto, torch or triton (auto: triton on CUDA, torch on CPU)",
    ),
    (
        "--cuda-graph-max-bs",
        "cuda_graph_max_bs",
        int,
        "largest decode batch replayed as a CUDA graph",
    ),
    ("--disable-cuda-graph", "disable_cuda_graph", bool, "run decode eagerly on CUDA"),
    (
        "--disable-radix-cache",
        "disable_radix_cache",
        bool,
        "no prefix cache: every prompt is prefilled from scratch",
    ),
    (
        "--deterministic",
        "deterministic",
        bool,
        "batch-invariant kernels: the same tokens and logprobs whatever a request is batched with",
    ),
    ("--pp-trace", "pp_trace", str, "write a Chrome/Perfetto trace of the pipeline to this path"),
    ("--nnodes", "nnodes", int, "nodes taking part"),
    ("--node-rank", "node_rank", int, "this node's index; node 0 serves HTTP"),
    ("--dist-init-addr", "dist_init_addr", str, "host:port of rank 0's rendezvous (multi-node)"),
    ("--cpu-threads", "cpu_threads", int, "torch threads per rank on CPU"),
    (
        "--p2p-timeout",
        "p2p_timeout_s",
        float,
        "seconds a pipeline transfer may take before it is an error",
    ),
    (
        "--ready-timeout",
        "ready_timeout_s",
        float,
        "seconds the ranks may take to load the model and report ready",
    ),
    ("--log-level", "log_level", str, "debug, info, warning or error"),
    ("--skip-tokenizer-init", "skip_tokenizer_init", bool, "no tokenizer: token ids in and out"),
    (
        "--max-images-per-request",
        "max_images_per_request",
        int,
        "vision-language models: images one request may carry (more: 400)",
    ),
    (
        "--max-image-pixels",
        "max_image_pixels",
        int,
        "vision-language models: decoded width x height of one image, before resizing (more: 400)",
    ),
    (
        "--allow-image-fetch",
        "allow_image_fetch",
        bool,
        "fetch http(s) image URLs (bounded in time and size); without it they are a 400",
    ),
]
_SERVER_FLAGS = [
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "port to listen on"),
    ("--served-model-name", "served_model_name", str, "model name the API reports and accepts"),
    (
        "--max-queued-requests",
        "max_queued_requests",
        int,
        "answer 503 beyond this many unfinished requests",
    ),
    (
        "--max-request-body-bytes",
        "max_request_body_bytes",
        int,
        "answer 413 to a larger request body",
    ),
    (
        "--shutdown-timeout",
        "shutdown_timeout_s",
        float,
        "on SIGTERM/SIGINT, seconds unfinished requests may take before they end with a 503",
    ),
    (
        "--api-server-count",
        "api_server_count",
        int,
        "HTTP front-end processes, each tokenizing and streaming its own requests "
        "(default: from the host's cores)",
    ),
    (
        "--stream-interval",
        "stream_interval",
        int,
        "streaming: tokens a choice gathers before its next chunk goes out",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeserve.launch_server", description="pipeserve OpenAI-compatible server"
    )
    engine_defaults, server_defaults = EngineConfig(), ServerConfig()
    for flag, name, typ, text in _ENGINE_FLAGS:
        default = getattr(engine_defaults, name)
        kind = {"action": "store_true"} if typ is bool else {"type": typ}
        parser.add_argument(
            flag, dest=name, default=None, help=f"{text} [default: {default}]", **kind
        )
    for flag, name, typ, text in _SERVER_FLAGS:
        parser.add_argument(
            flag, dest=name, type=typ, default=getattr(server_defaults, name), help=text
        )
    return parser


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """The config of the flags, every value checked (the model against the parallel sizes too)
    before any process starts; a bad one exits with argparse's one-line error."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    engine_kwargs = {
        name: getattr(ns, name) for _, name, _, _ in _ENGINE_FLAGS if getattr(ns, name) is not None
    }
    server_kwargs = {name: getattr(ns, name) for _, name, _, _ in _SERVER_FLAGS}
    try:
        _validate(SimpleNamespace(**server_kwargs))  # first: the engine's checks import torch
        engine = resolve_config(**engine_kwargs)
        cfg = dataclasses.replace(ServerConfig(engine=engine), **server_kwargs)
        if cfg.api_server_count is None:
            cfg = dataclasses.replace(cfg, api_server_count=auto_api_servers(engine))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return cfg


def _validate(cfg: ServerConfig | SimpleNamespace) -> None:
    if not 1 <= cfg.port <= 65535:
        raise ValueError(
            f"--port must be in 1..65535, got {cfg.port} (0, a port the system picks, is not supported)"
        )
    if cfg.max_request_body_bytes < 1:
        raise ValueError("--max-request-body-bytes must be >= 1")
    if cfg.shutdown_timeout_s < 0:
        raise ValueError("--shutdown-timeout must be >= 0")
    if cfg.api_server_count is not None and not 1 <= cfg.api_server_count <= 64:
        raise ValueError("--api-server-count must be in [1, 64]")
    if cfg.stream_interval < 1:
        raise ValueError("--stream-interval must be >= 1")
    if cfg.max_queued_requests is not None and cfg.max_queued_requests < 1:
        raise ValueError("--max-queued-requests must be >= 1")


def auto_api_servers(engine: EngineConfig) -> int:
    """One front end per five cores that this node's ranks leave free, 1 to 8. A front end streams
    about 45k tokens/s on a core; summed CPU per token grows with processes that each take a
    smaller share of every step (one H200, 1B: two front ends streamed as much as five, at 21
    against 31 us per token; docs/benchmarks-log.md, serving run 6)."""
    free = usable_cores() - engine.ranks_per_node
    return max(1, min(8, free // 5))
