"""The tensor-dict point-to-point layer and the process groups of a PP x TP grid."""

from pipeserve.distributed.coordinator import GroupCoordinator, TransferStats
from pipeserve.distributed.inbox import MessageWork
from pipeserve.distributed.parallel_state import (
    DistConfig,
    ParallelState,
    destroy_distributed,
    get_parallel_config,
    get_pp_group,
    get_tp_group,
    get_world_group,
    init_distributed,
    is_initialized,
)
from pipeserve.distributed.wire import (
    Channel,
    Limits,
    ProtocolError,
    TensorMeta,
    proxy_message_bytes,
)
from pipeserve.distributed.work import P2PError, P2PTimeoutError, P2PWork

__all__ = [
    "Channel",
    "DistConfig",
    "GroupCoordinator",
    "Limits",
    "MessageWork",
    "P2PError",
    "P2PTimeoutError",
    "P2PWork",
    "ParallelState",
    "ProtocolError",
    "TensorMeta",
    "TransferStats",
    "destroy_distributed",
    "get_parallel_config",
    "get_pp_group",
    "get_tp_group",
    "get_world_group",
    "init_distributed",
    "is_initialized",
    "proxy_message_bytes",
]
