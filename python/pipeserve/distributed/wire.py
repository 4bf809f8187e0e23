"""Wire format of the tensor-dict protocol: channels, message kinds and the header codec.

A message is one header frame on the channel's header tag (frame.py), then, on the data tag, a
header tail when the encoded header did not fit in a frame, then every non-empty tensor that is not
inline, in dict order. Headers and object messages are pickles of builtin values only, decoded by an
unpickler that refuses every class; a decoded header is checked against `Limits` before any buffer
is allocated for it.
"""

from __future__ import annotations

import enum
import io
import math
import pickle
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch


class Channel(enum.IntEnum):
    """Logical streams that may share one peer pair; each owns its own pair of tags. SGLANG is
    SGLang's own wire (sglang_wire.py): everything on tag 0, as SGLang's GroupCoordinator sends it."""

    OBJECT = 1
    PROXY = 2
    TOKENS = 3
    REQUESTS = 4
    CONTROL = 5
    SGLANG = 6

    @property
    def header_tag(self) -> int:
        return 0 if self is Channel.SGLANG else 2 * int(self)

    @property
    def data_tag(self) -> int:
        return 0 if self is Channel.SGLANG else 2 * int(self) + 1


class MessageKind(enum.IntEnum):
    TENSOR_DICT = 1
    OBJECT = 2


SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}
_DTYPE_NAMES = {dtype: name for name, dtype in SUPPORTED_DTYPES.items()}
# exact types: a subclass (an IntEnum, a namedtuple, numpy's float64) pickles as a class reference,
# which the receiver's unpickler refuses
_PLAIN_SCALARS = frozenset({str, int, float, bool, type(None)})
_SEQUENCES = frozenset({list, tuple})
DEVICE_TYPES = ("cpu", "cuda")
MAX_DIMS = 16
DEFAULT_MAX_MESSAGE_BYTES = 4 << 30  # tensor bytes a header may declare, unless configured
MAX_HEADER_BYTES = 16 << 20  # encoded header or object bytes


class ProtocolError(RuntimeError):
    """A header that cannot be decoded or does not match what the receiver expects."""


class TensorMeta(NamedTuple):
    device_type: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts from a header before allocating anything. Size `max_message_bytes`
    from the largest message the model sends (`proxy_message_bytes`), with room to spare."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # all tensors of one message together
    max_header_bytes: int = MAX_HEADER_BYTES


def proxy_message_bytes(
    max_tokens: int, hidden_size: int, dtype: torch.dtype, num_tensors: int = 2
) -> int:
    """Bytes of a PP proxy message of `num_tensors` tensors of shape [max_tokens, hidden_size]."""
    return max_tokens * hidden_size * dtype.itemsize * num_tensors


class HeaderEntry(NamedTuple):
    """One key of a tensor dict: a tensor's meta (and whether it is TP-split) or a plain value.
    (TensorMeta and HeaderEntry are named tuples: every message builds one per key on each side.)"""

    key: str
    meta: TensorMeta | None
    split: bool = False  # only row `tp_rank` of `flat.view(tp, -1)` travels
    inline: bool = False  # the bytes ride in the header frame
    value: Any = None


def check_plain(key: str, value: Any) -> None:
    """Raises TypeError unless `value` can ride in the header."""
    if type(value) in _PLAIN_SCALARS:
        return
    if type(value) in _SEQUENCES:
        for item in value:
            check_plain(key, item)
        return
    raise TypeError(
        f"value of key {key!r} has type {type(value).__name__}: a tensor dict carries tensors and "
        "plain values (str, int, float, bool, None, lists/tuples of those)"
    )


def check_object(value: Any, where: str = "object") -> None:
    """Raises TypeError unless `value` is built of plain values and dicts (what `loads_plain` reads)."""
    if type(value) is dict:
        for k, v in value.items():
            check_object(k, f"{where} key")
            check_object(v, f"{where}[{k!r}]")
    elif type(value) in _SEQUENCES:
        for i, item in enumerate(value):
            check_object(item, f"{where}[{i}]")
    elif type(value) not in _PLAIN_SCALARS:
        raise TypeError(
            f"{where} has type {type(value).__name__}: objects on the wire are built of str, int, "
            "float, bool, None, lists, tuples and dicts"
        )


def tensor_meta(key: str, tensor: torch.Tensor) -> TensorMeta:
    if tensor.dtype not in _DTYPE_NAMES:
        raise TypeError(f"tensor {key!r} has unsupported dtype {tensor.dtype}")
    return TensorMeta(tensor.device.type, tensor.dtype, tuple(tensor.shape))


def encode_entries(entries: list[HeaderEntry]) -> bytes:
    rows = []
    for e in entries:
        if e.meta is None:
            rows.append(("v", e.key, e.value))
        else:
            m = e.meta
            rows.append(
                ("t", e.key, m.device_type, _DTYPE_NAMES[m.dtype], m.shape, e.split, e.inline)
            )
    return pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)


class PlainUnpickler(pickle.Unpickler):
    """Decodes only builtin containers and scalars: a header can never build an arbitrary object."""

    def find_class(self, module: str, name: str) -> Any:
        raise ProtocolError(f"header refers to {module}.{name}; only plain values are allowed")


def loads_plain(data: bytes) -> Any:
    """Unpickles builtin containers and scalars only."""
    return PlainUnpickler(io.BytesIO(data)).load()


def decode_entries(payload: bytes, limits: Limits) -> list[HeaderEntry]:
    """Decodes a tensor-dict header; raises ProtocolError for anything the layer would not send."""
    rows = loads_plain(payload)
    if not isinstance(rows, list):
        raise ProtocolError(f"a header is a list of rows, got {type(rows).__name__}")
    entries, keys, total = [], set(), 0
    for row in rows:
        e = _decode_row(row)
        if e.key in keys:
            raise ProtocolError(f"a header lists key {e.key!r} twice")
        keys.add(e.key)
        total += 0 if e.meta is None else e.meta.nbytes
        entries.append(e)
    if total > limits.max_message_bytes:
        raise ProtocolError(
            f"header declares {total} tensor bytes, over the limit of {limits.max_message_bytes} "
            "(max_message_bytes)"
        )
    return entries


def _decode_row(row: Any) -> HeaderEntry:
    if isinstance(row, tuple) and len(row) == 3 and row[0] == "v" and isinstance(row[1], str):
        return HeaderEntry(key=row[1], meta=None, value=row[2])
    if not (isinstance(row, tuple) and len(row) == 7 and row[0] == "t"):
        raise ProtocolError(f"malformed header row {row!r:.80}")
    _, key, device_type, dtype_name, shape, split, inline = row
    if not isinstance(key, str) or device_type not in DEVICE_TYPES:
        raise ProtocolError(f"malformed tensor row {row!r:.80}")
    if dtype_name not in SUPPORTED_DTYPES:
        raise ProtocolError(f"tensor {key!r} has unknown dtype {dtype_name!r}")
    if not (
        isinstance(shape, tuple)
        and len(shape) <= MAX_DIMS
        and all(type(d) is int and d >= 0 for d in shape)
    ):
        raise ProtocolError(f"tensor {key!r} has an impossible shape {shape!r:.80}")
    if type(split) is not bool or type(inline) is not bool or (inline and device_type != "cpu"):
        raise ProtocolError(f"tensor {key!r} has malformed flags split={split!r} inline={inline!r}")
    meta = TensorMeta(device_type, SUPPORTED_DTYPES[dtype_name], shape)
    return HeaderEntry(key=key, meta=meta, split=split, inline=inline)
