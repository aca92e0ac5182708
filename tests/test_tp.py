"""Tensor parallelism (protocols/tp, serve --tp): sharded products are the one-rank products bit
for bit, over gloo between real processes; a served generation equals the reference; a lost rank
fails the next product with a clear error in bounded time."""
import os
import signal
import sys
import time

import pytest
import torch
import trio

from conftest import build_tiny, tiny_llama_dir
from shardlm.models.reference import generate
from shardlm.models.sampling import SamplingParams
from shardlm.party import launch
from shardlm.party.client import connect
from shardlm.party.run import run_generation
from shardlm.protocols import registry, ring, tp
from shardlm.protocols.units import blocks, matrix_for, units_for
from shardlm.wire.errors import RemoteError

PROMPT = "hello"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory, seed=21)


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def test_a_ranks_rows_are_the_full_matrix_rows(tiny):
    """Shards built from their own rows' weights (a composite's cross rows by ring.compose on T's
    rows alone) multiply exactly as the full matrix's rows, for 2 and 3 ranks."""
    _, model = tiny
    for variant in tp.VARIANTS:
        for size in (2, 3):
            shards = [tp.Shards(model, "cpu", r, size) for r in range(size)]
            for s in shards:
                s.build(variant)
            for i, u in enumerate(units_for(model.plan, variant).values()):
                m = ring.random_ring(3, u.in_dim)
                full = matrix_for(model, u).matmul(m)
                for r, s in enumerate(shards):
                    part, at = s.product(variant, i, m), 0
                    for *_, o0, n in blocks(u):
                        lo, hi = tp.shard_rows(n, size, r)
                        assert torch.equal(part[:, at:at + hi - lo], full[:, o0 + lo:o0 + hi]), (variant, u.name, r)
                        at += hi - lo
                    assert at == part.shape[1] == s.width(variant, i, r)


def _worker_argv(d, timeout: float = 60) -> list[str]:
    return [sys.executable, "-m", "shardlm.cli", "serve", "-m", str(d), "--tp", "2", "--threads", "1",
            "--tp-timeout", str(timeout)]


def test_gloo_products_between_two_processes_equal_one_rank(tiny):
    """This process is rank 0, a real `serve --tp 2` worker process rank 1: every unit of v3 and
    v3-2r, at 1, 3 and 9 rows (the int8 and the float64 kernels), equals the full matrix's product."""
    d, model = tiny
    store, workers = tp.spawn_workers(2, _worker_argv(d))
    try:
        coordinator = tp.Coordinator(tp.Group(model, "cpu", 2, 0, timeout=60, store=store), workers)
        try:
            for variant in ("v3", "v3-2r"):
                sharded = coordinator.matrices(variant)
                for name, u in units_for(model.plan, variant).items():
                    W = matrix_for(model, u)
                    assert (sharded[name].in_dim, sharded[name].out_dim) == (W.in_dim, W.out_dim)
                    for rows in (1, 3, 9):
                        m = ring.random_ring(rows, u.in_dim)
                        assert torch.equal(sharded[name].matmul(m), W.matmul(m)), (variant, name, rows)
            info = coordinator.describe()
            assert info["status"] == "ok" and info["size"] == 2 and info["collective_bytes"] > 0
            shapes = info["shards"]["v3"]
            for name, u in units_for(model.plan, "v3").items():  # each rank holds its half of the rows
                assert [s["units"][name][0][0] for s in shapes] == [u.out_dim // 2, u.out_dim - u.out_dim // 2]
        finally:
            coordinator.close()
        assert workers[0].wait(timeout=30) == 0  # stopped by rank 0, not killed
    finally:
        for w in workers:
            w.kill()


def test_a_rank_that_stops_answering_fails_within_the_timeout(tiny):
    """An idle group outlives its timeout (heartbeats); a frozen worker (SIGSTOP: its connection
    stays open, so only the group's timeout can tell) fails the next product after about
    --tp-timeout seconds, not never; later ones at once."""
    d, model = tiny
    store, workers = tp.spawn_workers(2, _worker_argv(d, timeout=3))
    try:
        coordinator = tp.Coordinator(tp.Group(model, "cpu", 2, 0, timeout=3, store=store), workers)
        try:
            W = coordinator.matrices("v3")["lm_head"]
            m = ring.random_ring(2, W.in_dim)
            time.sleep(4)  # idle longer than the timeout: the heartbeat keeps the waiting worker in the group
            assert torch.equal(W.matmul(m), matrix_for(model, units_for(model.plan, "v3")["lm_head"]).matmul(m))
            os.kill(workers[0].pid, signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(tp.TPFailure, match="tensor-parallel rank is lost"):
                W.matmul(m)
            assert 2 < time.monotonic() - t0 < 30
            t0 = time.monotonic()
            with pytest.raises(tp.TPFailure, match="restart it"):
                W.matmul(m)
            assert time.monotonic() - t0 < 1 and coordinator.describe()["status"].startswith("failed")
        finally:
            workers[0].kill()
            coordinator.close()
    finally:
        for w in workers:
            w.kill()


def test_ranks_with_different_models_refuse(tiny, tmp_path):
    d, model = tiny
    other = tmp_path / "other"
    build_tiny("llama", other, seed=22)
    store, workers = tp.spawn_workers(2, _worker_argv(other))
    try:
        with pytest.raises(ValueError, match="tensor-parallel ranks hold different models"):
            tp.Group(model, "cpu", 2, 0, timeout=60, store=store)
        assert workers[0].wait(timeout=60) != 0
    finally:
        torch.distributed.destroy_process_group()
        for w in workers:
            w.kill()


def _generate(srv, model, protocol, ids, tokens=5):
    """A real client in this process, over pinned TLS to the server process."""
    return trio.run(lambda: run_generation(srv.client_config(timeout=120), model, registry.get(protocol), ids, tokens,
                                           SamplingParams(), ignore_eos=True)).result.token_ids


def _info(srv) -> dict:
    async def ask():
        async with connect(srv.client_config(timeout=60)) as conn:
            return await conn.info()
    return trio.run(ask)


def test_serve_tp2_greedy_over_tls_then_a_lost_rank(tiny, tmp_path):
    """A real `shardlm serve --tp 2` (it starts its worker rank) and a real client: v3 and v3-2r
    greedy tokens equal the reference, info shows both ranks' shards; then rank 1 is killed and
    the next generation fails with the lost-rank error well within the group timeout's bound."""
    d, model = tiny
    ids = model.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    want = generate(model, ids, 5, SamplingParams(), stop_ids=())
    with launch.server(["--model", str(d), "--tp", "2", "--tp-timeout", "10", "--threads", "1", "--preload", "v3"],
                       env=_env(SHARDLM_HOME=str(tmp_path))) as srv:
        assert srv.event["tp"]["size"] == 2 and len(srv.event["tp"]["worker_pids"]) == 1
        for protocol in ("v3", "v3-2r"):
            assert _generate(srv, model, protocol, ids) == want, protocol
        info = _info(srv)["tp"]
        assert info["status"] == "ok" and info["products"] > 0
        assert set(info["shards"]) == {"v3", "v3-2r"} and [r["rank"] for r in info["shards"]["v3"]] == [0, 1]

        worker = srv.event["tp"]["worker_pids"][0]
        os.kill(worker, 9)
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as failed:
            _generate(srv, model, "v3", ids)
        elapsed = time.monotonic() - t0
        assert failed.value.code == "internal" and "tensor-parallel rank is lost" in failed.value.message
        assert f"pid {worker}" in failed.value.message
        assert elapsed < 60, elapsed  # the group's timeout (10 s) bounds it; gloo sees the closed connection at once
        assert _info(srv)["tp"]["status"].startswith("failed")


@pytest.mark.slow
def test_serve_tp2_smollm2_greedy(smollm2, tmp_path):
    """SmolLM2 served by two ranks over gloo: v3 greedy tokens equal the reference."""
    ids = smollm2.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    want = generate(smollm2, ids, 3, SamplingParams(), stop_ids=())
    with launch.server(["--model", "smollm2", "--tp", "2", "--threads", "1", "--preload", "v3"], env=_env()) as srv:
        assert _generate(srv, smollm2, "v3", ids, tokens=3) == want
