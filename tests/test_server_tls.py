"""The server over real TLS sockets on loopback: bad input, authentication, limits, transcripts."""
import struct

import numpy as np
import pytest
import trio

from shardlm.party import client as client_mod
from shardlm.party.client import ClientError, connect
from shardlm.party.transcript import load_transcript, session_dirs
from shardlm.wire import frames, tls
from shardlm.wire.errors import RemoteError
from shardlm.wire.msgtypes import MsgType

from support import error_codes, frame_bytes, raw_tls, read_until_close, tls_server

HELLO_ECHO = {"version": 1, "protocol": "echo", "model_fingerprint": "none", "max_seq_len": 128}


def _bad_crc() -> bytes:
    wire = bytearray(frame_bytes(MsgType.HEALTH, {}))
    wire[-1] ^= 0xFF
    return bytes(wire)


BAD_INPUTS = {
    "bad_crc": (_bad_crc(), {"bad_crc"}),
    "oversized_length": (frames.HEADER.pack(frames.MAGIC, frames.WIRE_VERSION, MsgType.HEALTH, 0, 0, 2**32 - 1, 0),
                         {"frame_too_large"}),
    "unknown_type": (frame_bytes(0x7777, {}), {"unknown_type"}),
    "wrong_state": (frame_bytes(MsgType.BYE, {}), {"wrong_state"}),
    "hello_twice": (frame_bytes(MsgType.HELLO, HELLO_ECHO) + frame_bytes(MsgType.HELLO, HELLO_ECHO, seq=1),
                    {"wrong_state"}),
    "garbage": (bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)), {"bad_magic"}),
    "http": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", {"bad_magic"}),
    "bad_seq": (frame_bytes(MsgType.HEALTH, {}, seq=5), {"malformed"}),
    "malformed_body": (frames.encode_frame(MsgType.HEALTH, 0, [struct.pack("<I", 3), b"\xc1\xc1\xc1"]), {"malformed"}),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_an_error_frame_and_others_are_still_served(tmp_path, case):
    junk, expected = BAD_INPUTS[case]

    async def main():
        async with tls_server(tmp_path) as (server, cfg):
            async with connect(cfg) as good:
                # a well-behaved session is open across the bad one
                await good.open_session("echo")
                bad = await raw_tls(cfg)
                await bad.send_all(junk)
                received = await read_until_close(bad)
                _, reply = await good.ping(np.arange(10, dtype=np.uint64))
                assert reply["data"].tolist() == list(range(10))
            async with connect(cfg) as again:
                assert (await again.health())["status"] == "ready"
            return received

    received = trio.run(main)
    if case == "hello_twice":
        assert received[0][0] == MsgType.HELLO_OK
    assert set(error_codes(received)) == expected, received
    # the error is the last thing sent before the close
    assert received[-1][0] == MsgType.ERROR and received[-1][1]["message"]


def test_health_info_and_ping_over_tls(tmp_path):
    async def main():
        async with tls_server(tmp_path) as (server, cfg):
            async with connect(cfg) as conn:
                h = await conn.health()
                i = await conn.info()
                s = await conn.open_session("echo")
                big = np.random.default_rng(0).integers(0, 2**64 - 1, 1 << 17, dtype=np.uint64)  # 1 MiB
                _, reply = await conn.ping(big)
                _, sized = await conn.ping(big, echo=False)
                return h, i, s, big, reply, sized

    h, i, s, big, reply, sized = trio.run(main)
    assert h["status"] == "ready"
    assert h["active_sessions"] == 0 and h["connections"] == 1  # an idle server: only the asking connection
    assert "echo" in i["protocols"] and i["device"] == "cpu" and i["limits"]["max_seq_len"] == 8192
    assert s["protocol"] == "echo" and len(s["session_id"]) == 16
    assert np.array_equal(reply["data"], big)
    assert sized == {"nbytes": big.nbytes}


@pytest.mark.parametrize("field,value,code", [
    ("version", 2, "version_mismatch"),
    ("protocol", "v9", "unknown_protocol"),
    ("model_fingerprint", "sha256:" + "0" * 64, "model_mismatch"),
    ("max_seq_len", 10**9, "seq_too_long"),
    ("max_seq_len", "long", "malformed"),
])
def test_handshake_mismatches_give_clear_errors(tmp_path, field, value, code):
    async def main():
        async with tls_server(tmp_path) as (server, cfg):
            stream = await raw_tls(cfg)
            await stream.send_all(frame_bytes(MsgType.HELLO, {**HELLO_ECHO, field: value}))
            return await read_until_close(stream)

    received = trio.run(main)
    assert error_codes(received) == [code]
    assert received[-1][1]["message"]


def test_client_pinning_the_wrong_fingerprint_refuses(tmp_path):
    async def main():
        async with tls_server(tmp_path) as (server, cfg):
            wrong = client_mod.ClientConfig(server=cfg.server, fingerprint="sha256:" + "ab" * 32, timeout=5)
            with pytest.raises(ClientError, match="does not match the pinned"):
                async with connect(wrong) as conn:
                    await conn.health()
            # the server saw the connection end without a single frame (the client sent nothing)
            with trio.fail_after(5):
                while server.served < 1:
                    await trio.sleep(0.01)

    trio.run(main)


def test_client_without_trust_anchor_refuses_before_connecting():
    with pytest.raises(tls.TLSConfigError, match="--tls-fingerprint"):
        tls.client_context()


def test_ca_file_trust_verifies_the_server(tmp_path):
    async def main():
        async with tls_server(tmp_path) as (server, cfg):
            by_ca = client_mod.ClientConfig(server=cfg.server, ca=str(tmp_path / "certs/server.crt"), timeout=5)
            async with connect(by_ca) as conn:
                ok = (await conn.health())["status"]
            other = tmp_path / "other"
            tls.generate_server_cert(other)
            wrong_ca = client_mod.ClientConfig(server=cfg.server, ca=str(other / "server.crt"), timeout=5)
            with pytest.raises(ClientError, match="TLS handshake"):
                async with connect(wrong_ca) as conn:
                    await conn.health()
            return ok

    assert trio.run(main) == "ready"


def test_mutual_tls_refuses_clients_without_a_certificate(tmp_path):
    tls.generate_client_ca(tmp_path / "mtls")
    intruder = tmp_path / "intruder"
    tls.generate_client_ca(intruder)  # a certificate from a CA the server does not trust

    async def main():
        async with tls_server(tmp_path, client_ca=tmp_path / "mtls/client-ca.crt") as (server, cfg):
            with pytest.raises((ClientError, RemoteError, client_mod.ConnectionClosed)):
                async with connect(cfg) as conn:
                    await conn.health()
            bad = client_mod.ClientConfig(server=cfg.server, fingerprint=cfg.fingerprint, timeout=5,
                                          cert=str(intruder / "client.crt"), key=str(intruder / "client.key"))
            with pytest.raises((ClientError, RemoteError, client_mod.ConnectionClosed)):
                async with connect(bad) as conn:
                    await conn.health()
            good = client_mod.ClientConfig(server=cfg.server, fingerprint=cfg.fingerprint, timeout=5,
                                           cert=str(tmp_path / "mtls/client.crt"), key=str(tmp_path / "mtls/client.key"))
            async with connect(good) as conn:
                return (await conn.health())["status"]

    assert trio.run(main) == "ready"


def test_max_sessions_refuses_the_extra_client_with_busy(tmp_path):
    async def main():
        async with tls_server(tmp_path, max_sessions=1) as (server, cfg):
            async with connect(cfg) as first:
                await first.open_session("echo")
                with pytest.raises(RemoteError) as e:
                    async with connect(cfg) as second:
                        await second.health()
                assert e.value.code == "busy"
                await first.ping(1)  # the first session is untouched
            async with connect(cfg) as third:  # capacity is back once the first left
                return (await third.health())["status"]

    assert trio.run(main) == "ready"


def test_idle_timeout_and_session_ttl_close_with_clear_codes(tmp_path):
    async def main():
        async with tls_server(tmp_path, idle_timeout=0.3, session_ttl=30) as (server, cfg):
            async with connect(cfg) as conn:
                await conn.open_session("echo")
                await trio.sleep(0.6)
                with pytest.raises(RemoteError) as idle:
                    await conn.ping(1)
        async with tls_server(tmp_path / "b", idle_timeout=30, session_ttl=0.5) as (server, cfg):
            async with connect(cfg) as conn:
                await conn.open_session("echo")
                with pytest.raises(RemoteError) as ttl:
                    with trio.fail_after(5):
                        while True:
                            await conn.ping(1)
                            await trio.sleep(0.05)
        async with tls_server(tmp_path / "c", handshake_timeout=0.3) as (server, cfg):
            stream = await raw_tls(cfg)
            silent = await read_until_close(stream)
        return idle.value.code, ttl.value.code, error_codes(silent)

    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    assert trio.run(main) == ("idle_timeout", "session_expired", ["handshake_timeout"])


def test_recorded_transcript_reloads_and_matches_what_was_sent(tmp_path):
    rec = tmp_path / "rec"
    sent = [np.arange(7, dtype=np.uint64) * (2**61), {"nested": [1, "two", np.eye(3, dtype=np.float32)]}, b"raw"]

    async def main():
        async with tls_server(tmp_path, record_dir=str(rec)) as (server, cfg):
            async with connect(cfg) as conn:
                await conn.health()
                s = await conn.open_session("echo")
                with conn.channel.phase("prefill"):
                    for item in sent:
                        await conn.ping(item)
            await trio.sleep(0.2)  # let the server finish writing after BYE
            return s["session_id"]

    session_id = trio.run(main)
    (d,) = session_dirs(rec)
    assert d.name == session_id
    meta, msgs = load_transcript(d)
    assert meta["protocol"] == "echo" and meta["role"] == "server"
    assert [m.type for m in msgs] == [MsgType.HEALTH, MsgType.HELLO] + [MsgType.PING] * 3 + [MsgType.BYE]
    got = [m.body["data"] for m in msgs if m.type == MsgType.PING]
    assert np.array_equal(got[0], sent[0]) and got[0].dtype == np.uint64
    assert got[1]["nested"][:2] == [1, "two"] and np.array_equal(got[1]["nested"][2], sent[1]["nested"][2])
    assert got[2] == b"raw"
    # a flipped byte in the recording is caught, not silently decoded
    raw = bytearray((d / "frames.bin").read_bytes())
    raw[-1] ^= 1
    (d / "frames.bin").write_bytes(bytes(raw))
    with pytest.raises(Exception, match="bad_crc|CRC"):
        load_transcript(d)


def test_private_keys_are_never_readable_by_others(tmp_path, monkeypatch):
    # mode 0600 from creation: with a permissive umask and no chmod afterwards (a write-then-chmod
    # left the key world-readable in between), every key file is still private
    import os
    from pathlib import Path

    old = os.umask(0)
    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    try:
        tls.generate_server_cert(tmp_path)
        tls.generate_client_ca(tmp_path)
        tls.generate_server_cert(tmp_path)  # over an existing key too
    finally:
        os.umask(old)
    keys = sorted(tmp_path.glob("*.key"))
    assert [k.name for k in keys] == ["client-ca.key", "client.key", "server.key"]
    assert all(k.stat().st_mode & 0o777 == 0o600 for k in keys), [oct(k.stat().st_mode) for k in keys]
    assert not list(tmp_path.glob(".*.tmp"))
