"""`--offline dealer`: a dealer process deals exact, single-use mask material, and never the server."""
import contextlib
import json
import os
import secrets
import subprocess
import sys

import pytest
import torch
import trio
from click.testing import CliRunner

from conftest import build_tiny
from shardlm.cli import cli
from shardlm.models.load import load_model
from shardlm.models.reference import generate as reference_generate
from shardlm.models.sampling import SamplingParams
from shardlm.party import launch
from shardlm.party.client import ClientConfig, connect
from shardlm.party.run import run_generation
from shardlm.party.server import Server, ServerConfig
from shardlm.protocols import dealer, preprocess, registry, ring, units
from shardlm.wire import tls
from shardlm.wire.errors import ProtocolError, RemoteError
from shardlm.wire.msgtypes import MsgType

from support import tls_server

GREEDY = SamplingParams()
PROMPT = [5, 77, 31, 200, 9, 14]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    build_tiny("llama", d, seed=3)
    return d, load_model(str(d))


@pytest.fixture(scope="module")
def dealer_proc(tiny):
    with launch.dealer(["-m", str(tiny[0]), "--threads", "1", "--max-seq-len", "512"]) as proc:
        yield proc


def _fetch(proc, model, variant, rows, **kw):
    return trio.run(lambda: dealer.fetch(proc.address, proc.fingerprint, model_fingerprint=model.fingerprint(),
                                         variant=variant, rows=rows, plan=model.plan, **kw))


def _assert_exact(store, model, variant, rows):
    matrices = units.matrices_for(model, variant)  # the full model's ring weights, as a client with weights has
    assert {n: p.rows for n, p in store.pools.items()} == rows
    for name, p in store.pools.items():
        W = matrices[name]
        assert p.wr.shape == (rows[name], W.out_dim) and p.in_dim == W.in_dim
        assert torch.equal(p.wr, W.matmul(ring.mask_rows(p.seed, 0, p.rows, W.in_dim))), name


@pytest.mark.parametrize("variant", ["v2", "v3", "v3-2r"])
def test_the_dealer_deals_exact_products_for_the_rows_asked(tiny, dealer_proc, variant):
    _, model = tiny
    rows = units.rows_needed(units.units_for(model.plan, variant), 7, 5)
    said = []
    store = _fetch(dealer_proc, model, variant, rows, progress=lambda msg, last: said.append((msg, last)))
    _assert_exact(store, model, variant, rows)
    assert len(said) == len(rows) and said[-1] == (f"offline: mask material from the dealer {len(rows)}/{len(rows)} "
                                                   "units", True) and not any(last for _, last in said[:-1])
    store.check_for(model.fingerprint(), variant, units.FIXED_POINT)
    assert store.meta["source"] == "dealer" and store.meta["dealer_seconds"] > 0
    assert store.meta["dealer_fingerprint"] == dealer_proc.fingerprint
    assert len({p.seed for p in store.pools.values()}) == len(rows)  # a fresh seed per unit


def test_a_unit_larger_than_a_frame_slice_arrives_in_parts_and_stays_exact(tiny, tmp_path, monkeypatch):
    # an in-process dealer with tiny slices: every unit is split over several DEAL_PARTs
    _, model = tiny
    monkeypatch.setattr(dealer, "PART_BYTES", 3000)
    rows = {n: 40 for n in units.units_for(model.plan, "v3")}
    sizes = []

    async def main():
        async with _inprocess_dealer(tmp_path, model) as cfg:
            async with connect(cfg) as conn:
                await conn.open_session("dealer", model.fingerprint(), 64)
                await conn.channel.send(MsgType.DEAL_REQ, _req(model, "v3", {"lm_head": 40}))
                sizes.extend(p["wr"].shape[0] for p in await _parts(conn.channel))
            return await dealer.fetch(cfg.server, cfg.fingerprint, model_fingerprint=model.fingerprint(),
                                      variant="v3", rows=rows, plan=model.plan)

    store = trio.run(main)
    assert len(sizes) > 1 and sum(sizes) == 40  # 300 columns of 8 bytes: 1 row per 3000-byte slice
    _assert_exact(store, model, "v3", rows)


@pytest.mark.parametrize("variant", ["v3", "v3-2r"])
def test_generation_with_dealt_material_equals_the_reference(tiny, dealer_proc, tmp_path, variant):
    d, model = tiny
    n = 12
    rows = units.rows_needed(units.units_for(model.plan, variant), len(PROMPT), n)
    with launch.server(["-m", str(d), "--threads", "1"]) as srv:
        assert "dealer" not in srv.event["protocols"]  # `serve` never deals
        store = _fetch(dealer_proc, model, variant, rows, server_fingerprint=srv.fingerprint)
        store.save(tmp_path / "material")
        rep = trio.run(lambda: run_generation(srv.client_config(timeout=60), model, registry.get(variant), PROMPT, n,
                                              GREEDY, ignore_eos=True, options={"material": str(tmp_path / "material")}))
    assert rep.result.token_ids == reference_generate(model, PROMPT, n, GREEDY, stop_ids=())
    # the run used the store: its cursor marks every row taken (a second run is refused)
    assert json.loads((tmp_path / "material/cursor.json").read_text()) == rows


@pytest.fixture(scope="module")
def family_dealers(tmp_path_factory):
    """Per family: (tiny model, a dealer process holding it)."""
    with contextlib.ExitStack() as stack:
        out = {}
        for family in ("llama", "qwen2", "gpt2"):
            d = tmp_path_factory.mktemp(family)
            build_tiny(family, d, seed=4)
            out[family] = (load_model(str(d)), stack.enter_context(launch.dealer(["-m", str(d), "--threads", "1"])))
        yield out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("variant", ["v3", "v3-2r"])
def test_offline_dealer_generation_equals_the_reference_on_every_family(family_dealers, tmp_path, family, variant):
    """The `--offline dealer` source itself (first chunk in set-up, decode rows from it), against an
    in-process TLS server: greedy output equals the reference."""
    model, proc = family_dealers[family]
    options = {"offline_mode": "dealer", "dealer": proc.address, "dealer_fingerprint": proc.fingerprint}

    async def main():
        async with tls_server(tmp_path, model=model) as (server, cfg):
            return await run_generation(cfg, model, registry.get(variant), PROMPT, 10, GREEDY, ignore_eos=True,
                                        options=options)
    rep = trio.run(main)
    assert rep.result.token_ids == reference_generate(model, PROMPT, 10, GREEDY, stop_ids=())
    off = rep.as_dict()["offline"]
    assert off["mode"] == "dealer" and off["bytes_received"] > 0 and off["dealer_s"] > 0


async def _parts(channel, parts=None) -> list[dict]:
    """The DEAL_PARTs of one take, up to its DEAL_OK, appended to ``parts`` (an ERROR raises
    RemoteError, with the parts received before it in ``parts``)."""
    parts = [] if parts is None else parts
    while (msg := await channel.expect(MsgType.DEAL_PART, MsgType.DEAL_OK)).type == MsgType.DEAL_PART:
        parts.append(msg.body)
    return parts


def _req(model, variant="v3", rows=None, **override):
    body = {"take": secrets.token_bytes(16), "model_fingerprint": model.fingerprint(), "variant": variant,
            "rows": {"layers.0.qkv": 3, "lm_head": 2} if rows is None else rows}
    return {**body, **override}


async def _deal_raw(cfg, model, body, capacity=64):
    """One DEAL_REQ in a fresh session: the parts received before DEAL_OK or an error, and that error."""
    async with connect(cfg) as conn:
        await conn.open_session("dealer", model.fingerprint(), capacity)
        await conn.channel.send(MsgType.DEAL_REQ, body)
        parts = []
        try:
            return await _parts(conn.channel, parts), None
        except RemoteError as exc:
            return parts, exc.code


def test_a_replayed_take_is_refused_and_returns_no_material(tiny, dealer_proc):
    _, model = tiny
    cfg = ClientConfig(server=dealer_proc.address, fingerprint=dealer_proc.fingerprint, timeout=30)
    body = _req(model)

    async def main():
        first = await _deal_raw(cfg, model, body)
        again = await _deal_raw(cfg, model, body)  # the same take in a new session
        other = await _deal_raw(cfg, model, {**body, "variant": "v2", "rows": {"layers.0.q": 1}})  # other fields
        async with connect(cfg) as conn:  # and within one session: the second ask of a take is refused
            await conn.open_session("dealer", model.fingerprint(), 64)
            take = _req(model)
            await conn.channel.send(MsgType.DEAL_REQ, take)
            await _parts(conn.channel)
            await conn.channel.send(MsgType.DEAL_REQ, take)
            with pytest.raises(RemoteError) as refused:
                await conn.channel.recv()
        return first, again, other, refused.value.code

    first, again, other, same_session = trio.run(main)
    assert first[1] is None and {p["unit"] for p in first[0]} == {"layers.0.qkv", "lm_head"}
    assert again == ([], "replay") and other == ([], "replay") and same_session == "replay"


BAD = {
    "unknown unit": (dict(rows={"layers.0.qkv": 1, "layers.9.qkv": 1}), "malformed"),
    "unit of another variant": (dict(rows={"layers.0.q": 1}), "malformed"),  # v2's unit, asked for v3
    "unknown variant": (dict(variant="v3-mpc"), "malformed"),
    "wrong model fingerprint": (dict(model_fingerprint="sha256:" + "0" * 64), "model_mismatch"),
    "rows beyond the session's capacity": (dict(rows={"layers.0.qkv": 65}), "seq_too_long"),
    "zero rows": (dict(rows={"layers.0.qkv": 0}), "malformed"),
    "no rows": (dict(rows={}), "malformed"),
    "rows not a map": (dict(rows=[["layers.0.qkv", 1]]), "malformed"),
    "short take": (dict(take=b"x" * 15), "malformed"),
    "take as text": (dict(take="0" * 16), "malformed"),
    "extra field": (dict(seed=b"\0" * 32), "malformed"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_a_clear_error_and_other_sessions_keep_their_material(tiny, dealer_proc, case):
    _, model = tiny
    override, code = BAD[case]
    cfg = ClientConfig(server=dealer_proc.address, fingerprint=dealer_proc.fingerprint, timeout=30)

    async def main():
        async with connect(cfg) as good:  # open across the bad session
            await good.open_session("dealer", model.fingerprint(), 64)
            bad = await _deal_raw(cfg, model, _req(model, **override))
            await good.channel.send(MsgType.DEAL_REQ, _req(model))
            got = [p["unit"] for p in await _parts(good.channel)]
        return bad, got

    (parts, error), good_units = trio.run(main)
    assert parts == [] and error == code
    assert good_units == ["layers.0.qkv", "lm_head"]


def test_rows_are_charged_across_the_takes_of_a_session(tiny, dealer_proc):
    _, model = tiny
    cfg = ClientConfig(server=dealer_proc.address, fingerprint=dealer_proc.fingerprint, timeout=30)

    async def main():
        async with connect(cfg) as conn:
            await conn.open_session("dealer", model.fingerprint(), 64)
            for ask in (40, 24, 1):  # 64 rows of qkv fit the session's capacity, the 65th does not
                await conn.channel.send(MsgType.DEAL_REQ, _req(model, rows={"layers.0.qkv": ask}))
                await _parts(conn.channel)

    with pytest.raises(RemoteError) as refused:
        trio.run(main)
    assert refused.value.code == "seq_too_long" and "65 rows" in refused.value.message


def test_a_dealer_with_the_servers_certificate_is_refused_before_connecting(tiny, dealer_proc):
    _, model = tiny
    cfg = ClientConfig(server=dealer_proc.address, fingerprint=dealer_proc.fingerprint, timeout=30)

    async def served():
        async with connect(cfg) as conn:
            return (await conn.health())["served"]

    before = trio.run(served)
    bare_hex = dealer_proc.fingerprint.split(":", 1)[1].upper()  # the same certificate, written differently
    with pytest.raises(dealer.DealerError, match="the server's") as refused:
        _fetch(dealer_proc, model, "v3", {"lm_head": 1}, server_fingerprint=bare_hex)
    assert refused.value.code == "dealer"
    assert trio.run(served) == before + 1  # only the first health check's connection: fetch never connected


def test_a_reply_of_the_wrong_shape_is_refused(tiny, tmp_path, monkeypatch):
    # the client cannot check W r without the weights, but it checks what it can: the shapes
    _, model = tiny
    real = preprocess.products
    monkeypatch.setattr(preprocess, "products", lambda W, seed, start, n: real(W, seed, start, n)[:, :-1])

    async def main():
        async with _inprocess_dealer(tmp_path, model) as cfg:
            with pytest.raises(ProtocolError, match=r"DEAL_PART 'wr' must have shape \('1\.\.2', 300\), got \(2, 299\)"):
                await dealer.fetch(cfg.server, cfg.fingerprint, model_fingerprint=model.fingerprint(), variant="v3",
                                   rows={"lm_head": 2}, plan=model.plan)

    trio.run(main)


def test_the_server_never_offers_the_dealer_and_the_dealer_nothing_else(tiny, dealer_proc, tmp_path):
    _, model = tiny
    assert "dealer" not in registry.offered(True) and "dealer" not in registry.generating()
    assert dealer_proc.event["protocols"] == ["dealer"]
    ctx = tls.server_context(*_cert(tmp_path))
    with pytest.raises(ValueError, match="dealer protocol alone"):
        Server(ServerConfig(), ctx, model, protocols={**registry.offered(True), **registry.dealing()})

    async def main():
        async with tls_server(tmp_path, model=model) as (_, cfg):  # a server with the model
            async with connect(cfg) as conn:
                with pytest.raises(RemoteError) as as_server:
                    await conn.open_session("dealer", model.fingerprint(), 64)
        dcfg = ClientConfig(server=dealer_proc.address, fingerprint=dealer_proc.fingerprint, timeout=30)
        async with connect(dcfg) as conn:  # and the dealer runs no masked protocol
            with pytest.raises(RemoteError) as as_dealer:
                await conn.open_session("v3", model.fingerprint(), 64)
        return as_server.value.code, as_dealer.value.code

    assert trio.run(main) == ("unknown_protocol", "unknown_protocol")


@pytest.mark.parametrize("args", [
    ["generate", "-p", "hi", "--protocol", "dealer"],
    ["chat", "--protocol", "dealer"],
    ["bench", "--protocol", "v3,dealer"],
])
def test_dealer_is_not_a_protocol_to_generate_with(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "'dealer' does not generate text" in result.output, result.output


def test_the_dealer_says_it_must_not_collude_with_the_server():
    text = " ".join(CliRunner().invoke(cli, ["dealer", "--help"]).output.split())
    assert "The dealer and the server must not collude" in text and "unmasks everything" in text


def _cert(tmp_path):
    tls.generate_server_cert(tmp_path / "dealer-certs")
    return tmp_path / "dealer-certs/server.crt", tmp_path / "dealer-certs/server.key"


@contextlib.asynccontextmanager
async def _inprocess_dealer(tmp_path, model):
    """A dealer Server in this process (so a test may patch it), on loopback TLS: yields a ClientConfig."""
    crt, key = _cert(tmp_path)
    server = Server(ServerConfig(port=0), tls.server_context(crt, key), model, protocols=registry.dealing())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        yield ClientConfig(server=f"127.0.0.1:{port}", fingerprint=tls.fingerprint_of(crt), timeout=10)
        nursery.cancel_scope.cancel()


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "shardlm.cli", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_three_processes_a_client_without_weights_generates_with_offline_dealer(tiny, dealer_proc, tmp_path):
    # dealer, server and a client run from an export-client directory (no linear weight matrix)
    d, model = tiny
    client_dir = tmp_path / "client"
    _cli("models", "export-client", str(client_dir), "-m", str(d), "--json")
    want = reference_generate(model, model.tokenizer.encode_chat([{"role": "user", "content": "hello"}]), 6, GREEDY)
    deal = ["--offline", "dealer", "--dealer", dealer_proc.address, "--dealer-fingerprint", dealer_proc.fingerprint]
    with launch.server(["-m", str(d), "--threads", "1"]) as srv:
        run = ["-m", str(client_dir), *srv.client_args]
        for variant in ("v3", "v3-2r"):
            out = json.loads(_cli("generate", *run, "--protocol", variant, "-p", "hello", "--max-tokens", "6", *deal,
                                  "--json").stdout)
            assert out["token_ids"] == want and out["offline"]["mode"] == "dealer", variant
            assert out["offline"]["dealer_s"] > 0
        store = tmp_path / "store"
        pre = json.loads(_cli("preprocess", *run, "--tokens", "40", "--out", str(store), *deal, "--json").stdout)
        assert pre["offline"]["mode"] == "dealer" and json.loads((store / "meta.json").read_text())["source"] == "dealer"
        out = json.loads(_cli("generate", *run, "-p", "hello", "--max-tokens", "6", "--material", str(store),
                              "--json").stdout)
        assert out["token_ids"] == want
        # the server's own certificate given as the dealer's: refused before any material is asked for
        same = _cli("generate", *run, "-p", "hello", "--max-tokens", "6", "--offline", "dealer", "--dealer",
                    srv.address, "--dealer-fingerprint", srv.fingerprint, "--json", check=False)
    assert same.returncode == 1 and json.loads(same.stdout)["code"] == "dealer", same.stdout + same.stderr
    assert "must be different, non-colluding parties" in json.loads(same.stdout)["error"]


@pytest.mark.slow
def test_smollm2_three_processes_a_client_from_an_export_generates_the_reference(smollm2, tmp_path):
    client_dir = tmp_path / "client"
    _cli("models", "export-client", str(client_dir), "-m", "smollm2", "--json")
    prompt, n = "Hello, how are you?", 8
    want = reference_generate(smollm2, smollm2.tokenizer.encode_prompt(prompt), n, GREEDY)
    with launch.dealer(["-m", "smollm2", "--threads", "1"]) as dl, \
            launch.server(["-m", "smollm2", "--threads", "1"]) as srv:
        out = json.loads(_cli("generate", "-m", str(client_dir), *srv.client_args, "-p", prompt, "--max-tokens",
                              str(n), "--offline", "dealer", "--dealer", dl.address, "--dealer-fingerprint",
                              dl.fingerprint, "--threads", "1", "--json").stdout)
    assert out["token_ids"] == want and out["offline"]["mode"] == "dealer"
