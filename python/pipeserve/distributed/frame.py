"""Header frames: the first transfer of every message, verified before anything in it is trusted.

Layout (little endian), `frame_len` bytes in all:

    prefix   magic, channel, kind, seq, sender rank, header length, inline bytes, frame length,
             CRC-32 of the header tail (0 when the header fits)
    head     the first min(header length, FRAME_CAPACITY) bytes of the encoded header
    inline   small CPU tensors, each 8-byte aligned, starting at align(prefix + head)
    trailer  CRC-32 of prefix + head, end magic

The receiver keeps buffers of FRAME_BYTES posted ahead; gloo fills a posted buffer with a shorter
message without saying how many bytes came, and the buffer starts uninitialised. A frame cut short
therefore leaves stale bytes where its trailer belongs, so the trailer check catches truncation; the
CRC covers sender, channel and sequence number, so a stale trailer of an earlier frame never matches.

NOTE: a transfer longer than the posted buffer fails inside gloo's I/O thread and aborts the
process; Python never sees it. The layer's senders never exceed FRAME_BYTES (`pack_frame` checks),
and nothing but pipeserve ranks may reach the gloo ports.
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

import numpy as np
import torch

from pipeserve.distributed.wire import Channel, MessageKind, ProtocolError

FRAME_BYTES = 256 * 1024  # capacity of a posted header frame
_PREFIX = struct.Struct("<4sHHQIIIII")
_TRAILER = struct.Struct("<I4s")
_MAGIC = b"PSH3"
_END = b"PSHE"
_ALIGN = 8
_KINDS = {int(kind): kind for kind in MessageKind}
PREFIX_BYTES = _PREFIX.size
TRAILER_BYTES = _TRAILER.size


def align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


FRAME_CAPACITY = FRAME_BYTES - align(PREFIX_BYTES) - TRAILER_BYTES  # header bytes without a tail


def frame_length(header_len: int, inline_len: int) -> int:
    """Bytes of a frame carrying a header of `header_len` bytes and `inline_len` inline bytes."""
    head = min(header_len, FRAME_CAPACITY)
    return align(PREFIX_BYTES + head) + inline_len + TRAILER_BYTES


def inline_fits(header_len: int, inline_len: int) -> bool:
    return inline_len == 0 or (
        header_len <= FRAME_CAPACITY and frame_length(header_len, inline_len) <= FRAME_BYTES
    )


class Frame(NamedTuple):
    channel: int
    kind: MessageKind
    seq: int
    sender: int  # global rank
    header_len: int
    inline_len: int
    tail_crc: int
    head: bytes  # the first min(header_len, FRAME_CAPACITY) bytes of the header

    @property
    def tail_len(self) -> int:
        return max(0, self.header_len - FRAME_CAPACITY)

    @property
    def inline_offset(self) -> int:
        return align(PREFIX_BYTES + len(self.head))


def pack_frame(
    channel: Channel,
    kind: MessageKind,
    seq: int,
    sender: int,
    header: bytes,
    inline: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns the frame (exactly `frame_length` bytes) and, when the header overflows it, the tail.

    `inline` tensors are contiguous CPU tensors that `inline_fits` has admitted.
    """
    sizes = [t.numel() * t.element_size() for t in inline]
    inline_len = sum(align(n) for n in sizes)
    head, tail = header[:FRAME_CAPACITY], header[FRAME_CAPACITY:]
    end = PREFIX_BYTES + len(head)
    size = align(end) + inline_len + TRAILER_BYTES
    if size > FRAME_BYTES or (inline and tail):
        raise ProtocolError(f"{inline_len} inline bytes do not fit a frame with this header")
    frame = torch.empty(size, dtype=torch.uint8)
    raw = memoryview(frame.numpy())
    fields = (int(channel), int(kind), seq, sender, len(header), inline_len, size, _crc(tail))
    _PREFIX.pack_into(raw, 0, _MAGIC, *fields)
    raw[PREFIX_BYTES:end] = head
    offset = align(end)
    for t, n in zip(inline, sizes, strict=True):
        raw[offset : offset + n] = t.view(torch.uint8).numpy()  # `t` is flat
        offset += align(n)
    _TRAILER.pack_into(raw, offset, zlib.crc32(raw[:end]), _END)
    return frame, (torch.frombuffer(bytearray(tail), dtype=torch.uint8) if tail else None)


def _crc(data: bytes) -> int:
    return zlib.crc32(data) if data else 0


def unpack_frame(frame: torch.Tensor) -> Frame:
    """Decodes and verifies a received frame buffer; raises ProtocolError when any check fails."""
    raw = frame.numpy()
    if raw.size < PREFIX_BYTES + TRAILER_BYTES:
        raise ProtocolError(f"a frame buffer of {raw.size} bytes cannot hold a frame")
    magic, channel, kind, seq, sender, header_len, inline_len, size, tail_crc = _PREFIX.unpack_from(
        raw, 0
    )
    if magic != _MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r}")
    if inline_len > FRAME_BYTES or size != frame_length(header_len, inline_len) or size > raw.size:
        raise ProtocolError(
            f"inconsistent frame lengths (frame {size}, header {header_len}, inline {inline_len})"
        )
    if inline_len and header_len > FRAME_CAPACITY:
        raise ProtocolError("a frame whose header continues in a tail cannot carry inline bytes")
    end = PREFIX_BYTES + min(header_len, FRAME_CAPACITY)
    crc, end_magic = _TRAILER.unpack_from(raw, size - TRAILER_BYTES)
    if end_magic != _END or crc != zlib.crc32(raw[:end]):
        raise ProtocolError(f"frame of {size} bytes is cut short or corrupt (trailer check failed)")
    if kind not in _KINDS:
        raise ProtocolError(f"unknown message kind {kind}")
    head = raw[PREFIX_BYTES:end].tobytes()
    return Frame(channel, _KINDS[kind], seq, sender, header_len, inline_len, tail_crc, head)


def check_tail(frame: Frame, tail: bytes) -> None:
    if zlib.crc32(tail) != frame.tail_crc:
        raise ProtocolError(f"header tail of {len(tail)} bytes is cut short or corrupt")


def inline_view(raw: np.ndarray, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor viewing `nbytes` (> 0) of the frame's array `raw` at an aligned `offset`
    (no copy; it keeps the frame alive)."""
    return torch.frombuffer(raw, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
