"""Cross-session batching (party/batching.py) and the load test (party/loadtest.py).

The scheduler runs in-process over a tiny model's real ring matrices; the sessions run over real
TLS (an in-process server on a loopback socket) and, once, against a SmolLM2 server process."""
import json
import os
import subprocess
import sys

import pytest
import torch
import trio

from conftest import tiny_llama_dir
from support import tls_server
from shardlm.models.reference import generate
from shardlm.models.sampling import SamplingParams
from shardlm.party import launch, loadtest
from shardlm.party.batching import Batcher, BatchError
from shardlm.party.run import run_generation
from shardlm.protocols import registry, ring
from shardlm.protocols.units import matrix_for, units_for

PROMPT = "hello"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory, seed=5)


def _matrices(model, variant="v3") -> list[ring.RingMatrix]:
    return [matrix_for(model, u, "cpu") for u in units_for(model.plan, variant).values()]


async def _with_batcher(batcher: Batcher, body):
    with trio.fail_after(60):
        return await _batcher_running(batcher, body)


async def _batcher_running(batcher: Batcher, body):
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        try:
            return await body()
        finally:
            nursery.cancel_scope.cancel()


def test_batched_products_equal_lone_products_bit_for_bit(tiny):
    """Sessions with different row counts (1, 3, 7, 64 rows) walk the same units concurrently;
    every reply equals that session's product computed alone, and products were shared."""
    _, model = tiny
    mats = _matrices(model)
    counts = {"a": 1, "b": 3, "c": 7, "d": 64, "e": 1}
    batcher = Batcher(trio.CapacityLimiter(1), window=5.0, max_rows=80)
    got, want = {}, {}

    async def session(name: str) -> None:
        for step in range(2):  # two passes over the schedule, like two forwards
            for order, W in enumerate(mats):
                m = ring.random_ring(counts[name], W.in_dim)
                got[name, step, order] = await batcher.product(name, W, W.matmul, m, order)
                want[name, step, order] = W.matmul(m)
                await trio.sleep(0)
        batcher.leave(name)  # its session ends

    async def body():
        async with trio.open_nursery() as n:
            for name in counts:
                n.start_soon(session, name)
        return batcher.stats()

    stats = trio.run(_with_batcher, batcher, body)
    assert got.keys() == want.keys() and len(got) == 2 * len(counts) * len(mats)
    for k in got:
        assert torch.equal(got[k], want[k]), k
    assert stats["shared_batches"] > 0 and stats["mean_requests"] > 1
    assert stats["max_rows_seen"] <= 80
    # nothing waited out its window: the 5 s window would have taken minutes
    assert stats["early_dispatches"] == stats["batches"]


def test_lone_session_is_dispatched_at_once(tiny):
    """One session, a 60 s window: every product goes at once (no other session could join),
    counted as an early dispatch, never a window expiry."""
    _, model = tiny
    mats = _matrices(model)
    batcher = Batcher(trio.CapacityLimiter(1), window=60.0, max_rows=64)

    async def body():
        for W in mats:
            m = ring.random_ring(1, W.in_dim)
            assert torch.equal(await batcher.product("only", W, W.matmul, m), W.matmul(m))
        return batcher.stats()

    stats = trio.run(_with_batcher, batcher, body)
    assert stats["batches"] == len(mats) == stats["immediate_dispatches"] and stats["shared_batches"] == 0


def test_an_idle_session_is_waited_for_once(tiny):
    """Session a has a product, then goes idle (a chat waiting for its user); session b's next
    products wait for a at most once (a might still come), then go at once."""
    _, model = tiny
    mats = _matrices(model)
    batcher = Batcher(trio.CapacityLimiter(1), window=0.3, max_rows=64)

    async def body():
        W = mats[0]
        await batcher.product("a", W, W.matmul, ring.random_ring(1, W.in_dim))
        await trio.sleep(0.01)
        for W in mats * 2:
            await batcher.product("b", W, W.matmul, ring.random_ring(1, W.in_dim))
        return batcher.stats()

    stats = trio.run(_with_batcher, batcher, body)
    assert stats["batches"] == 1 + 2 * len(mats) and stats["shared_batches"] == 0
    assert stats["immediate_dispatches"] == stats["batches"] - 1  # only b's first product waited


def test_a_session_behind_is_waited_for_and_one_ahead_is_not(tiny):
    """Session a waits at unit 2 while b is still at unit 0: a's batch waits (b may come), b's
    unit-0 batch goes at once (a went past it), b's unit 2 joins a's batch."""
    _, model = tiny
    W0, _, W2 = _matrices(model)[:3]
    batcher = Batcher(trio.CapacityLimiter(1), window=60.0, max_rows=64)

    async def body():
        results = {}

        async def a():
            results["a"] = await batcher.product("a", W2, W2.matmul, ring.random_ring(1, W2.in_dim), 2)

        async def b():
            await batcher.product("b", W0, W0.matmul, ring.random_ring(1, W0.in_dim), 0)
            results["b"] = await batcher.product("b", W2, W2.matmul, ring.random_ring(2, W2.in_dim), 2)

        batcher._sessions.update({"a", "b"})  # both have sessions open
        async with trio.open_nursery() as n:
            n.start_soon(a)
            await trio.sleep(0.05)
            n.start_soon(b)
        return batcher.stats()

    stats = trio.run(_with_batcher, batcher, body)
    assert stats["batches"] == 2 and stats["shared_batches"] == 1 and stats["rows"] == 4


def test_an_error_reaches_every_session_of_the_batch_and_a_cancelled_one_loses_nobody_s_rows(tiny):
    _, model = tiny
    W = _matrices(model)[0]
    batcher = Batcher(trio.CapacityLimiter(1), window=60.0, max_rows=64)

    def broken(m):
        raise ValueError("boom")

    async def body():
        errors = []
        batcher._sessions.update({"x", "y", "z"})  # three open sessions: one batch for the three

        async def fails(name):
            try:
                await batcher.product(name, "broken", broken, ring.random_ring(1, W.in_dim))
            except BatchError as exc:
                errors.append((name, str(exc)))

        async with trio.open_nursery() as n:
            for name in ("x", "y", "z"):
                n.start_soon(fails, name)
        assert sorted(e[0] for e in errors) == ["x", "y", "z"] and all("boom" in e[1] for e in errors)
        for name in ("x", "y", "z"):
            batcher.leave(name)
        # a session cancelled while its rows wait in a batch: the other still gets exactly its rows
        batcher._sessions.add("late")  # one more open session, so the batch waits for it
        m_keep = ring.random_ring(2, W.in_dim)
        out = {}

        async def keep():
            out["keep"] = await batcher.product("keep", W, W.matmul, m_keep)

        gone = trio.CancelScope()

        async def cancelled():
            with gone:
                await batcher.product("gone", W, W.matmul, ring.random_ring(3, W.in_dim))

        async with trio.open_nursery() as n:
            n.start_soon(keep)
            await trio.sleep(0.05)
            n.start_soon(cancelled)
            await trio.sleep(0.05)
            gone.cancel()
            await trio.sleep(0.05)
            assert "keep" not in out  # still waiting: "late" may come
            batcher.leave("late")  # now no one else can join: the batch goes
        assert torch.equal(out["keep"], W.matmul(m_keep))
        return batcher.stats()

    stats = trio.run(_with_batcher, batcher, body)
    assert stats["shared_batches"] == 2


def _generate_concurrently(cfg, model, ids, tokens, n, protocol="v3"):
    spec = registry.get(protocol)
    out = {}

    async def one(i):
        rep = await run_generation(cfg, model, spec, ids, tokens, SamplingParams(), ignore_eos=True)
        out[i] = rep.result.token_ids

    async def main():
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    return main, out


def test_two_concurrent_v3_sessions_over_tls_are_batched_and_exact(tiny, tmp_path):
    d, model = tiny
    ids = model.tokenizer.encode_prompt(PROMPT)
    want = generate(model, ids, 6, SamplingParams(), stop_ids=())

    async def main():
        async with tls_server(tmp_path, model=model, batch_window=1.0) as (server, cfg):
            run, out = _generate_concurrently(cfg, model, ids, 6, 2)
            await run()
            return out, server.batcher.stats(), server.health()["batching"]

    out, stats, health = trio.run(main)
    assert out == {0: want, 1: want}
    assert stats["shared_batches"] > 0 and stats["mean_requests"] > 1 and health == stats


def test_load_test_with_eight_clients_on_a_tiny_model(tiny, tmp_path):
    """`bench --clients 8` against one server process: every session's tokens are the
    reference's (the load test checks them), the server's CPU and RSS were read, and its
    products were batched."""
    d, model = tiny
    with launch.server(["--model", str(d), "--threads", "1", "--preload", "v3", "--no-cache"]) as srv:
        proc = subprocess.run([sys.executable, "-m", "shardlm.cli", "bench", *srv.client_args, "-m", str(d),
                               "--protocol", "v3", "--clients", "8", "--runs", "1", "--max-tokens", "5",
                               "--server-pid", str(srv.proc.pid), "--threads", "1", "--json"],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    [report] = json.loads(proc.stdout)["load_tests"]
    assert report["all_correct"] and len(report["sessions"]) == 8 and not report["failed"]
    assert {s["status"] for s in report["sessions"]} == {"ok"}
    assert len({s["session_id"] for s in report["sessions"]}) == 8
    assert report["decode_tokens"] == 8 * 4 and report["latency_ms"]["n"] == 8 * 4
    srv_rep = report["server"]
    assert srv_rep["cpu_s"] > 0 and srv_rep["rss_mb_max"] > 0
    assert srv_rep["batching"]["shared_batches"] > 0 and srv_rep["batching"]["mean_rows"] > 1


@pytest.mark.slow
def test_two_concurrent_smollm2_v3_sessions_are_batched_and_exact(smollm2, tmp_path):
    model = smollm2
    ids = model.tokenizer.encode("The capital of France is")  # raw and short: a cheap prefill
    want = generate(model, ids, 3, SamplingParams(), stop_ids=())
    with launch.server(["--model", "smollm2", "--threads", "1", "--preload", "v3"]) as srv:
        cfg = srv.client_config(timeout=300)
        run, out = _generate_concurrently(cfg, model, ids, 3, 2)
        trio.run(run)
        stats = trio.run(loadtest._server_stats, cfg)
    assert out == {0: want, 1: want}
    assert stats["shared_batches"] > 0 and stats["mean_requests"] > 1
