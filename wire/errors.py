"""Error codes shared by both parties, and the exceptions that carry them.

An error travels as an ERROR frame whose body is ``{"code": <name>, "message": <text>}``;
the receiver raises :class:`RemoteError`. Local violations raise :class:`ProtocolError`
(or its subclass :class:`FrameError` for framing problems).
"""

from __future__ import annotations

import enum
import sys

import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


class ErrorCode(str, enum.Enum):
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_CRC = "bad_crc"
    FRAME_TOO_LARGE = "frame_too_large"
    TENSOR_TOO_LARGE = "tensor_too_large"
    MALFORMED = "malformed"
    UNKNOWN_TYPE = "unknown_type"
    WRONG_STATE = "wrong_state"
    VERSION_MISMATCH = "version_mismatch"
    UNKNOWN_PROTOCOL = "unknown_protocol"
    MODEL_MISMATCH = "model_mismatch"
    SEQ_TOO_LONG = "seq_too_long"
    BUSY = "busy"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    SESSION_EXPIRED = "session_expired"
    RESOURCE_LIMIT = "resource_limit"
    INTERNAL = "internal"
    # v3-cc (protocols/cc)
    ATTESTATION_FAILED = "attestation_failed"
    AUTH_FAILED = "auth_failed"
    REPLAY = "replay"
    # --verify (protocols/verify): a masked product the client's check refused
    VERIFICATION_FAILED = "verification_failed"


class ProtocolError(Exception):
    """A violation of the wire protocol detected locally; ``code`` says which rule."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class FrameError(ProtocolError):
    """The byte stream does not hold a valid frame (magic, version, length, CRC)."""


class RemoteError(Exception):
    """The peer sent an ERROR frame."""

    def __init__(self, code: str, message: str):
        super().__init__(f"peer reported {code}: {message}")
        self.code = code
        self.message = message


class ConnectionClosed(Exception):
    """The peer closed the stream (cleanly or not) where a message was expected."""


class PeerStalled(ConnectionClosed):
    """A send did not complete within its deadline: the peer stopped reading."""


def first_error(exc: BaseException) -> BaseException | None:
    """The first exception in a (nested) exception group that is not trio's Cancelled, or None:
    what a nursery wrapped, for its caller to re-raise as itself."""
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            found = first_error(e)
            if found is not None:
                return found
        return None
    return None if isinstance(exc, trio.Cancelled) else exc
