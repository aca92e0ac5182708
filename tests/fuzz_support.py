"""Helpers for the fuzz tests (test_fuzz_wire.py, test_fuzz_server.py): example budgets, a valid
body of every message type, each body's checks as its receiver runs them, and the seed corpus.

Budgets: every fuzz test declares its in-suite example count; ``SHARDLM_FUZZ_SCALE`` multiplies
them all for a long run (README, "Fuzzing").
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings

from shardlm.wire import codec, frames
from shardlm.wire.errors import ErrorCode, ProtocolError
from shardlm.wire.msgtypes import MsgType, is_known

SCALE = float(os.environ.get("SHARDLM_FUZZ_SCALE", "1"))
CORPUS = Path(__file__).parent / "fuzz_corpus"

# Small limits, so that fuzzed inputs reach every limit cheaply.
LIMITS = frames.Limits(max_frame_bytes=1 << 16, max_tensor_elements=1 << 12, max_tensors_per_message=8)

# Dimensions of the sessions the checks assume (a tiny model).
VOCAB, HIDDEN, IN_DIM, OUT_DIM = 16, 8, 8, 24


def fuzz_settings(examples: int, **kw) -> settings:
    """``examples`` in the suite, times SHARDLM_FUZZ_SCALE."""
    return settings(max_examples=max(1, round(examples * SCALE)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much], **kw)


def valid_bodies() -> dict[MsgType, dict]:
    """A well-formed body of every message type (what each protocol's code sends)."""
    from shardlm.party import handshake
    from shardlm.protocols import lowbits

    rng = np.random.default_rng(0)

    def ring(*shape):
        return rng.integers(-(2**63), 2**63 - 1, shape, dtype=np.int64)

    def u8(*shape):
        return rng.integers(0, 256, shape, dtype=np.uint8)

    hidden = rng.standard_normal((2, HIDDEN), dtype=np.float32)
    return {
        MsgType.ERROR: {"code": ErrorCode.MALFORMED.value, "message": "payload shorter than its length prefix"},
        MsgType.HEALTH: {},
        MsgType.HEALTH_OK: {"status": "ready", "uptime_secs": 1.5, "active_sessions": 1, "served": 3, "cut_off": {}},
        MsgType.INFO: {},
        MsgType.INFO_OK: {"name": "shardlm", "protocol_version": 1, "model": None, "model_fingerprint": "none",
                          "protocols": {"echo": {"private": True, "summary": "no inference"}},
                          "limits": {"max_sessions": 16, "max_seq_len": 8192}},
        MsgType.HELLO: handshake.hello("echo", "none", 64),
        MsgType.HELLO_OK: handshake.hello_ok(session_id="0123456789abcdef", protocol="echo", private=True,
                                             model="none", model_fingerprint="none", max_seq_len=64),
        MsgType.PING: {"data": np.arange(5, dtype=np.uint64) * 2**61, "echo": True},
        MsgType.PONG: {"data": np.arange(5, dtype=np.uint64) * 2**61, "echo": True},
        MsgType.BYE: {},
        MsgType.PLAIN_FORWARD: {"ids": np.array([1, 5, 9], dtype=np.int64), "start": 4, "all_rows": True},
        MsgType.PLAIN_LOGITS: {"logits": rng.standard_normal(VOCAB, dtype=np.float32)},
        MsgType.MASKED_LINEAR: {"unit": "qkv", "m": ring(2, IN_DIM), "bits": 45, "shift": 5},
        MsgType.MASKED_LINEAR_OK: {"y": np.ascontiguousarray(ring(2, OUT_DIM).view(np.uint8)[:, :lowbits.row_bytes(OUT_DIM, 45)])},
        MsgType.OT_BASE_A: {"A": bytes(u8(32)), "n": 4},
        MsgType.OT_BASE_B: {"B": u8(4, 32)},
        MsgType.OT_EXT_U: {"u": u8(128, 16)},
        MsgType.OT_EXT_CORR: {"c": u8(64, 16)},
        MsgType.OT_NOFN_CT: {"instances": 2, "n": 4, "nbytes": 16},
        MsgType.OT_EMB_REQ: {"count": 3, "setup": True, "table": {"rows": 8, "cols": 4, "seed": 1}},
        MsgType.OT_EMB_TABLE: {"rows": 8, "cols": 4, "dtype": "float32"},
        MsgType.OT_REQ: {"role": "sender", "kind": "random", "count": 64, "seed": 0, "nbytes": 16,
                         "reveal": False, "setup": True},
        MsgType.OT_DONE: {"count": 64, "seconds": 0.01},
        MsgType.MPC_SETUP: {"triples": "dealer", "ranges": "wide", "batch": 1024, "seed": ring(4)},
        MsgType.MPC_SETUP_OK: {},
        MsgType.MPC_INPUT: {"m": ring(2, HIDDEN)},
        MsgType.MPC_RESHARE: {"m": ring(2, HIDDEN)},
        MsgType.MPC_OPEN: {"v": ring(6)},
        MsgType.MPC_OPEN_OK: {"v": ring(6)},
        MsgType.MPC_REVEAL: {"v": ring(VOCAB)},
        MsgType.CC_ATTEST: {"nonce": bytes(u8(32)), "client_key": bytes(u8(32))},
        MsgType.CC_REPORT: {"report": b'{"nonce": "00"}', "signature": bytes(u8(64)), "signer": bytes(u8(32))},
        MsgType.CC_SEALED: {"n": 0, "ct": u8(40)},
        MsgType.CC_SEALED_OK: {"n": 0, "ct": u8(40)},
        MsgType.SPLIT_OPEN: {"layers": [1, 3]},
        MsgType.SPLIT_OPEN_OK: {"layers": [1, 3], "session_ttl_secs": 300.0},
        MsgType.SPLIT_FORWARD: {"start": 0, "h": hidden},
        MsgType.SPLIT_HIDDEN: {"h": hidden, "length": 2},
        MsgType.DEAL_REQ: {"take": bytes(u8(16)), "model_fingerprint": "none", "variant": "v3",
                           "rows": {"qkv": 3, "o": 2}},
        MsgType.DEAL_PART: {"unit": "qkv", "seed": bytes(u8(32)), "start": 0, "wr": ring(2, OUT_DIM)},
        MsgType.DEAL_OK: {"take": bytes(u8(16)), "rows": {"qkv": 2}, "dealer_seconds": 0.01},
        # --offline he (real ciphertexts are 262,257 bytes each; the schema fixes the width per session)
        MsgType.HE_SETUP: {"params": bytes(u8(129))},
        MsgType.HE_SETUP_OK: {},
        MsgType.HE_PRODUCT: {"unit": "qkv", "block": 0, "rows": 2, "cts": u8(2, 64)},
        MsgType.HE_PRODUCT_OK: {"cts": u8(3, 64), "cpu_us": 1200},
    }


def body_checks() -> dict:
    """MsgType -> the receiver's check of a decoded body (raises ProtocolError), for every type
    whose receiver checks a schema; the session-dependent bounds are those of a tiny model."""
    from shardlm.party import handshake, server
    from shardlm.protocols import dealer, lowbits, masked, plain, registry, split
    from shardlm.protocols.cc import service as cc
    from shardlm.protocols.he import service as he
    from shardlm.protocols.mpc import service as mpc
    from shardlm.protocols.ot import embedding
    from shardlm.protocols.ot import service as ot

    ring_shapes = {MsgType.MPC_INPUT: (2, HIDDEN), MsgType.MPC_RESHARE: (2, HIDDEN), MsgType.MPC_OPEN: (6,),
                   MsgType.MPC_OPEN_OK: (6,), MsgType.MPC_REVEAL: (VOCAB,)}
    checks = {
        MsgType.HELLO: lambda b: handshake.check_hello(b, offered=registry.offered(False), model_fingerprint="none",
                                                      max_seq_len=4096),
        MsgType.HELLO_OK: lambda b: handshake.check_hello_ok(b, protocol="echo"),
        MsgType.PING: server._pong,
        MsgType.PLAIN_FORWARD: plain.PLAIN_FORWARD.check,
        MsgType.PLAIN_LOGITS: lambda b: plain.PLAIN_LOGITS.check(b, shape=(VOCAB,)),
        MsgType.MASKED_LINEAR: lambda b: masked.MASKED_LINEAR.check(
            b, units={"qkv": IN_DIM, "o": IN_DIM}, in_dim=lambda f: IN_DIM, rows=(1, 16),
            max_shift=lambda f: lowbits.RING_BITS - f["bits"]),
        MsgType.MASKED_LINEAR_OK: lambda b: masked.MASKED_LINEAR_OK.check(
            b, rows=2, row_bytes=lowbits.row_bytes(OUT_DIM, 45)),
        MsgType.OT_REQ: ot.OT_REQ.check,
        MsgType.OT_EMB_REQ: embedding.OT_EMB_REQ.check,
        MsgType.MPC_SETUP: mpc.MPC_SETUP.check,
        MsgType.CC_ATTEST: cc.CC_ATTEST.check,
        MsgType.CC_SEALED: cc.CC_SEALED.check,
        MsgType.CC_SEALED_OK: cc.CC_SEALED_OK.check,
        MsgType.SPLIT_OPEN: split.SPLIT_OPEN.check,
        MsgType.SPLIT_FORWARD: lambda b: split.SPLIT_FORWARD.check(b, hidden=HIDDEN),
        MsgType.DEAL_REQ: dealer.DEAL_REQ.check,
        MsgType.DEAL_PART: lambda b: dealer.DEAL_PART.check(b, units={"qkv": 2}, out_dim=lambda f: OUT_DIM,
                                                            rows=lambda f: (1, 2 - f["start"])),
        MsgType.DEAL_OK: dealer.DEAL_OK.check,
        MsgType.HE_SETUP: he.HE_SETUP.check,
        MsgType.HE_SETUP_OK: he.HE_SETUP_OK.check,
        MsgType.HE_PRODUCT: lambda b: he.HE_PRODUCT.check(b, units={"qkv": 2}, cts=(1, 240), ct_bytes=64),
        MsgType.HE_PRODUCT_OK: lambda b: he.HE_PRODUCT_OK.check(b, cts=3, ct_bytes=64),
    }
    for t, shape in ring_shapes.items():
        checks[t] = lambda b, t=t, shape=shape: mpc.ring_tensor(t, b, shape)
    return checks


def frame_of(msg_type: int, body: dict, seq: int = 0) -> bytes:
    return frames.encode_frame(msg_type, seq, codec.encode_body(body))


def receive_all(data: bytes, chunks=None, limits: frames.Limits = LIMITS, checks: dict | None = None):
    """What a receiver makes of ``data`` fed in pieces of the sizes ``chunks`` (cycled; None:
    all at once): ``(frames, error)``, the frames as (type, seq, body) decoded and checked up to
    the first violation, whose ErrorCode is ``error`` (None: no violation; trailing bytes that do
    not complete a frame are left waiting). Any exception other than a ProtocolError propagates:
    that is the bug a fuzzer looks for."""
    dec = frames.FrameDecoder(limits)
    got = []
    sizes = list(chunks or [max(len(data), 1)])
    pos = i = 0
    try:
        while True:
            while (frame := dec.next_frame()) is not None:
                assert len(frame.payload) <= limits.max_frame_bytes
                got.append((frame.type, frame.seq, _check(frame, limits, checks)))
            if pos >= len(data):
                break
            n = max(1, sizes[i % len(sizes)])
            dec.feed(data[pos:pos + n])
            pos, i = pos + n, i + 1
            assert dec.buffered <= pos  # never more than what arrived
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode) and exc.message, exc
        return got, exc.code
    return got, None


def _check(frame: frames.Frame, limits: frames.Limits, checks: dict | None):
    if not is_known(frame.type):
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type 0x{frame.type:04x}")
    body = codec.decode_body(frame.payload, limits)
    assert isinstance(body, dict)
    check = (checks or {}).get(MsgType(frame.type))
    if check is not None:
        check(body)
    return body


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.bin"))


def write_seeds() -> None:
    """(Re)write the valid seeds: one frame of every message type, and a short echo session.
    Regression inputs (crash-*.bin) are added by hand next to them."""
    CORPUS.mkdir(exist_ok=True)
    for msg_type, body in valid_bodies().items():
        (CORPUS / f"valid-{msg_type.name.lower()}.bin").write_bytes(frame_of(msg_type, body))
    bodies = valid_bodies()
    session = [MsgType.HEALTH, MsgType.INFO, MsgType.HELLO, MsgType.PING, MsgType.BYE]
    (CORPUS / "session-echo.bin").write_bytes(b"".join(frame_of(t, bodies[t], seq) for seq, t in enumerate(session)))


if __name__ == "__main__":
    write_seeds()
