"""v3-ot's nonlinear steps on the v3-mpc engine (protocols/mpc/approx_lut.py): the table-based
softmax, SiLU gate and GELU on shares against their plaintext, and the plan executor on a tiny
llama with every product, comparison and lookup made by OT (the two-party simulator)."""
import math

import pytest
import torch
import torch.nn.functional as F

from shardlm.protocols import mpc
from shardlm.protocols.mpc import lut


@pytest.fixture(scope="module")
def eng(lut_engine):
    return lut_engine


def test_lookups_need_the_ot_provider():
    with pytest.raises(ValueError, match="triples ot"):
        lut.on_shares(mpc.Engine(), mpc.Engine().share(torch.zeros(3)), lut.TABLES["exp"])


def test_softmax_by_tables_times_values(eng):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 6, generator=g) * 8
    v = torch.randn(2, 6, 4, generator=g) * 3
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None].expand(2, 6, 6)
    want_p = torch.softmax(x.double().masked_fill(~mask, -math.inf), -1)
    n0 = eng.lookups
    p = eng.reveal(eng.softmax(eng.share(x), mask=mask))
    # exp's table: w = 1.2e-2 absolute in each numerator and n = 6 of them in the sum (s >= 1),
    # Newton's 1/s to 1e-4: |p - want| <= w (1 + n want)
    w = lut.TABLES["exp"].width
    assert ((p - want_p).abs() <= w * (1 + 6 * want_p) + 1e-4).all(), (p - want_p).abs().max()
    assert (p[~mask].abs() <= 2.0 ** -eng.f).all()
    assert eng.lookups - n0 == x.numel() + 2 * 6  # one exp per score, one reciprocal per row
    y = eng.reveal(eng.softmax(eng.share(x), mask=mask, values=eng.share(v)))
    want = want_p @ v.double()
    assert ((y - want).abs() <= w * 7 * (want_p @ v.double().abs() + v.double().abs().amax(-2, keepdim=True))).all(), \
        (y - want).abs().max()


def test_silu_gate_and_gelu_by_tables_over_wide_inputs(eng):
    g = torch.Generator().manual_seed(2)
    x, u = torch.randn(4, 100, generator=g) * 20, torch.randn(4, 100, generator=g) * 5
    x[0] = torch.linspace(-60, 60, 100)  # beyond the table: the clip handles it
    y = eng.reveal(eng.silu_gate(eng.share(x), eng.share(u)))
    want = F.silu(x.double()) * u.double()
    # sigmoid's table: 8e-3 absolute, times |x up| (and sigmoid(8) = 1 - 3.4e-4 at the clip)
    assert ((y - want).abs() <= 1e-3 + 8.4e-3 * (x.double() * u.double()).abs()).all(), (y - want).abs().max()
    x = torch.linspace(-12, 12, 301)
    y = eng.reveal(eng.gelu_tanh(eng.share(x)))
    want = F.gelu(x.double(), approximate="tanh")
    assert ((y - want).abs() <= 1e-3 + 1.2e-3 * x.double().abs()).all(), (y - want).abs().max()


def test_v3_ot_greedy_over_tls_equals_the_reference(tiny_llama, tmp_path):
    """``--protocol v3-ot`` between a real TLS server and client: greedy tokens equal the
    reference's; every lookup, product and comparison made by OT over the session channel (the
    table ciphertexts among the client's received messages), nothing from a dealer."""
    import dataclasses

    import trio

    from shardlm.models.reference import generate as reference_generate
    from shardlm.models.sampling import SamplingParams
    from shardlm.party.run import run_generation
    from shardlm.party.transcript import load_transcript, session_dirs
    from shardlm.protocols import registry
    from shardlm.wire.msgtypes import MsgType
    from support import tls_server

    prompt, n, rec = [5, 77, 31, 200], 2, tmp_path / "client-view"

    async def main():
        async with tls_server(tmp_path, model=tiny_llama) as (server, cfg):
            cfg = dataclasses.replace(cfg, record_dir=str(rec))
            return await run_generation(cfg, tiny_llama, registry.get("v3-ot"), prompt, n, SamplingParams(),
                                        ignore_eos=True, options={"triple_batch": 1 << 12})

    rep = trio.run(main)
    assert rep.result.token_ids == reference_generate(tiny_llama, prompt, n, SamplingParams(), stop_ids=())
    fw = rep.protocol_stats["forwards"]
    assert all(f["lookups"] > 0 and f["triples_and"] > 0 for f in fw)
    # every lookup is one 1-of-2^k OT made of k random OTs: the IKNP count covers at least those
    assert all(f["ots"] >= 9 * f["lookups"] and f["lookup_bytes"] >= 4096 * f["lookups"] for f in fw)
    (view,) = [load_transcript(x)[1] for x in session_dirs(rec)]
    assert sum(m.type == MsgType.OT_NOFN_CT for m in view) >= len(fw)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from conftest import load_tiny_models

    return load_tiny_models(tmp_path_factory, ("llama",), 3)["llama"]
