"""The OT engine between two processes over real TLS: a `shardlm serve` child process runs the
`ot` protocol; this process is the other party. Plus the OT benchmark (protocols/ot/bench_ot.py)."""
import json

import numpy as np
import pytest
import trio
from click.testing import CliRunner

from shardlm.party import launch
from shardlm.party.client import connect
from shardlm.protocols.ot import bench_ot
from shardlm.protocols.ot.service import OtClient, synthetic_inputs, synthetic_table
from shardlm.wire.errors import RemoteError


@pytest.fixture(scope="module")
def server():
    with launch.server() as srv:
        assert "ot" in srv.event["protocols"]
        yield srv.client_config(timeout=60)


def _session(cfg, fn):
    async def main():
        async with connect(cfg) as conn:
            await conn.open_session("ot")
            return await fn(OtClient(conn.channel))

    return trio.run(main)


def test_all_ot_kinds_with_the_server_as_sender_over_tls(server):
    n, seed = 70_000, 11  # more than one chunk

    async def fn(ot):
        r = await ot.batch("random", n, seed=seed, reveal=True)
        c = await ot.batch("correlated", n, seed=seed, reveal=True)
        h = await ot.batch("chosen", 5000, seed=seed, nbytes=40)
        return r, c, h

    r, c, h = _session(server, fn)
    choice = r["inputs"]["choices"].astype(bool)
    srv = r["done"]["outputs"]
    assert r["setup_seconds"] > 0 and r["done"]["count"] == n
    assert np.array_equal(r["mine"]["m"], np.where(choice[:, None], srv["m1"], srv["m0"]))

    cc = c["inputs"]["choices"].astype(np.uint64)
    delta = synthetic_inputs("correlated", "sender", n, seed)["delta"]
    assert np.array_equal(c["mine"]["m"], c["done"]["outputs"]["x"] + cc * delta)

    msgs = synthetic_inputs("chosen", "sender", 5000, seed, 40)
    hc = h["inputs"]["choices"].astype(bool)[:, None]
    assert "outputs" not in h["done"]  # nothing revealed unless asked
    assert np.array_equal(h["mine"]["m"], np.where(hc, msgs["msg1"], msgs["msg0"]))


def test_server_as_receiver_over_tls(server):
    n, seed = 3000, 5

    async def fn(ot):
        return await ot.batch("chosen", n, server_role="receiver", seed=seed, nbytes=16, reveal=True)

    res = _session(server, fn)
    their_c = synthetic_inputs("chosen", "receiver", n, seed)["choices"].astype(bool)[:, None]
    mine = res["inputs"]
    assert np.array_equal(res["done"]["outputs"]["m"], np.where(their_c, mine["msg1"], mine["msg0"]))


def test_embedding_retrieval_over_tls(server):
    spec = {"rows": 5000, "cols": 64, "seed": 3}
    ids = np.array([4999, 0, 1234, 1234, 77])

    async def fn(ot):
        first = await ot.retrieve_rows(ids, table=spec)
        second = await ot.retrieve_rows(ids[::-1], table=spec)  # reuses the extension
        return first, second, ot.channel.stats

    first, second, stats = _session(server, fn)
    table = synthetic_table(5000, 64, 3)
    assert np.array_equal(first, table[ids]) and np.array_equal(second, table[ids[::-1]])
    assert stats["ot-base"].bytes_received > 0
    assert stats["emb-table"].bytes_received >= 2 * 5000 * 64 * 4


def test_requests_out_of_order_get_a_clear_error(server):
    async def fn(ot):
        from shardlm.wire.msgtypes import MsgType
        await ot.channel.send(MsgType.OT_REQ, {"role": "sender", "kind": "random", "count": 10, "setup": False})
        with pytest.raises(RemoteError, match="no OT extension") as info:
            await ot.channel.recv()
        return info.value.code

    assert _session(server, fn) == "wrong_state"


def test_ot_bench_command():
    result = CliRunner().invoke(bench_ot.main, ["--count", "2^16", "--kind", "random", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["count"] == 65536 and out["ots_per_s"] > 0 and out["base_ot_seconds"] > 0
    assert 16.0 <= out["bytes_per_ot"] < 16.1
    assert out["transport"].startswith("TLS")


def test_ot_bench_embedding_mode_reports_the_cost_formula():
    result = CliRunner().invoke(bench_ot.main, ["--embedding", "1000x8", "--count", "3", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["rows_correct"] and out["tokens"] == 3
    # measured traffic = the formula plus a little framing
    assert out["formula"]["total"] <= out["bytes_per_token"] * 3 <= out["formula"]["total"] + 2048
