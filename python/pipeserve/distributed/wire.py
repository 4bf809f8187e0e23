"""Wire format of the tensor-dict protocol: channels, header frames and the header codec.

A message is one fixed-size header frame on the channel's header tag, then (on the data tag) an
optional header tail when the encoded header did not fit, then every non-empty tensor in dict order.
"""

from __future__ import annotations

import enum
import io
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import torch

FRAME_BYTES = 2048
_FRAME_PREFIX = struct.Struct("<4sHHQI")  # magic, channel, kind, seq, payload length
FRAME_CAPACITY = FRAME_BYTES - _FRAME_PREFIX.size
_MAGIC = b"PSH1"


class Channel(enum.IntEnum):
    """Logical streams that may share one peer pair; each owns its own pair of tags."""

    OBJECT = 1
    PROXY = 2
    TOKENS = 3
    REQUESTS = 4
    CONTROL = 5

    @property
    def header_tag(self) -> int:
        return 2 * int(self)

    @property
    def data_tag(self) -> int:
        return 2 * int(self) + 1


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
_PLAIN_SCALARS = (str, int, float, bool, type(None))


class ProtocolError(RuntimeError):
    """A header that cannot be decoded or does not match what the receiver expects."""


@dataclass(frozen=True)
class TensorMeta:
    device_type: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class HeaderEntry:
    """One key of a tensor dict: a tensor's meta (and whether it is TP-split) or a plain value."""

    key: str
    meta: TensorMeta | None
    split: bool = False
    value: Any = None


def check_plain(key: str, value: Any) -> None:
    """Raises TypeError unless `value` can ride in the header."""
    if isinstance(value, _PLAIN_SCALARS):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            check_plain(key, item)
        return
    raise TypeError(
        f"value of key {key!r} has type {type(value).__name__}: a tensor dict carries tensors and "
        "plain values (str, int, float, bool, None, lists/tuples of those)"
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
            rows.append(("t", e.key, m.device_type, _DTYPE_NAMES[m.dtype], m.shape, e.split))
    return pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)


class _PlainUnpickler(pickle.Unpickler):
    """Decodes only builtin containers and scalars: a header can never build an arbitrary object."""

    def find_class(self, module: str, name: str) -> Any:
        raise ProtocolError(f"header refers to {module}.{name}; only plain values are allowed")


def decode_entries(payload: bytes) -> list[HeaderEntry]:
    rows = _PlainUnpickler(io.BytesIO(payload)).load()
    entries = []
    for row in rows:
        if row[0] == "v":
            entries.append(HeaderEntry(key=row[1], meta=None, value=row[2]))
        elif row[0] == "t":
            _, key, device_type, dtype_name, shape, split = row
            meta = TensorMeta(device_type, SUPPORTED_DTYPES[dtype_name], tuple(shape))
            entries.append(HeaderEntry(key=key, meta=meta, split=split))
        else:
            raise ProtocolError(f"unknown header row kind {row[0]!r}")
    return entries


@dataclass(frozen=True)
class Frame:
    channel: int
    kind: MessageKind
    seq: int
    payload_len: int
    head: bytes  # the first min(payload_len, FRAME_CAPACITY) bytes of the payload

    @property
    def tail_len(self) -> int:
        return max(0, self.payload_len - FRAME_CAPACITY)


def pack_frame(channel: Channel, kind: MessageKind, seq: int, payload: bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns the fixed-size frame and, when the payload overflows it, the tail to send after."""
    frame = bytearray(FRAME_BYTES)
    _FRAME_PREFIX.pack_into(frame, 0, _MAGIC, int(channel), int(kind), seq, len(payload))
    head = payload[:FRAME_CAPACITY]
    frame[_FRAME_PREFIX.size : _FRAME_PREFIX.size + len(head)] = head
    frame_t = torch.frombuffer(frame, dtype=torch.uint8)
    tail = payload[FRAME_CAPACITY:]
    tail_t = torch.frombuffer(bytearray(tail), dtype=torch.uint8) if tail else None
    return frame_t, tail_t


def unpack_frame(frame: torch.Tensor) -> Frame:
    raw = frame.numpy().tobytes()
    magic, channel, kind, seq, length = _FRAME_PREFIX.unpack_from(raw, 0)
    if magic != _MAGIC:
        raise ProtocolError(f"bad header frame magic {magic!r}")
    start = _FRAME_PREFIX.size
    head = raw[start : start + min(length, FRAME_CAPACITY)]
    return Frame(channel, MessageKind(kind), seq, length, head)
