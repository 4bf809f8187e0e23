"""Wire format of the tensor-dict protocol: channels, header frames and the header codec.

A message is one header frame on the channel's header tag, then, on the data tag, a header tail when
the encoded header did not fit in a frame, then every non-empty tensor that is not inline, in dict
order. The receiver keeps frame buffers of `FRAME_BYTES` posted ahead; a sender sends only the bytes
it needs (gloo fills a larger posted buffer with a shorter message). Small CPU tensors ride inline in
the frame, 8-byte aligned after the header, so a small message is a single transfer that lands in a
buffer posted before it was sent.
"""

from __future__ import annotations

import enum
import io
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

FRAME_BYTES = 256 * 1024  # capacity of a posted header frame
_FRAME_PREFIX = struct.Struct("<4sHHQII")  # magic, channel, kind, seq, header length, inline bytes
FRAME_CAPACITY = FRAME_BYTES - _FRAME_PREFIX.size  # header bytes that fit without a tail
_MAGIC = b"PSH2"
_ALIGN = 8


def align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


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
    split: bool = False  # only row `tp_rank` of `flat.view(tp, -1)` travels
    inline: bool = False  # the bytes ride in the header frame
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


def decode_entries(payload: bytes) -> list[HeaderEntry]:
    rows = loads_plain(payload)
    entries = []
    for row in rows:
        if row[0] == "v":
            entries.append(HeaderEntry(key=row[1], meta=None, value=row[2]))
        elif row[0] == "t":
            _, key, device_type, dtype_name, shape, split, inline = row
            meta = TensorMeta(device_type, SUPPORTED_DTYPES[dtype_name], tuple(shape))
            entries.append(HeaderEntry(key=key, meta=meta, split=split, inline=inline))
        else:
            raise ProtocolError(f"unknown header row kind {row[0]!r}")
    return entries


@dataclass(frozen=True)
class Frame:
    channel: int
    kind: MessageKind
    seq: int
    header_len: int
    inline_len: int
    head: bytes  # the first min(header_len, FRAME_CAPACITY) bytes of the header

    @property
    def tail_len(self) -> int:
        return max(0, self.header_len - FRAME_CAPACITY)

    @property
    def inline_offset(self) -> int:
        return align(_FRAME_PREFIX.size + self.header_len)


def inline_fits(header_len: int, inline_len: int) -> bool:
    return inline_len == 0 or align(_FRAME_PREFIX.size + header_len) + inline_len <= FRAME_BYTES


def pack_frame(
    channel: Channel, kind: MessageKind, seq: int, header: bytes, inline: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns the frame (exactly as long as needed) and, when the header overflows it, the tail.

    `inline` tensors are contiguous CPU tensors that `inline_fits` has admitted.
    """
    inline_len = sum(align(t.numel() * t.element_size()) for t in inline)
    head = header[:FRAME_CAPACITY]
    start = _FRAME_PREFIX.size
    size = align(start + len(head)) + inline_len if inline else start + len(head)
    frame = torch.empty(size, dtype=torch.uint8)
    raw = frame.numpy()
    _FRAME_PREFIX.pack_into(raw, 0, _MAGIC, int(channel), int(kind), seq, len(header), inline_len)
    raw[start : start + len(head)] = np.frombuffer(head, dtype=np.uint8)
    offset = align(start + len(header))
    for t in inline:
        data = t.reshape(-1).view(torch.uint8).numpy()
        raw[offset : offset + data.size] = data
        offset += align(data.size)
    tail = header[FRAME_CAPACITY:]
    return frame, (torch.frombuffer(bytearray(tail), dtype=torch.uint8) if tail else None)


def unpack_frame(frame: torch.Tensor) -> Frame:
    raw = frame.numpy()
    magic, channel, kind, seq, header_len, inline_len = _FRAME_PREFIX.unpack_from(raw, 0)
    if magic != _MAGIC:
        raise ProtocolError(f"bad header frame magic {bytes(magic)!r}")
    start = _FRAME_PREFIX.size
    head = raw[start : start + min(header_len, FRAME_CAPACITY)].tobytes()
    return Frame(channel, MessageKind(kind), seq, header_len, inline_len, head)


def inline_view(frame: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor viewing `nbytes` of the frame at an aligned `offset` (no copy)."""
    return frame[offset : offset + nbytes].view(dtype)
