"""v2 / v3 / plain end to end: exactness against the reference, and the server's view (DESIGN.md s6)."""
import math

import numpy as np
import pytest
import torch
import trio

from conftest import load_tiny_models
from shardlm.models.reference import generate as reference_generate
from shardlm.models.sampling import SamplingParams
from shardlm.party.client import connect
from shardlm.party import handshake
from shardlm.party.run import run_generation
from shardlm.protocols import registry
from shardlm.party.transcript import load_transcript, session_dirs
from shardlm.protocols import masked, units
from shardlm.wire.errors import RemoteError
from shardlm.wire.msgtypes import MsgType

from support import assert_uniform_ring, tls_server

GREEDY = SamplingParams()
FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return load_tiny_models(tmp_path_factory, FAMILIES, 3)


async def _generate(server_model, client_model, tmp_path, protocol, prompt, n, **server_cfg):
    async with tls_server(tmp_path, model=server_model, **server_cfg) as (server, cfg):
        return await run_generation(cfg, client_model, registry.get(protocol), prompt, n, GREEDY, ignore_eos=True)


def test_hello_tells_the_server_only_a_bucket_of_the_generation_length(tiny_models, tmp_path):
    # max_tokens 3 and 40 with the same prompt (and with EOS the run may stop anywhere): the same HELLO
    model, rec = tiny_models["llama"], tmp_path / "rec"

    async def main():
        async with tls_server(tmp_path, model=model, record_dir=str(rec)) as (server, cfg):
            for n in (3, 40):
                await run_generation(cfg, model, registry.get("v3"), [5, 77, 31], n, GREEDY, ignore_eos=True)
    trio.run(main)
    hellos = [next(m.body for m in load_transcript(d)[1] if m.type == MsgType.HELLO) for d in session_dirs(rec)]
    assert len(hellos) == 2 and hellos[0] == hellos[1] and hellos[0]["max_seq_len"] == 64
    assert [handshake.capacity_bucket(n) for n in (1, 64, 65, 300, 4096, 4097)] == [64, 64, 128, 512, 4096, 8192]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("protocol", ["plain", "v2", "v3", "v3-2r"])
def test_greedy_generation_equals_the_reference_on_tiny_models(tiny_models, tmp_path, family, protocol):
    model = tiny_models[family]
    prompt = [5, 77, 31, 200, 9, 14, 150]
    want = reference_generate(model, prompt, 30, GREEDY, stop_ids=())
    rep = trio.run(_generate, model, model, tmp_path, protocol, prompt, 30)
    assert rep.result.token_ids == want
    L = model.config.n_layers
    per_token = {"plain": 1, "v2": (7 if family != "gpt2" else 6) * L + 1, "v3": 4 * L + 1, "v3-2r": 2 * L + 2}[protocol]
    assert rep.stats["decode"]["rounds"] == 29 * per_token  # 29 decode steps after the prefill
    if protocol != "plain":
        assert rep.stats["prefill"]["rounds"] == per_token


def _ring_view(msgs):
    return [m for m in msgs if m.type == MsgType.MASKED_LINEAR]


@pytest.mark.parametrize("protocol", ["v3", "v3-2r"])
def test_server_view_structure_uniformity_and_no_plaintext(tiny_models, tmp_path, protocol):
    model = tiny_models["llama"]
    rec = tmp_path / "rec"
    prompts = [[5, 77, 31, 200, 9, 14, 150, 3], [250, 1, 1, 1, 99, 42, 7, 8]]
    plaintext_rows = []

    async def main():
        async with tls_server(tmp_path, model=model, record_dir=str(rec)) as (server, cfg):
            for p in prompts:
                await run_generation(cfg, model, registry.get(protocol), p, 12, GREEDY, ignore_eos=True)
            # a plaintext activation, or anything but the two fields, is refused
            async with connect(cfg) as conn:
                await conn.open_session(protocol, model.fingerprint(), 64)
                with pytest.raises(RemoteError) as e:
                    await conn.channel.request(MsgType.MASKED_LINEAR, {
                        "unit": "layers.0.qkv", "m": np.zeros((1, 64), np.float32)}, MsgType.MASKED_LINEAR_OK)
                assert e.value.code == "malformed"
            async with connect(cfg) as conn:
                await conn.open_session(protocol, model.fingerprint(), 64)
                with pytest.raises(RemoteError) as e:
                    await conn.channel.request(MsgType.MASKED_LINEAR, {
                        "unit": "layers.0.qkv", "m": np.zeros((1, 64), np.int64), "x": np.zeros(3)},
                        MsgType.MASKED_LINEAR_OK)
                assert e.value.code == "malformed"
            async with connect(cfg) as conn:  # requests of another protocol are refused in a v3/v3-2r session
                await conn.open_session(protocol, model.fingerprint(), 64)
                with pytest.raises(RemoteError) as e:
                    await conn.channel.request(MsgType.PLAIN_FORWARD, {"ids": np.array([1])}, MsgType.PLAIN_LOGITS)
                assert e.value.code == "wrong_state"

    trio.run(main)
    views = [load_transcript(d)[1] for d in session_dirs(rec)[:2]]
    # (1) structure: same types, units, shapes and byte counts for two different prompts
    def shape_of(msgs):
        return [(m.type, m.body.get("unit"), getattr(m.body.get("m"), "shape", None), m.frame_bytes) for m in msgs]
    assert shape_of(views[0]) == shape_of(views[1])
    # (3) no path for plaintext: only the handshake, masked products and BYE reach the server
    for msgs in views:
        assert {m.type for m in msgs} == {MsgType.HELLO, MsgType.MASKED_LINEAR, MsgType.BYE}
        hello = next(m for m in msgs if m.type == MsgType.HELLO).body
        assert set(hello) == {"version", "protocol", "model_fingerprint", "max_seq_len"}
        for m in _ring_view(msgs):
            # full replies by default (a --reply-bits low window is public per unit: tests/test_lowbits.py)
            assert set(m.body) == {"unit", "m"} and m.body["m"].dtype == np.int64
            assert m.body["unit"] in units.units_for(model.plan, protocol)
    # (2) uniformity of everything the server received in the ring
    assert_uniform_ring([m.body["m"] for v in views for m in _ring_view(v)])


def test_masked_inputs_are_uncorrelated_with_the_plaintext(tiny_models, tmp_path, monkeypatch):
    """Record the client's plaintext inputs next to what the server got: no linear relation."""
    model = tiny_models["llama"]
    pairs = []
    orig = masked.MaskedClient.linear

    async def spy(self, ops, x):  # the real client, with its plaintext inputs noted on the side
        l1_bound = self.encoding[self.unit_of[ops[0].name].name][0][1]
        pairs.append(self.fx.encode(x, self.fx.bits_for(float(x.abs().max()), l1_bound)))
        return await orig(self, ops, x)

    rec = tmp_path / "rec"
    monkeypatch.setattr(masked.MaskedClient, "linear", spy)
    trio.run(lambda: _generate(model, model, tmp_path, "v3", [5, 77, 31, 200, 9], 8, record_dir=str(rec)))
    (d,) = session_dirs(rec)
    sent = [m.body["m"] for m in _ring_view(load_transcript(d)[1])]
    assert len(sent) == len(pairs)
    x = np.concatenate([p.numpy().reshape(-1) for p in pairs]).astype(np.float64)
    m = np.concatenate([s.reshape(-1) for s in sent]).astype(np.float64)
    corr = np.corrcoef(x, m)[0, 1]
    assert abs(corr) < 5 / math.sqrt(x.size)
    # while the plaintext itself is far from uniform: its top bytes are almost all 0x00 or 0xff
    top = np.concatenate([p.numpy().reshape(-1) for p in pairs]).view(np.uint8).reshape(-1, 8)[:, 7]
    assert np.isin(top, [0, 255]).mean() > 0.99


def test_client_disconnecting_mid_generation_frees_the_session(tiny_models, tmp_path):
    model = tiny_models["llama"]

    async def main():
        async with tls_server(tmp_path, model=model) as (server, cfg):
            async with connect(cfg) as conn:
                await conn.open_session("v3", model.fingerprint(), 64)
                await conn.channel.request(MsgType.MASKED_LINEAR, {
                    "unit": "layers.0.qkv", "m": np.zeros((3, 64), np.int64)}, MsgType.MASKED_LINEAR_OK)
                await conn.channel.send(MsgType.MASKED_LINEAR, {"unit": "layers.0.o", "m": np.zeros((3, 64), np.int64)})
                await conn.channel.stream.aclose()  # vanish without BYE, a reply in flight
                conn.session = None
            with trio.fail_after(10):
                while server.active:
                    await trio.sleep(0.01)
            rep = await run_generation(cfg, model, registry.get("v3"), [1, 2, 3], 5, GREEDY, ignore_eos=True)
            return rep.result.token_ids

    assert trio.run(main) == reference_generate(model, [1, 2, 3], 5, GREEDY, stop_ids=())


def test_pad_to_max_hides_where_the_completion_stopped(tiny_models, tmp_path, monkeypatch):
    """Two generations that stop at different tokens: without --pad-to-max the server counts
    their forwards apart; with it, its views of them have the same structure."""
    from shardlm.models.load import Model

    model, n = tiny_models["llama"], 12
    prompts = [[5, 77, 31, 200], [250, 1, 99, 42]]
    outs = [reference_generate(model, p, n, GREEDY, stop_ids=()) for p in prompts]
    # a stop token that the two completions reach at different points
    stop = next(t for t in outs[0] + outs[1] if (outs[0] + [t]).index(t) != (outs[1] + [t]).index(t))
    monkeypatch.setattr(Model, "eos_ids", property(lambda self: (stop,)))

    def views(pad: bool, rec):
        async def main():
            async with tls_server(tmp_path, model=model, record_dir=str(rec)) as (server, cfg):
                return [await run_generation(cfg, model, registry.get("v3"), p, n, GREEDY, pad_to_max=pad)
                        for p in prompts]
        reps = trio.run(main)
        for rep, want in zip(reps, outs):
            assert rep.result.token_ids == want[:want.index(stop)] if stop in want else want
        return reps, [[(m.type, m.body.get("unit"), getattr(m.body.get("m"), "shape", None), m.frame_bytes)
                       for m in load_transcript(d)[1]] for d in session_dirs(rec)]

    _, plain_views = views(False, tmp_path / "unpadded")
    assert plain_views[0] != plain_views[1]  # the stop point shows
    reps, padded_views = views(True, tmp_path / "padded")
    assert padded_views[0] == padded_views[1]
    assert sorted(r.result.padded_steps for r in reps)[-1] > 0
    assert [r.result.decode_steps + r.result.padded_steps for r in reps] == [n - 1, n - 1]
