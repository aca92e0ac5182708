"""The frame: a fixed header followed by a CRC-checked payload.

Header (20 bytes, network byte order)::

    magic  4s  b"SHLM"
    version B  WIRE_VERSION
    type   H   a MsgType code
    flags  B   reserved, 0
    seq    I   per-direction sequence number, starting at 0
    length I   payload length in bytes
    crc    I   CRC32C of the payload

The decoder is sans-io (``feed`` bytes, take frames out) so the same code checks frames from a
TLS socket, an in-memory stream, a recorded transcript or a fuzzer. The length field is checked
against the limit *before* any buffer of that size exists.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Iterable

import crc32c

from .errors import ErrorCode, FrameError

MAGIC = b"SHLM"
WIRE_VERSION = 1
HEADER = struct.Struct("!4sBHBIII")
HEADER_SIZE = HEADER.size


@dataclasses.dataclass(frozen=True)
class Limits:
    """Hard limits one party enforces on what it receives."""

    max_frame_bytes: int = 256 * 1024 * 1024
    max_tensor_elements: int = 64 * 1024 * 1024
    max_tensors_per_message: int = 4096


@dataclasses.dataclass
class Frame:
    type: int
    flags: int
    seq: int
    payload: bytearray


def crc_of(parts: Iterable[bytes | memoryview]) -> int:
    crc = 0
    for part in parts:
        crc = crc32c.crc32c(part, crc)
    return crc


def encode_header(msg_type: int, seq: int, parts: list, flags: int = 0) -> bytes:
    """The header for a payload made of ``parts`` (sent after it without joining them)."""
    length = sum(memoryview(p).nbytes for p in parts)
    return HEADER.pack(MAGIC, WIRE_VERSION, msg_type, flags, seq & 0xFFFFFFFF, length, crc_of(parts))


def encode_frame(msg_type: int, seq: int, parts: list, flags: int = 0) -> bytes:
    """One contiguous frame (tests and transcripts; the channel sends the parts separately)."""
    return b"".join([encode_header(msg_type, seq, parts, flags), *(bytes(memoryview(p).cast("B")) for p in parts)])


class FrameDecoder:
    """Accumulates bytes and yields complete, checked frames."""

    def __init__(self, limits: Limits = Limits()):
        self.limits = limits
        self._buf = bytearray()
        self._header: tuple | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_frame(self) -> Frame | None:
        """The next complete frame, None if more bytes are needed; raises FrameError."""
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                # Reject garbage early: a wrong magic is visible in the first bytes.
                if self._buf and not MAGIC.startswith(bytes(self._buf[: len(MAGIC)])):
                    raise FrameError(ErrorCode.BAD_MAGIC, "stream does not start with a shardlm frame")
                return None
            magic, version, msg_type, flags, seq, length, crc = HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                raise FrameError(ErrorCode.BAD_MAGIC, f"bad magic {magic!r}")
            if version != WIRE_VERSION:
                raise FrameError(ErrorCode.BAD_VERSION, f"wire version {version}, expected {WIRE_VERSION}")
            if length > self.limits.max_frame_bytes:
                raise FrameError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame of {length} bytes exceeds the limit of {self.limits.max_frame_bytes}",
                )
            self._header = (msg_type, flags, seq, length, crc)
            del self._buf[:HEADER_SIZE]
        msg_type, flags, seq, length, crc = self._header
        if len(self._buf) < length:
            return None
        payload = self._buf[:length]
        del self._buf[:length]
        self._header = None
        if crc32c.crc32c(payload) != crc:
            raise FrameError(ErrorCode.BAD_CRC, f"CRC mismatch in frame seq={seq} type=0x{msg_type:04x}")
        return Frame(msg_type, flags, seq, payload)
