"""The session handshake: both sides agree on version, protocol and model before anything else.

HELLO (client -> server)::

    {"version": PROTOCOL_VERSION, "protocol": name, "model_fingerprint": "sha256:..." | "none",
     "max_seq_len": int}

HELLO_OK (server -> client)::

    {"version", "session_id", "protocol", "private", "model", "model_fingerprint", "max_seq_len"}

The checks are pure functions so they are tested without sockets; each mismatch raises a
ProtocolError whose message tells the user what to change.
"""

from __future__ import annotations

from .. import __version__
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.schema import Int, Schema, Str

PROTOCOL_VERSION = 1


def capacity_bucket(positions: int) -> int:
    """What a client's HELLO asks for: the next power of two at or above ``positions`` (at least
    64). The exact prompt + max_tokens would tell the server the requested generation length,
    and with the number of decode forwards whether the completion stopped at EOS; the bucket
    tells it that length only to within a factor of two. (The forwards themselves still show
    where generation stopped.) A server whose max_seq_len is not a power of two may refuse a
    bucket that the exact length would have fit."""
    return max(64, 1 << max(positions - 1, 0).bit_length())


def hello(protocol: str, model_fingerprint: str, max_seq_len: int) -> dict:
    return {
        "version": PROTOCOL_VERSION, "protocol": protocol,
        "model_fingerprint": model_fingerprint, "max_seq_len": int(max_seq_len),
    }


HELLO = Schema("HELLO", version=Int(), protocol=Str(), model_fingerprint=Str(), max_seq_len=Int())


def check_hello(body: dict, *, offered: dict, model_fingerprint: str, max_seq_len: int) -> str:
    """Server side: validate a HELLO; return the protocol name. ``offered``: name -> spec."""
    # the version first: a newer client's HELLO may carry fields this version does not know
    version = body.get("version") if isinstance(body, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.VERSION_MISMATCH,
            f"client speaks protocol version {version}, this server speaks {PROTOCOL_VERSION} "
            f"(shardlm {__version__}); upgrade the older side",
        )
    body = HELLO.check(body)
    protocol = body["protocol"]
    if protocol not in offered:
        raise ProtocolError(
            ErrorCode.UNKNOWN_PROTOCOL,
            f"protocol {protocol!r} is not offered here; this server offers: {', '.join(sorted(offered))}",
        )
    fp = body["model_fingerprint"]
    if fp != model_fingerprint:
        raise ProtocolError(
            ErrorCode.MODEL_MISMATCH,
            f"client model {fp} differs from the server's {model_fingerprint}; both sides must load "
            f"the same model files",
        )
    requested = body["max_seq_len"]
    if requested > max_seq_len or requested < 1:
        raise ProtocolError(
            ErrorCode.SEQ_TOO_LONG,
            f"requested max_seq_len {requested}, the server allows 1..{max_seq_len}",
        )
    return protocol


def hello_ok(*, session_id: str, protocol: str, private: bool, model: str, model_fingerprint: str,
             max_seq_len: int) -> dict:
    return {
        "version": PROTOCOL_VERSION, "session_id": session_id, "protocol": protocol, "private": private,
        "model": model, "model_fingerprint": model_fingerprint, "max_seq_len": max_seq_len,
    }


def check_hello_ok(body: dict, *, protocol: str) -> dict:
    """Client side: the server must have accepted exactly what was asked."""
    version, accepted = body.get("version"), body.get("protocol")
    # type checks first: a tensor compared with == is not a bool
    if type(version) is not int or version != PROTOCOL_VERSION or not isinstance(accepted, str) or accepted != protocol:
        raise ProtocolError(
            ErrorCode.WRONG_STATE,
            f"server accepted {body.get('protocol')!r} v{body.get('version')}, asked {protocol!r} v{PROTOCOL_VERSION}",
        )
    if not isinstance(body.get("session_id"), str):
        raise ProtocolError(ErrorCode.MALFORMED, "HELLO_OK without a session id")
    return body
