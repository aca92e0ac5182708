"""v3-mpc as a networked protocol: client and server parties over real TLS, exact greedy
generation on a tiny model, the server's recorded view (DESIGN.md s6), refusal of anything but
ring tensors, and single-use triples."""
import math
import os

import numpy as np
import pytest
import torch
import trio

from conftest import build_tiny
from shardlm.models.load import load_model
from shardlm.models.reference import generate as reference_generate
from shardlm.models.sampling import SamplingParams
from shardlm.party.client import connect
from shardlm.party.run import run_generation
from shardlm.protocols import registry
from shardlm.party.transcript import load_transcript, session_dirs
from shardlm.protocols import mpc, ring
from shardlm.protocols.mpc import beaver, service
from shardlm.protocols.mpc.void import VOID
from shardlm.wire.errors import RemoteError
from shardlm.wire.msgtypes import MsgType

from support import assert_uniform_ring, tls_server

GREEDY = SamplingParams()
PROMPT = [5, 77, 31, 200, 9, 14, 150]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    build_tiny("llama", d, seed=3)
    return load_model(str(d))


async def _settle(server):
    with trio.fail_after(10):
        while server.active or server.sessions:
            await trio.sleep(0.01)


def _generate(model, tmp_path, prompt, n, options, **server_cfg):
    async def main():
        async with tls_server(tmp_path, model=model, **server_cfg) as (server, cfg):
            rep = await run_generation(cfg, model, registry.get("v3-mpc"), prompt, n, GREEDY, ignore_eos=True, options=options)
            await _settle(server)
            return rep
    return trio.run(main)


def _simulated_rounds(model, ranges, prompt, generated):
    """Rounds of openings the two-party simulator counts for the same forwards."""
    ex = mpc.MPCExecutor(model, ranges=ranges)
    ex.forward(prompt)
    prefill = ex.e.stats.rounds
    for t in generated[:-1]:
        ex.forward([t])
    return prefill, ex.e.stats.rounds - prefill


def test_greedy_generation_over_tls_equals_the_reference(model, tmp_path):
    """Default settings (dealer triples, wide ranges with secure comparisons)."""
    n = 6
    want = reference_generate(model, PROMPT, n, GREEDY, stop_ids=())
    rep = _generate(model, tmp_path, PROMPT, n, {})
    assert rep.result.token_ids == want
    # one round of openings = one flight each way: the channel's rounds are the engine's rounds
    # (re-shares ride in the flight of the next opening, the reveal ends the forward)
    prefill, decode = _simulated_rounds(model, mpc.Ranges.wide(), PROMPT, want)
    assert rep.stats["prefill"]["rounds"] == prefill
    assert rep.stats["decode"]["rounds"] == decode
    fw = rep.protocol_stats["forwards"]  # what bench reports per token
    assert [f["tokens"] for f in fw] == [len(PROMPT)] + [1] * (n - 1)
    assert sum(f["rounds"] for f in fw) == prefill + decode
    assert all(f["triples_matmul"] == 2 * model.config.n_layers and f["triples_and"] > 0 for f in fw)
    assert rep.offline_ms > 0


def _ring_payloads(msgs):
    out = []
    for m in msgs:
        for v in m.body.values():
            if isinstance(v, np.ndarray):
                out.append(v)
    return out


def test_server_view_structure_uniformity_refusals(model, tmp_path):
    rec = tmp_path / "rec"
    prompts = [[5, 77, 31, 200], [250, 1, 1, 99]]
    opts = {"mpc_ranges": "narrow"}

    async def refused(cfg, *messages):
        async with connect(cfg) as conn:
            await conn.open_session("v3-mpc", model.fingerprint(), 64)
            for t, body, reply in messages[:-1]:
                if reply is None:
                    await conn.channel.send(t, body)
                else:
                    await conn.channel.request(t, body, reply)
            t, body, _ = messages[-1]
            await conn.channel.send(t, body)
            return await _error_code(conn)

    def setup():  # a fresh dealer seed each time: the server refuses a seed it has seen
        seed = np.frombuffer(os.urandom(8 * service.SEED_WORDS), np.int64).copy()
        return MsgType.MPC_SETUP, {"triples": "dealer", "ranges": "narrow", "batch": 1024, "seed": seed}, \
            MsgType.MPC_SETUP_OK
    d = model.config.hidden

    async def main():
        async with tls_server(tmp_path, model=model, record_dir=str(rec), idle_timeout=2) as (server, cfg):
            # a float tensor where ring elements belong is refused: as the input, as an opening
            assert await refused(cfg, setup(), (MsgType.MPC_INPUT, {"m": np.zeros((2, d), np.float32)},
                                              MsgType.MPC_OPEN_OK)) == "malformed"
            assert await refused(cfg, setup(), (MsgType.MPC_INPUT, {"m": np.zeros((2, d), np.int64)}, None),
                                 (MsgType.MPC_OPEN, {"v": np.zeros(2 * 2 * d, np.float64)},
                                  MsgType.MPC_OPEN_OK)) == "malformed"
            # an extra field, a float seed, or anything of another protocol
            assert await refused(cfg, setup(), (MsgType.MPC_INPUT, {"m": np.zeros((2, d), np.int64), "x": 1},
                                              MsgType.MPC_OPEN_OK)) == "malformed"
            assert await refused(cfg, (MsgType.MPC_SETUP, {**setup()[1], "seed": np.zeros(4)},
                                       MsgType.MPC_SETUP_OK)) == "malformed"
            assert await refused(cfg, (MsgType.MASKED_LINEAR, {"unit": "layers.0.qkv", "m": np.zeros((1, d), np.int64)},
                                       MsgType.MASKED_LINEAR_OK)) == "wrong_state"
            # a client that goes silent mid-forward is timed out; one that vanishes frees its session
            async with connect(cfg) as conn:
                await conn.open_session("v3-mpc", model.fingerprint(), 64)
                await conn.channel.request(*setup())
                await conn.channel.send(MsgType.MPC_INPUT, {"m": np.zeros((2, d), np.int64)})
                assert await _error_code(conn) == "idle_timeout"
            async with connect(cfg) as conn:
                await conn.open_session("v3-mpc", model.fingerprint(), 64)
                await conn.channel.request(*setup())
                await conn.channel.send(MsgType.MPC_INPUT, {"m": np.zeros((2, d), np.int64)})
                await conn.channel.stream.aclose()
                conn.session = None
            await _settle(server)
            # ... and the server keeps serving
            reps = [await run_generation(cfg, model, registry.get("v3-mpc"), p, 3, GREEDY, ignore_eos=True, options=opts)
                    for p in prompts]
            await _settle(server)  # every transcript complete (BYE recorded)
            return reps

    reps = trio.run(main)
    for p, rep in zip(prompts, reps):
        assert rep.result.token_ids == reference_generate(model, p, 3, GREEDY, stop_ids=())
    views = [load_transcript(x)[1] for x in session_dirs(rec)[-2:]]

    # (1) structure: the same message types, shapes and byte counts for two different prompts
    def shape_of(msgs):
        return [(m.type, tuple((k, getattr(v, "shape", v)) for k, v in sorted(m.body.items())), m.frame_bytes)
                for m in msgs]
    assert shape_of(views[0]) == shape_of(views[1])
    # (3) no path for plaintext: only the handshake, 0x12xx ring messages and BYE reach the server
    for msgs in views:
        types = {m.type for m in msgs}
        assert types == {MsgType.HELLO, MsgType.MPC_SETUP, MsgType.MPC_INPUT, MsgType.MPC_RESHARE,
                         MsgType.MPC_OPEN, MsgType.BYE}
        assert all(v.dtype == np.int64 for v in _ring_payloads(msgs))
    # (2) uniformity of every ring element the server received (inputs, re-shares, openings)
    payloads = [v for msgs in views for v in _ring_payloads(msgs)]
    assert sum(v.size for v in payloads) > 100_000
    assert_uniform_ring(payloads)


async def _error_code(conn) -> str:
    """The code of the server's refusal. The server sends its own flight of a round while it
    receives the client's, so an opening of its first round may come before the error."""
    with pytest.raises(RemoteError) as e:
        for _ in range(4):
            assert (await conn.channel.recv()).type == MsgType.MPC_OPEN_OK
    return e.value.code


def test_seeded_dealer_triples_combine_and_are_single_use():
    seed = bytes(range(32))
    c, s = beaver.SeededDealerProvider("client", seed, 64), beaver.SeededDealerProvider("server", seed, 64)
    for kind, shapes in (("mul", ((3, 5),)), ("matmul", ((2, 4, 6), (2, 6, 3))), ("and_", ((7,),))):
        tc, ts = getattr(c, kind)(*shapes), getattr(s, kind)(*shapes)
        join = (lambda u, v: u ^ v) if kind == "and_" else (lambda u, v: u + v)
        a, b, cc = (join(x[0], y[1]) for x, y in ((tc.a, ts.a), (tc.b, ts.b), (tc.c, ts.c)))
        op = {"mul": torch.mul, "matmul": torch.matmul, "and_": torch.bitwise_and}[kind]
        assert torch.equal(cc, op(a, b))
        assert tc.a[1] is ts.a[0] is VOID  # each party holds only its own slot
    t = s.mul((4,))
    t.take()
    with pytest.raises(beaver.TripleReuseError):
        t.take()


def test_setups_which_would_replay_triples_are_refused(model, tmp_path):
    """A second set-up in a session, or a dealer seed an earlier session used, would replay triples."""
    seed = np.frombuffer(bytes(range(32)), np.int64).copy()
    setup = {"triples": "dealer", "ranges": "narrow", "batch": 1024, "seed": seed}

    async def session(cfg, body):
        async with connect(cfg) as conn:
            await conn.open_session("v3-mpc", model.fingerprint(), 64)
            await conn.channel.request(MsgType.MPC_SETUP, body, MsgType.MPC_SETUP_OK)
            return conn.channel

    async def main():
        async with tls_server(tmp_path, model=model) as (server, cfg):
            async with connect(cfg) as conn:
                await conn.open_session("v3-mpc", model.fingerprint(), 64)
                await conn.channel.request(MsgType.MPC_SETUP, setup, MsgType.MPC_SETUP_OK)
                with pytest.raises(RemoteError) as again:
                    await conn.channel.request(MsgType.MPC_SETUP, {**setup, "seed": seed + 1}, MsgType.MPC_SETUP_OK)
            with pytest.raises(RemoteError) as replay:
                await session(cfg, setup)
            await session(cfg, {**setup, "seed": seed + 2})  # a fresh seed is accepted
        return again.value, replay.value

    same_session, same_seed = trio.run(main)
    assert same_session.code == "wrong_state" and "single-use" in same_session.message
    assert same_seed.code == "malformed" and "already used" in same_seed.message


def test_ot_triples_over_tls_equal_the_reference_and_the_client_view_is_uniform(model, tmp_path, monkeypatch):
    """Dealer-free triples (IKNP + Gilboa over the session channel, AND triples by random OT) with
    the 'wide' ranges' secure comparisons. Nobody knows the triples, so what the client receives of
    the server's shares is uniform too: the arithmetic openings x - a and the XOR openings x ^ a of
    the AND gates, uniform bits."""
    import dataclasses

    n, rec = 2, tmp_path / "client-view"
    prompts = [PROMPT[:4], [250, 1, 1, 99]]
    opts = {"triples": "ot", "mpc_ranges": "wide", "triple_batch": 1 << 12}
    # which of the client's opening rounds are XOR (AND gates), to sort its recorded MPC_OPEN_OK
    # messages: the client party runs in this process (the server too: told apart by role)
    rounds, open_with = [], mpc.Engine._open_with

    def logged(self, xs, combine, bits=64, sender=None):
        assert set(sender or ["both"]) == {"both"}  # with OT triples every value is masked by both
        if self.role == "client":  # the message's ring elements: values travel packed to the bits read
            widths = [ring.lane_bits(b) for b in ([bits] * len(xs) if isinstance(bits, int) else bits)]
            size = sum(-(-sum(x.c.numel() for x, lw in zip(xs, widths) if lw == w) * w // 64) for w in (1, 16, 32, 64))
            rounds.append((combine is torch.bitwise_xor, size))
        return open_with(self, xs, combine, bits, sender)
    monkeypatch.setattr(mpc.Engine, "_open_with", logged)

    async def main():
        async with tls_server(tmp_path, model=model) as (server, cfg):
            cfg = dataclasses.replace(cfg, record_dir=str(rec))
            return [await run_generation(cfg, model, registry.get("v3-mpc"), p, n, GREEDY, ignore_eos=True, options=opts)
                    for p in prompts]

    for p, rep in zip(prompts, trio.run(main)):
        assert rep.result.token_ids == reference_generate(model, p, n, GREEDY, stop_ids=())
        assert rep.stats["ot-base"]["rounds"] >= 1  # the base OTs ran, in the offline phase
        assert all(f["triples_and"] > 0 for f in rep.protocol_stats["forwards"])  # comparisons ran
    views = [load_transcript(x)[1] for x in session_dirs(rec)]
    assert [meta["role"] for meta in (load_transcript(x)[0] for x in session_dirs(rec))] == ["client"] * 2
    assert [(m.type, m.frame_bytes) for m in views[0]] == [(m.type, m.frame_bytes) for m in views[1]]
    opened = [m.body["v"] for v in views for m in v if m.type == MsgType.MPC_OPEN_OK]
    assert [o.size for o in opened] == [size for _, size in rounds]  # one message per round, in order
    arith = [o for o, (xor, _) in zip(opened, rounds) if not xor]
    xor = np.concatenate([o.reshape(-1) for o, (x, _) in zip(opened, rounds) if x])
    assert sum(o.size for o in arith) > 50_000 and xor.size > 20_000
    assert_uniform_ring(arith)  # the server's shares of x - a: a uniform, known to nobody
    assert_uniform_ring([xor])  # ... and of x ^ a in the AND gates
    bits = np.unpackbits(xor.view(np.uint8), bitorder="little").reshape(-1, 64)  # by bit position
    assert (np.abs(bits.mean(0) - 0.5) < 5 * 0.5 / math.sqrt(len(bits))).all()


def test_cli_generate_v3_mpc_between_two_processes(tmp_path):
    """`shardlm generate --protocol v3-mpc` against a `shardlm serve` process (tiny model)."""
    import json

    from test_generate_cli import _serve, shardlm

    d = tmp_path / "tiny"
    build_tiny("llama", d, seed=3)
    with _serve(str(d)) as srv:
        net = srv.client_args
        common = ["generate", *net, "-m", str(d), "-p", "hello world", "--raw", "--protocol", "v3-mpc",
                  "--max-tokens", "3", "--threads", "1", "--json"]
        # the offline phase ahead of time: mask material over v3-mpc's ring weights
        shardlm("preprocess", "-m", str(d), "--protocol", "v3-mpc", "--tokens", "16", "--out", str(tmp_path / "st"))
        out = json.loads(shardlm(*common, "--mpc-ranges", "narrow", "--triple-batch", "4096", "--material",
                                 str(tmp_path / "st")).stdout)
        tiny = load_model(str(d))
        assert out["token_ids"] == reference_generate(tiny, tiny.tokenizer.encode("hello world"), 3, GREEDY,
                                                      stop_ids=tiny.eos_ids)
        assert out["private"] is True and out["protocol"] == "v3-mpc"
        assert all(n > 0 for n in json.loads((tmp_path / "st" / "cursor.json").read_text()).values())  # rows used
        fw = out["protocol_stats"]["forwards"]
        assert len(fw) == len(out["token_ids"]) and all(f["triples_mul"] > 0 for f in fw)
        # dealer-free triples with the default (wide) ranges: AND triples by OT for the comparisons
        ot = json.loads(shardlm(*common, "--triples", "ot", "--triple-batch", "4096").stdout)
        assert ot["token_ids"] == out["token_ids"]
        assert all(f["triples_and"] > 0 for f in ot["protocol_stats"]["forwards"])


def test_party_engines_over_a_memory_stream_pair_compute_what_the_simulator_does():
    """The same engine code, one party per sync_driver greenlet, over an in-memory stream pair (no TLS): shares,
    products, the exact comparison, softmax and the reveal."""
    import trio.testing

    from shardlm.party import sync_driver
    from shardlm.party.channel import Channel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=g) * 3
    mask = torch.tril(torch.ones(6, 10, dtype=torch.bool), diagonal=4)
    seed = os.urandom(32)

    def program(e, x_or_none):
        X = e.share(x_or_none, shape=(6, 10))
        prod, sq = e.mul_many([(X, X), (X, e.add_public(X, 1.0))])
        soft = e.softmax(X, mask=mask)
        return [e.reveal(v) for v in (prod, sq, e.relu(X), soft)]

    async def main():
        a, b = trio.testing.memory_stream_pair()
        out = {}

        async def party(role, stream):
            t = service.ChannelTransport(Channel(stream), role)
            e = mpc.Engine(beaver.SeededDealerProvider(role, seed, 256), transport=t)
            e.exact_max = True
            out[role] = await sync_driver.drive(program, e, x if role == "client" else None)
            out[role + "_rounds"] = e.stats.rounds

        async with trio.open_nursery() as n:
            n.start_soon(party, "client", a)
            n.start_soon(party, "server", b)
        return out

    out = trio.run(main)
    sim = mpc.Engine()
    sim.exact_max = True
    want = program(sim, x)
    assert out["server"] == [None] * 4  # only the client learns revealed values
    assert out["client_rounds"] == out["server_rounds"] == sim.stats.rounds
    xd = x.double()
    exact = [xd * xd, xd * (xd + 1), xd.clamp_min(0), torch.softmax(xd.masked_fill(~mask, -math.inf), -1)]
    for i, (got, ref, truth) in enumerate(zip(out["client"], want, exact)):
        assert (got - truth).abs().max() < 2e-3
        # party and simulator agree up to truncation ulps, which exp's squarings amplify in the
        # softmax (its documented budget, as in test_mpc_units: 1e-4 + 5e-3 relative)
        budget = 1e-4 + (5e-3 * ref.abs() if i == 3 else 0)
        assert ((got - ref).abs() <= budget).all(), (i, (got - ref).abs().max())
