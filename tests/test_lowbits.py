"""Low-bits replies (protocols/lowbits.py): exact greedy output over TLS, b bits per product on the
wire, uniform sent bits, and a client's bad window refused."""
import dataclasses

import numpy as np
import pytest
import torch
import trio

from conftest import load_tiny_models
from shardlm.models.reference import generate as reference_generate
from shardlm.models.sampling import SamplingParams
from shardlm.party.client import connect
from shardlm.party.run import run_generation
from shardlm.party.transcript import load_transcript, session_dirs
from shardlm.protocols import lowbits, preprocess, registry, units
from shardlm.wire.errors import RemoteError
from shardlm.wire.msgtypes import MsgType

from support import assert_uniform_below, tls_server

GREEDY = SamplingParams()
FAMILIES = ["llama", "qwen2", "gpt2"]
PROMPTS = [[5, 77, 31, 200, 9, 14, 150], [250, 1, 1, 99, 42, 7, 8]]
HE_SHIFT = 5  # protocols/he/service.py: HE-made masks are 2^5 r'


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return load_tiny_models(tmp_path_factory, FAMILIES, 3)


def _width(model, protocol: str, unit: str, shift: int = 0) -> int:
    return lowbits.reply_bits([l1 for _, l1 in units.encoding_for(model, protocol)[unit]], shift)


def _run(model, tmp_path, protocol, prompts, n, options=None):
    """Generations over TLS with both views recorded: (reports, [(server msgs, client msgs)] per session).
    Low-bits replies unless ``options`` say otherwise (the default is full)."""
    srv_rec, cli_rec = tmp_path / "srv", tmp_path / "cli"
    options = {"reply_bits": "low", **(options or {})}

    async def main():
        async with tls_server(tmp_path, model=model, record_dir=str(srv_rec)) as (_, cfg):
            cfg = dataclasses.replace(cfg, record_dir=str(cli_rec))
            return [await run_generation(cfg, model, registry.get(protocol), p, n, GREEDY, ignore_eos=True,
                                         options=options) for p in prompts]
    reps = trio.run(main)
    return reps, [(load_transcript(s)[1], load_transcript(c)[1]) for s, c in zip(session_dirs(srv_rec),
                                                                                session_dirs(cli_rec))]


def _exchanges(views):
    """(request body, reply's packed y) of every masked product, in order."""
    out = []
    for server_msgs, client_msgs in views:
        asks = [m.body for m in server_msgs if m.type == MsgType.MASKED_LINEAR]
        replies = [m.body["y"] for m in client_msgs if m.type == MsgType.MASKED_LINEAR_OK]
        assert len(asks) == len(replies) > 0
        out += list(zip(asks, replies))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("protocol", ["v2", "v3", "v3-2r"])
def test_low_bits_replies_are_exact_and_carry_b_bits_per_product(tiny_models, tmp_path, family, protocol):
    model = tiny_models[family]
    (rep,), views = _run(model, tmp_path, protocol, PROMPTS[:1], 10)
    assert rep.result.token_ids == reference_generate(model, PROMPTS[0], 10, GREEDY, stop_ids=())
    table = units.units_for(model.plan, protocol)
    for ask, y in _exchanges(views):
        b = _width(model, protocol, ask["unit"])
        assert ask["bits"] == b < 64 and ask["shift"] == 0
        # exactly b bits per product on the wire: ceil(out b / 8) bytes a row, nothing wider
        assert y.dtype == np.uint8 and y.shape == (ask["m"].shape[0], -(-table[ask["unit"]].out_dim * b // 8))
    assert rep.protocol_stats["reply_bits"] == "low"


def test_full_replies_on_request_and_the_bytes_saved(tiny_models, tmp_path):
    """--reply-bits full: 64-bit replies, the same tokens; a decode step's reply bytes drop by
    exactly what the widths say."""
    model = tiny_models["llama"]
    (low,), _ = _run(model, tmp_path / "low", "v3", PROMPTS[:1], 6)
    (full,), views = _run(model, tmp_path / "full", "v3", PROMPTS[:1], 6, {"reply_bits": "full"})
    assert full.result.token_ids == low.result.token_ids
    for ask, y in _exchanges(views):
        assert set(ask) == {"unit", "m"} and y.shape[1] == 8 * units.units_for(model.plan, "v3")[ask["unit"]].out_dim
    saved = sum(8 * u.out_dim - lowbits.row_bytes(u.out_dim, _width(model, "v3", name))
                for name, u in units.units_for(model.plan, "v3").items())
    per_token = (full.stats["decode"]["bytes_received"] - low.stats["decode"]["bytes_received"]) / 5
    assert saved - 4 * len(units.units_for(model.plan, "v3")) <= per_token <= saved  # msgpack headers may shrink


@pytest.mark.parametrize("protocol", ["v2", "v3", "v3-2r"])
def test_he_made_material_with_low_bits_replies(tiny_models, tmp_path, protocol):
    """--offline he: the window starts above the masks' 5 zero bits; exact, and with --verify too."""
    model = tiny_models["llama"]
    options = {"offline_mode": "he", "verify": protocol == "v3"}
    (rep,), views = _run(model, tmp_path, protocol, PROMPTS[:1], 5, options)
    assert rep.result.token_ids == reference_generate(model, PROMPTS[0], 5, GREEDY, stop_ids=())
    for ask, y in _exchanges(views):
        assert ask["shift"] == HE_SHIFT and ask["bits"] == _width(model, protocol, ask["unit"], HE_SHIFT)
    if protocol == "v3":
        assert rep.verification["replies"] > 0


def _sent_values(model, protocol, exchanges):
    """The replies' products as b-bit values (uint64), grouped by b."""
    table, by_width = units.units_for(model.plan, protocol), {}
    for ask, y in exchanges:
        values = lowbits.unpack(y, table[ask["unit"]].out_dim, ask["bits"]).numpy().view(np.uint64)
        by_width.setdefault(ask["bits"], []).append(values)
    return by_width


def test_the_bits_the_server_sends_are_uniform_and_the_test_catches_unmasked_inputs(tiny_models, tmp_path, monkeypatch):
    """The low b bits of W m with m uniform are uniform (chi-square per byte, bit balance); the same
    check on a broken client that sends its inputs unmasked (r = 0, so the replies are W x) fails."""
    model = tiny_models["llama"]
    _, views = _run(model, tmp_path / "ok", "v3", PROMPTS, 12)
    for b, values in _sent_values(model, "v3", _exchanges(views)).items():
        assert_uniform_below(values, b)

    real = preprocess.MaterialStore.take

    def unmasked(self, name, n):  # the broken variant: zero masks
        r, wr = real(self, name, n)
        return torch.zeros_like(r), torch.zeros_like(wr)
    monkeypatch.setattr(preprocess.MaterialStore, "take", unmasked)
    reps, views = _run(model, tmp_path / "broken", "v3", PROMPTS, 12)
    assert reps[0].result.token_ids == reference_generate(model, PROMPTS[0], 12, GREEDY, stop_ids=())
    with pytest.raises(AssertionError):
        for b, values in _sent_values(model, "v3", _exchanges(views)).items():
            assert_uniform_below(values, b)


BAD = [({"bits": 0}, "'bits'"), ({"bits": 65}, "'bits'"), ({"bits": "40"}, "'bits'"), ({"bits": True}, "'bits'"),
       ({"bits": 60, "shift": 5}, "'shift'"), ({"shift": 1}, "'shift'"), ({"bits": 40, "shift": -1}, "'shift'"),
       ({"bits": 40, "m": np.zeros((1, 63), np.int64)}, "'m'"), ({"bits": 40, "m": np.zeros((1, 64), np.uint64)}, "'m'")]


def test_a_bad_window_or_shape_is_refused_and_the_next_session_works(tiny_models, tmp_path):
    model = tiny_models["llama"]

    async def main():
        errors = []
        async with tls_server(tmp_path, model=model) as (server, cfg):
            for body, _ in BAD:
                async with connect(cfg) as conn:
                    await conn.open_session("v3", model.fingerprint(), 64)
                    with pytest.raises(RemoteError) as e:
                        await conn.channel.request(MsgType.MASKED_LINEAR, {
                            "unit": "layers.0.qkv", "m": np.zeros((1, 64), np.int64), **body}, MsgType.MASKED_LINEAR_OK)
                    errors.append(e.value)
                with trio.fail_after(10):  # that session is over; the server serves the next
                    while server.active:
                        await trio.sleep(0.01)
            rep = await run_generation(cfg, model, registry.get("v3"), [1, 2, 3], 4, GREEDY, ignore_eos=True)
            return errors, rep.result.token_ids
    errors, tokens = trio.run(main)
    for err, (_, field) in zip(errors, BAD):
        assert err.code == "malformed" and field in str(err), str(err)
    assert tokens == reference_generate(model, [1, 2, 3], 4, GREEDY, stop_ids=())


def test_pack_round_trips_every_width_and_window():
    y = torch.randint(-2**63, 2**63 - 1, (3, 17), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    for bits in (1, 7, 8, 13, 45, 59, 63, 64):
        for shift in (0, 5):
            if bits + shift > 64:
                continue
            packed = lowbits.pack(y, bits, shift)
            assert packed.shape == (3, lowbits.row_bytes(17, bits))
            want = torch.bitwise_right_shift(y, shift)
            if bits < 64:
                want = torch.bitwise_and(want, (1 << bits) - 1)
            assert torch.equal(lowbits.unpack(packed, 17, bits), want)
    assert torch.equal(lowbits.wrap(torch.tensor([5, 2**40 - 3, 2**39, 2**39 - 1]), 40),
                       torch.tensor([5, -3, -2**39, 2**39 - 1]))
