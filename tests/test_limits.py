"""A server that one client cannot stall or exhaust (issue 22): every limit cuts the offending
connection off, counts it, and leaves other clients served."""
import threading

import numpy as np
import pytest
import trio

from conftest import load_tiny_models
from shardlm.models.reference import generate as reference_generate
from shardlm.models.sampling import SamplingParams
from shardlm.party.client import connect
from shardlm.party.drafting import MAX_DRAFT_LEN
from shardlm.party.run import run_generation
from shardlm.protocols import registry, ring
from shardlm.wire import frames
from shardlm.wire.errors import RemoteError
from shardlm.wire.msgtypes import MsgType

from support import frame_bytes, raw_tls, read_until_close, tls_server

GREEDY = SamplingParams()
PROMPT = [5, 77, 31, 200]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_tiny_models(tmp_path_factory, ["llama"], 3)["llama"]


async def _served_meanwhile(cfg, model) -> None:
    """A well-behaved client gets the reference answer."""
    rep = await run_generation(cfg, model, registry.get("v3"), PROMPT, 6, GREEDY, ignore_eos=True)
    assert rep.result.token_ids == reference_generate(model, PROMPT, 6, GREEDY, stop_ids=())


async def _until(predicate, timeout: float) -> float:
    """Seconds until ``predicate()`` holds (fails after ``timeout``)."""
    t0 = trio.current_time()
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
    return trio.current_time() - t0


async def _open_session(cfg, model, protocol="v3", capacity=64):
    """A raw TLS stream with a session open (HELLO answered), for misbehaving on purpose."""
    stream = await raw_tls(cfg)
    await stream.send_all(frame_bytes(MsgType.HELLO, {
        "version": 1, "protocol": protocol, "model_fingerprint": model.fingerprint(), "max_seq_len": capacity}))
    decoder = frames.FrameDecoder()
    while (frame := decoder.next_frame()) is None:
        decoder.feed(await stream.receive_some(65536))
    assert frame.type == MsgType.HELLO_OK
    return stream


@pytest.mark.parametrize("limit", ["send_timeout", "session_ttl"])
def test_a_client_that_stops_reading_is_cut_off_while_another_is_served(model, tmp_path, limit):
    # Before, sends had no deadline and the TTL was only checked between messages: such a client
    # held its session (and a slot) for as long as it liked.
    config = dict(idle_timeout=120, send_timeout=1.0 if limit == "send_timeout" else 120,
                  session_ttl=2.0 if limit == "session_ttl" else 120)

    async def main():
        async with tls_server(tmp_path, model=model, **config) as (server, cfg):
            stream = await _open_session(cfg, model)
            seq = 1  # PINGs echoing 1 MB each: the replies pile up unread

            async def flood():
                nonlocal seq
                with trio.move_on_after(30):
                    try:
                        while True:
                            await stream.send_all(frame_bytes(MsgType.PING, {"data": np.zeros(1 << 17, np.int64)}, seq))
                            seq += 1
                    except trio.BrokenResourceError:
                        pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                await _served_meanwhile(cfg, model)
                code = "send_timeout" if limit == "send_timeout" else "session_expired"
                await _until(lambda: server.cut_off[code] == 1, 30)
                await _until(lambda: server.active == 0, 10)
                nursery.cancel_scope.cancel()
            assert sum(server.cut_off.values()) == 1
            async with connect(cfg) as conn:
                assert (await conn.health())["cut_off"] == {code: 1}
            await _served_meanwhile(cfg, model)
            await trio.aclose_forcefully(stream)
    trio.run(main)


def test_a_slowloris_client_is_cut_off_at_the_idle_timeout(model, tmp_path):
    async def main():
        async with tls_server(tmp_path, model=model, idle_timeout=1.0) as (server, cfg):
            stream = await _open_session(cfg, model)
            frame = frame_bytes(MsgType.PING, {"data": b"x" * 100}, seq=1)
            t0 = trio.current_time()

            async def trickle():
                try:
                    for i in range(len(frame)):  # one byte every 0.2 s: each byte is progress, the frame never is
                        await stream.send_all(frame[i:i + 1])
                        await trio.sleep(0.2)
                except trio.BrokenResourceError:
                    pass
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                await _served_meanwhile(cfg, model)
                got = await read_until_close(stream, timeout=20)
                nursery.cancel_scope.cancel()
            assert [body["code"] for t, body in got if t == MsgType.ERROR] == ["idle_timeout"]
            assert trio.current_time() - t0 < 10 and server.cut_off["idle_timeout"] == 1
    trio.run(main)


@pytest.mark.parametrize("case", ["head_beyond_draft_rows", "unit_beyond_capacity", "embedding_beyond_capacity",
                                  "memory"])
def test_requests_beyond_the_schedule_or_memory_are_refused(model, tmp_path, case):
    # Before, rows were capped only by max_seq_len per request, the head too, and OT_EMB_REQ
    # took any count up to 2^20.
    capacity = 512 if case == "memory" else 64
    requests = {
        # the head sees one row per prefill forward, K+1 <= MAX_DRAFT_LEN + 1 per decode forward (--draft)
        "head_beyond_draft_rows": [(MsgType.MASKED_LINEAR, {"unit": "lm_head",
                                                            "m": np.zeros((MAX_DRAFT_LEN + 2, 64), np.int64)})],
        # 40 + 40 rows of one body unit: each position meets a body unit once, so 80 > 64 is no generation
        "unit_beyond_capacity": [(MsgType.MASKED_LINEAR, {"unit": "layers.0.o", "m": np.zeros((40, 64), np.int64)})] * 2,
        "embedding_beyond_capacity": [(MsgType.OT_EMB_REQ, {"count": 65, "setup": True})],
        # 400 rows of gate/up: 400 * (64 + 2 * 192) * 8 bytes = 1.4 MB > the 1 MB allowed
        "memory": [(MsgType.MASKED_LINEAR, {"unit": "layers.0.gate_up", "m": np.zeros((400, 64), np.int64)})],
    }[case]
    want = "resource_limit" if case == "memory" else "seq_too_long"

    async def main():
        async with tls_server(tmp_path, model=model, session_memory_mb=1) as (server, cfg):
            async with connect(cfg) as conn:
                await conn.open_session("v3", model.fingerprint(), capacity)
                with pytest.raises(RemoteError) as e:
                    for msg_type, body in requests:
                        reply = MsgType.MASKED_LINEAR_OK if msg_type == MsgType.MASKED_LINEAR else MsgType.OT_EMB_TABLE
                        await conn.channel.request(msg_type, body, reply)
                assert e.value.code == want
                conn.session = None
            assert server.cut_off[want] == 1
            await _served_meanwhile(cfg, model)
    trio.run(main)


def test_products_run_in_worker_threads(model, tmp_path, monkeypatch):
    spec = registry.get("v3")
    spec.hook("deal")(spec, model, len(PROMPT) + 6).save(tmp_path / "material")  # the client's W r, made beforehand
    threads = set()
    orig = ring.RingMatrix.matmul

    def spy(self, m):  # from here on only the server multiplies
        threads.add(threading.get_ident())
        return orig(self, m)
    monkeypatch.setattr(ring.RingMatrix, "matmul", spy)

    async def main():
        async with tls_server(tmp_path, model=model) as (server, cfg):
            rep = await run_generation(cfg, model, spec, PROMPT, 6, GREEDY, ignore_eos=True,
                                       options={"material": str(tmp_path / "material")})
            assert rep.result.token_ids == reference_generate(model, PROMPT, 6, GREEDY, stop_ids=())
    trio.run(main)
    assert threads and threading.get_ident() not in threads
