"""v3-ot's rsqrt (protocols/mpc/approx_lut.py: LutEngine.rsqrt): an exponent by comparisons against
powers of four, a mantissa table, on shares against 1/sqrt over the whole range the executor uses
(the 'wide' ranges: d 1e-3 .. d 1e6), with ``times`` and ``extra``; and the norms (RMSNorm of
llama, LayerNorm of gpt2) through the plan executor against their plaintext. Every product,
comparison and lookup by OT (the two-party simulator)."""
import math

import pytest
import torch

from shardlm.models import nonlinear as nl
from shardlm.models.plan import Norm
from shardlm.protocols import mpc
from shardlm.protocols.mpc import beaver_ot, lut
from shardlm.protocols.mpc.approx_lut import LutEngine

REL = 1.9e-4  # the mantissa table's relative error (lut.py), plus the encodings'
D = 576  # SmolLM2's width: x in [0.576, 5.76e8], 16 powers of four inside [lo/2, 2 hi]


@pytest.fixture(scope="module")
def eng(lut_engine):
    return lut_engine


def _logspace(lo, hi, n, f):
    """n log-spaced points over [lo, hi], both ends, each exactly a ring value at scale 2^f."""
    x = torch.exp(torch.linspace(math.log(lo), math.log(hi), n, dtype=torch.float64))
    return torch.round(x * 2 ** f) / 2 ** f


def test_rsqrt_by_tables_over_the_norms_range(eng):
    lo, hi = D * 1e-3, D * 1e6
    x = _logspace(lo / 1.9, hi * 1.9, 400, eng.f)  # the range and the headroom either side
    want = torch.rsqrt(x)
    X = eng.share(x)
    r0, l0, and0 = eng.stats.rounds, eng.lookups, eng.provider.elements.get("and", 0)
    y = eng.reveal(eng.rsqrt(X, lo, hi))
    # at scale 2^F 1/sqrt(5.76e8) = 4e-5 keeps ~42 units: the truncation's unit (and carry) is absolute
    assert ((y - want).abs() <= REL * want + 2 * 2.0 ** -eng.f).all(), ((y - want).abs() / want).max()
    assert eng.lookups - l0 == x.numel()  # one lookup per element
    # 16 comparisons per element, the millionaires' carry: at most one AND word (64 ANDs) each
    assert 0 < eng.provider.elements["and"] - and0 <= 16 * x.numel()
    # 5 for the comparisons (the millionaires': one OT flight, 4 AND levels), their bits made
    # additive (one correlated OT), x b_i, the table's OT, rsqrt(m) 2^-j, its truncation
    assert eng.stats.rounds - r0 == 10


def test_rsqrt_times_with_extra_bits_as_the_norm_calls_it(eng):
    """x at scale 2^(F + extra), ``times`` a lazy truncation (the norm's x w sqrt(d)): the result
    at its full relative accuracy across the range, the smallest 1/sqrt(x) included."""
    lo, hi, extra = D * 1e-3, D * 1e6, eng.f - 16
    x = _logspace(lo, hi, 300, eng.f).view(-1, 1)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(300, 8, generator=g, dtype=torch.float64) * torch.sqrt(x) / 4  # |times / sqrt(x)| ~ 1
    t[0, 0], t[-1, 0] = 3.0, 90.0 * math.sqrt(hi)  # a big ratio at each end
    want = t * torch.rsqrt(x)
    X = eng.mul_int(eng.share(x), 1 << extra)
    T = eng.lazy_trunc(eng.mul_int(eng.share(t), 1 << 12), 12)
    r0, l0 = eng.stats.rounds, eng.lookups
    y = eng.reveal(eng.rsqrt(X, lo, hi, times=T, extra=extra))
    assert ((y - want).abs() <= REL * want.abs() + 2 * 2.0 ** -eng.f).all(), (y - want).abs().max()
    assert eng.lookups - l0 == x.numel()
    assert eng.stats.rounds - r0 == 10 + 1  # with times: its product and that truncation instead of 1/sqrt(x)'s


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_norm_through_the_executor_equals_the_plaintext(tiny, family):
    """The executor's RMSNorm (llama) / LayerNorm (gpt2) on v3-ot's engine over rows whose mean
    squares span 1e-3 .. 1e6 (the 'wide' ranges), one large channel included."""
    model = tiny[family]
    ex = mpc.MPCExecutor(model, LutEngine(beaver_ot.OTProvider(batch=1 << 12)), ranges=mpc.Ranges.wide())
    step = next(s for s in model.plan.steps if isinstance(s, Norm))
    d = model.weights[step.weight].shape[0]
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([0.04, 0.3, 1, 10, 60, 300, 990])
    x = torch.randn(len(scales), d, generator=g, dtype=torch.float64) * scales[:, None]
    x[4, 3] = 4000.0  # one massive channel: its row's mean square ~2.5e5
    l0 = ex.e.lookups
    y = ex.e.reveal(ex.norm(step, ex.e.share(x))[0])
    w = model.weights[step.weight].double()
    want = nl.rms_norm(x, w, step.eps) if step.kind == "rms" else \
        nl.layer_norm(x, w, model.weights[step.bias].double(), step.eps)
    # the executor's S (from x / 2^8 at scale 2^F) limits the smallest rows to ~1e-3; rsqrt's own
    # 1.9e-4 is checked above
    assert ((y - want).abs() <= 1e-3 + 1e-3 * want.abs()).all(), (y - want).abs().max()
    assert ex.e.lookups - l0 == len(scales)  # one rsqrt lookup per row


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import load_tiny_models

    return load_tiny_models(tmp_path_factory, ("llama", "gpt2"), 3)
