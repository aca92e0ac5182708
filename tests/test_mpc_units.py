"""v3-mpc building blocks: Beaver triples (dealer), single use, and each nonlinear function on
shares against its plaintext over the documented range (protocols/mpc/approx.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from shardlm.protocols import mpc
from shardlm.protocols.mpc import beaver


def _signed(v):
    v %= 2**64
    return v - 2**64 if v >= 2**63 else v


@pytest.fixture()
def eng():
    return mpc.Engine()


def test_dealer_triples_are_correct_and_single_use():
    p = beaver.DealerProvider()
    t = p.mul((3, 5))
    a, b, c = (x[0] + x[1] for x in (t.a, t.b, t.c))
    assert torch.equal(c, a * b)
    for i in range(3):  # check a few against Python integers mod 2^64
        assert int(c[i, 0]) == _signed(int(a[i, 0]) * int(b[i, 0]))
    m = p.matmul((2, 4, 6), (2, 6, 3))
    A, B, C = (x[0] + x[1] for x in (m.a, m.b, m.c))
    assert int(C[1, 2, 1]) == _signed(sum(int(A[1, 2, k]) * int(B[1, k, 1]) for k in range(6)))
    t.take()
    with pytest.raises(beaver.TripleReuseError):
        t.take()
    assert p.issued == {"mul": 1, "matmul": 1}


def test_beaver_products_on_shares_and_one_round_per_batch(eng):
    x, y = torch.randn(4, 7) * 3, torch.randn(4, 7) * 3
    X, Y = eng.share(x), eng.share(y)
    r0 = eng.stats.rounds
    z1, z2 = eng.mul_many([(X, Y), (Y, Y)])
    # both products' openings in one round, both truncations' wrap bits in one more
    assert eng.stats.rounds == r0 + 2
    assert torch.allclose(eng.reveal(z1), (x * y).double(), atol=1e-5)
    assert torch.allclose(eng.reveal(z2), (y * y).double(), atol=1e-5)
    q, k = torch.randn(2, 3, 8), torch.randn(2, 8, 5)
    (s,) = eng.matmul_many([(eng.share(q), eng.share(k))])
    assert torch.allclose(eng.reveal(s), (q @ k).double(), atol=1e-4)


def test_shares_look_uniform(eng):
    X = eng.share(torch.zeros(20000))
    top = X.s.view(torch.uint8).reshape(-1, 8)[:, 7].to(torch.int64)
    counts = torch.bincount(top, minlength=256).double()
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
    assert chi2 < 370


@pytest.mark.parametrize("local", [False, True])
def test_truncation_is_within_one_ulp(eng, local):
    eng.local_trunc = local
    x = torch.randn(10000) * 100
    X = eng.share(x)
    big = X.map(lambda t: t * (1 << 12))
    assert torch.allclose(eng.reveal(eng.trunc(big, 12)), eng.decode(eng.encode(x)), atol=2.0 ** -eng.f * 1.01)


def test_wrap_bit_truncation_never_fails_where_local_truncation_does(eng):
    """Values near 2^22 at scale 2^2F: local truncation fails with probability ~2^-1 each."""
    x = (torch.rand(20000) * 2 - 1) * 2.0**21
    big = eng.share(x).map(lambda t: t * (1 << eng.f))  # x at scale 2^2F
    exact = eng.reveal(eng.trunc(big, eng.f))
    assert (exact - eng.decode(eng.encode(x))).abs().max() <= 2.0 ** -eng.f * 1.01
    eng.local_trunc = True
    local = eng.reveal(eng.trunc(big, eng.f))
    assert ((local - eng.decode(eng.encode(x))).abs() > 1).float().mean() > 0.02  # ~|x| 2^40 / 2^63: 6%


CASES = [  # name, function on shares, plaintext, inputs over the documented range, tolerance (abs, rel)
    ("exp", lambda e, s: e.exp(s), torch.exp, torch.linspace(-12, 8, 2001), 1e-4, 2e-3),
    ("reciprocal", lambda e, s: e.reciprocal(s), lambda t: 1 / t, torch.linspace(0.01, 500, 4001), 1e-4, 1e-3),
    ("rsqrt", lambda e, s: e.rsqrt(s, 1e-2, 1e2), torch.rsqrt, torch.linspace(1e-2, 1e2, 2001), 1e-4, 1e-3),
    ("silu", lambda e, s: e.silu(s), F.silu, torch.linspace(-16, 16, 2001), 2e-3, 3e-4),
    ("gelu", lambda e, s: e.gelu_tanh(s), lambda t: F.gelu(t, approximate="tanh"), torch.linspace(-4, 4, 2001),
     5e-4, 0),
]


@pytest.mark.parametrize("name,fn,ref,x,atol,rtol", CASES, ids=[c[0] for c in CASES])
def test_nonlinear_on_shares_over_its_range(eng, name, fn, ref, x, atol, rtol):
    y = eng.reveal(fn(eng, eng.share(x)))
    want = ref(x.double())
    assert ((y - want).abs() <= atol + rtol * want.abs()).all(), (y - want).abs().max()


def test_softmax_on_shares_with_causal_mask(eng):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=g) * 2
    mask = torch.tril(torch.ones(64, 64, dtype=torch.bool))
    y = eng.reveal(eng.softmax(eng.share(x), mask=mask))
    want = torch.softmax(x.double().masked_fill(~mask, -math.inf), -1)
    # budget from the documented parts: exp's 2e-3 relative error in each numerator and in the
    # denominator's sum, the reciprocal's 1e-3; truncation adds ulps (measured worst: 0.86 of it)
    assert ((y - want).abs() <= 1e-4 + 5e-3 * want).all(), ((y - want).abs() / (1e-4 + 5e-3 * want)).max()
    assert (y[~mask].abs() <= 2.0 ** -eng.f).all()  # masked keys: 0 up to the truncation's one ulp


def test_softmax_with_comparisons_times_values():
    """Exact-max path: the grouped all-pairs max (two stages for 64 keys), exp, the
    comparison-started reciprocal with e @ V in its first round; same budget as above, 33 rounds
    (54 before the truncations and comparison bits rode in the products' rounds, 39 before the
    winner's bits were multiplied up to 8 at once and exp cubed)."""
    e = _cmp_engine()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 64, generator=g) * 8
    v = torch.randn(2, 64, 16, generator=g) * 3
    mask = torch.tril(torch.ones(64, 64, dtype=torch.bool))[None].expand(2, 64, 64)
    want_p = torch.softmax(x.double().masked_fill(~mask, -math.inf), -1)
    p = e.reveal(e.softmax(e.share(x), mask=mask))
    assert ((p - want_p).abs() <= 1e-4 + 5e-3 * want_p).all(), ((p - want_p).abs() / (1e-4 + 5e-3 * want_p)).max()
    X, V = e.share(x), e.share(v)
    r0 = e.stats.rounds
    out = e.reveal(e.softmax(X, mask=mask, values=V))
    assert e.stats.rounds - r0 == 33
    want = want_p @ v.double()
    assert ((out - want).abs() <= 1e-3 + 5e-3 * (want_p @ v.double().abs())).all(), (out - want).abs().max()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import load_tiny_models

    return load_tiny_models(tmp_path_factory, ("llama", "gpt2"), 3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_executor_on_shares_matches_the_reference_teacher_forced(tiny, family):
    """Prefill then decode steps over a KV cache kept as shares: logits within 1e-2, same top-1."""
    from shardlm.models.reference import Reference

    model = tiny[family]
    ref = Reference.of(model)
    cache = ref.new_cache(32)
    ex = mpc.MPCExecutor(model, mpc.Engine(record=True))
    ids = [5, 77, 31, 200, 9, 14, 150]
    want, got = ref.forward(torch.tensor(ids), cache)[-1], ex.forward(ids)[-1]
    for step in range(6):
        assert (got - want).abs().max() < 1e-2
        assert int(got.argmax()) == int(want.argmax())
        nxt = [int(want.argmax())]
        want, got = ref.forward(torch.tensor(nxt), cache)[-1], ex.forward(nxt)[-1]
    assert ex.e.provider.issued["matmul"] == 2 * 7 * model.config.n_layers  # Q.K^T and P.V per layer, per forward
    # what the server receives (opened e = x - a, d = y - b, and the client's re-shared input) is uniform
    view = torch.cat([v.reshape(-1) for v in ex.e.view])
    top = view.view(torch.uint8).reshape(-1, 8)[:, 7].to(torch.int64)
    counts = torch.bincount(top, minlength=256).double()
    assert ((counts - counts.mean()) ** 2 / counts.mean()).sum() < 370


def test_ot_triples_are_correct_at_scale_and_single_use():
    from shardlm.protocols.mpc import beaver_ot

    p = beaver_ot.OTProvider(batch=1 << 15)
    t = p.mul((128, 256))  # 32768 triples, 4.2M correlated OTs
    a, b, c = (x[0] + x[1] for x in (t.a, t.b, t.c))
    assert torch.equal(c, a * b)
    for i in range(0, 128, 17):
        assert int(c[i, 3]) == _signed(int(a[i, 3]) * int(b[i, 3]))
    # each party's shares alone are uniform and unrelated to the other's
    assert not torch.equal(t.c[0], t.c[1]) and t.a[0].float().std() > 1e18
    m = p.matmul((2, 6, 8), (2, 8, 5))
    A, B, C = (x[0] + x[1] for x in (m.a, m.b, m.c))
    assert torch.equal(C, torch.matmul(A, B))
    assert int(C[1, 5, 4]) == _signed(sum(int(A[1, 5, j]) * int(B[1, j, 4]) for j in range(8)))
    m.take()
    with pytest.raises(beaver.TripleReuseError):
        m.take()
    # a decode row against a long matrix is made transposed (cheaper Gilboa orientation)
    bytes0 = p.ot_bytes
    m = p.matmul((3, 1, 64), (3, 64, 40))
    A, B, C = (x[0] + x[1] for x in (m.a, m.b, m.c))
    assert A.shape == (3, 1, 64) and B.shape == (3, 64, 40) and torch.equal(C, torch.matmul(A, B))
    assert p.ot_bytes - bytes0 < 3 * 2 * 64 * 64 * (16 + 8 * 40) * 1.1  # not 3 * 2 * 64 * 40 * 64 * 24
    t2 = p.mul((10,))  # the pool moves on: no element of a triple is handed out twice
    assert not torch.isin(t2.a[0], t.a[0]).any()


@pytest.mark.parametrize("ranges", [mpc.Ranges(), mpc.Ranges.wide()], ids=["narrow", "wide"])
def test_executor_with_ot_triples(tiny, ranges):
    """Every triple made by OT; with the 'wide' ranges (exact softmax max, sigmoid clipping, rsqrt
    start) that includes the comparisons' AND triples."""
    from shardlm.models.reference import Reference
    from shardlm.protocols.mpc import beaver_ot

    model = tiny["llama"]
    ref = Reference.of(model)
    cache = ref.new_cache(16)
    ex = mpc.MPCExecutor(model, mpc.Engine(beaver_ot.OTProvider(batch=1 << 12)), ranges)
    ids = [5, 77, 31, 200]
    want, got = ref.forward(torch.tensor(ids), cache)[-1], ex.forward(ids)[-1]
    assert (got - want).abs().max() < 1e-2 and int(got.argmax()) == int(want.argmax())
    nxt = [int(want.argmax())]
    want, got = ref.forward(torch.tensor(nxt), cache)[-1], ex.forward(nxt)[-1]
    assert (got - want).abs().max() < 1e-2 and int(got.argmax()) == int(want.argmax())
    assert (ex.e.provider.issued.get("and", 0) > 0) == ranges.comparisons and ex.e.provider.name == "ot"


def test_rms_norm_on_shares_over_a_wide_range_of_row_scales(tiny):
    from shardlm.models import nonlinear as nl
    from shardlm.models.plan import Norm

    model = tiny["llama"]
    step = next(s for s in model.plan.steps if isinstance(s, Norm))
    ex = mpc.MPCExecutor(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 64, generator=g) * torch.tensor([0.05, 0.3, 1, 10, 60, 90])[:, None]  # ms 2.5e-3 .. 8e3
    x[5, 3] = 700.0  # one large channel
    y = ex.e.reveal(ex.norm(step, ex.e.share(x))[0])
    want = nl.rms_norm(x.double(), model.weights[step.weight].double(), step.eps)
    assert ((y - want).abs() <= 2e-3 + 2e-3 * want.abs()).all(), (y - want).abs().max()


def test_rsqrt_started_by_comparisons_is_as_accurate_in_a_fraction_of_the_rounds():
    """SmolLM2's norm range (d = 576, mean squares 1e-3 .. 1e6): the same error as Newton from a
    constant start, 11 rounds instead of 217."""
    lo, hi = 576 * 1e-3, 576 * 1e6
    x = torch.exp(torch.linspace(math.log(lo), math.log(hi), 2001)).double()
    want = torch.rsqrt(x)
    rounds = {}
    for guess in (False, True):
        e = mpc.Engine()
        e.rsqrt_guess = guess
        X = e.share(x)
        r0 = e.stats.rounds
        y = e.reveal(e.rsqrt(X, lo, hi))
        rounds[guess] = e.stats.rounds - r0
        assert ((y - want).abs() <= 1e-4 + 1e-3 * want).all(), (guess, ((y - want).abs() / want).max())
    assert rounds == {False: 217, True: 11}


def _cmp_engine():
    e = mpc.Engine()
    e.exact_max = e.clip_sigmoid = e.rsqrt_guess = True
    return e


def _exp_softmax(e, s):
    """The softmax's exp: u = x / 162 (one truncation round here; the softmax takes it from the max),
    four cubings and a squaring."""
    u = e.trunc(e.mul_int(s, round(2 ** 32 / 162)), 32)
    return e.exp(u, n=1, cubes=4, given_u=True)


CMP_CASES = [  # with secure comparisons (Ranges.comparisons): name, fn, plaintext, inputs, atol, rtol, rounds
    ("reciprocal", lambda e, s: e.reciprocal(s, 0.01, 500, cmp=True), lambda t: 1 / t, torch.linspace(0.01, 500, 4001),
     1e-4, 1e-3, 12),
    ("reciprocal_sigmoid", lambda e, s: e.reciprocal(s, 2, 3200, cmp=True, num_bits=8), lambda t: 256 / t,
     torch.linspace(2, 3200, 4001), 1e-4, 3e-4, 11),
    ("rsqrt", lambda e, s: e.rsqrt(s, 1e-2, 1e2), torch.rsqrt, torch.linspace(1e-2, 1e2, 2001), 1e-4, 1e-3, 11),
    ("rsqrt_times", lambda e, s: e.rsqrt(s, 1e-2, 1e2, times=e.add_public(s, 1.0)), lambda t: (t + 1) * torch.rsqrt(t),
     torch.linspace(1e-2, 1e2, 2001), 1e-4, 1e-3, 11),
    ("exp_softmax", lambda e, s: _exp_softmax(e, s), torch.exp, torch.linspace(-12, 0.5, 2001), 1e-5, 1e-3, 9),
    ("exp_softmax_far", lambda e, s: _exp_softmax(e, s), torch.exp, -torch.logspace(1, math.log10(440), 2001), 1e-5, 0, 9),
    ("silu", lambda e, s: e.silu(s), F.silu, torch.linspace(-60, 60, 4001), 2e-3, 3e-4, 17),
    ("sigmoid", lambda e, s: e.sigmoid(s), torch.sigmoid, torch.linspace(-60, 60, 4001), 3e-4, 0, 17),
    ("gelu", lambda e, s: e.gelu_tanh(s), lambda t: F.gelu(t, approximate="tanh"), torch.linspace(-4, 4, 2001),
     5e-4, 0, 23),
]


@pytest.mark.parametrize("name,fn,ref,x,atol,rtol,rounds", CMP_CASES, ids=[c[0] for c in CMP_CASES])
def test_nonlinear_with_comparisons_over_its_range(name, fn, ref, x, atol, rtol, rounds):
    e = _cmp_engine()
    X = e.share(x)
    r0 = e.stats.rounds
    y = e.reveal(fn(e, X))
    want = ref(x.double())
    assert ((y - want).abs() <= atol + rtol * want.abs()).all(), (y - want).abs().max()
    assert e.stats.rounds - r0 == rounds


def test_silu_gate_is_silu_times_up_in_the_rounds_of_silu():
    e = _cmp_engine()
    g = torch.Generator().manual_seed(2)
    x, u = torch.randn(8, 300, generator=g) * 20, torch.randn(8, 300, generator=g) * 5
    x[0, :100], u[0, :100] = torch.linspace(-3900, 3900, 100), 4.0  # |gate * up| up to 15600 (SmolLM2's
    # massive-activation token overflowed an earlier version here)
    X, U = e.share(x), e.share(u)
    r0 = e.stats.rounds
    y = e.reveal(e.silu_gate(X, U))
    want = F.silu(x.double()) * u.double()
    assert ((y - want).abs() <= 2e-3 * (1 + u.double().abs()) + 3e-4 * want.abs()).all(), (y - want).abs().max()
    assert e.stats.rounds - r0 == 17


def test_silu_gate_on_a_linear_layers_untruncated_outputs_saves_its_truncation_round():
    """gate and up as a linear layer leaves them (scale 2^(F + k_j) per column, k_j public): the
    comparisons read them as they are (ltz with a per-element scale), their truncations ride in the
    round after the comparisons: the same values as from the truncated inputs, one round less."""
    e = _cmp_engine()
    g = torch.Generator().manual_seed(3)
    x, u = torch.randn(4, 96, generator=g) * 20, torch.randn(4, 96, generator=g) * 5
    x[0, :48] = torch.linspace(-3900, 3900, 48)
    x[1, :8] = torch.tensor([0.0, 1e-6, -1e-6, 16.0, -16.0, 16.01, -15.99, 2.0 ** -20])
    k = torch.randint(4, 17, (96,), generator=g)  # per-column shifts, as encode_weights_pow2's
    raw = [e.share(t * 2.0 ** k.double()) for t in (x, u)]  # x 2^(F + k): what W a holds
    want = F.silu(x.double()) * u.double()
    r0 = e.stats.rounds
    y = e.reveal(e.silu_gate(*(mpc.LazySum(None, r, k) for r in raw)))
    lazy_rounds, r0 = e.stats.rounds - r0, e.stats.rounds
    y2 = e.reveal(e.silu_gate(*e.trunc_many([(r, k) for r in raw])))  # the layer's truncation: one round
    assert e.stats.rounds - r0 == lazy_rounds + 1 == 18
    for got in (y, y2):
        assert ((got - want).abs() <= 2e-3 * (1 + u.double().abs()) + 3e-4 * want.abs()).all(), (got - want).abs().max()
    sign = e.reveal(e.ltz(raw[0], bound=e.CMP_BOUND, slack=e.CMP_SLACK, scale=k.expand(4, 96))) * 2.0 ** e.f
    assert (sign[x < 0] == 1).all() and (sign[x >= e.CMP_SLACK] == 0).all()


@pytest.mark.parametrize("bound,slack", [(None, None), (4000.0, 1 / 8), (100.0, 1 / 1024)])
def test_bounded_comparison_is_exact_below_zero_and_off_only_within_the_slack(bound, slack):
    e = mpc.Engine()
    lim = 2.0 ** 40 if bound is None else bound
    x = torch.cat([torch.linspace(-lim, lim, 5001, dtype=torch.float64), torch.tensor([0.0, -2.0 ** -20, 2.0 ** -20]),
                   torch.linspace(-1, 1, 4001, dtype=torch.float64) * (slack or 1e-3) * 4])
    x = e.decode(e.encode(x))  # what the ring holds
    r0 = e.stats.rounds
    b = e.reveal(e.ltz(e.share(x), bound, slack)) * 2.0 ** e.f  # decode divides by 2^F: back to the bit
    assert ((b == 0) | (b == 1)).all()
    assert (b[x < 0] == 1).all()
    ok = x >= (slack or 2.0 ** -20)
    assert (b[ok] == 0).all()
    p = 64 - 1 if bound is None else e.f + math.ceil(math.log2(bound + slack)) - \
        (math.floor(math.log2(slack * 2.0 ** e.f)) - 1)
    assert e.stats.rounds - r0 == 2 + max(0, math.ceil(math.log2(p)))


def _bit_means(words: torch.Tensor) -> torch.Tensor:
    """Mean of each of the 64 bit positions over int64 words."""
    w = words.reshape(-1, 1)
    return ((torch.bitwise_right_shift(w, torch.arange(64)) & 1).double()).mean(0)


def test_ot_and_triples_are_correct_at_scale_uniform_and_single_use():
    """Boolean triples from random OT: 1.3M bit triples, XOR shares combine to c = a & b, each
    party's shares alone are balanced bits (overall and per bit position), single use."""
    from shardlm.protocols.mpc import beaver_ot

    p = beaver_ot.OTProvider(batch=1 << 14)
    t = p.and_((160, 128))  # 20480 words = 1.31M AND bits (more than a pool: the pool grows to fit)
    a, b, c = (x[0] ^ x[1] for x in (t.a, t.b, t.c))
    assert torch.equal(c, a & b)
    assert not t.a[1].eq(0).all() and not t.c[0].eq(0).all()  # both slots are real in the simulator
    n_bits = 64 * t.a[0].numel()
    for share in (*t.a, *t.b, *t.c):  # each share alone: uniform bits
        m = _bit_means(share)
        assert abs(float(m.mean()) - 0.5) < 5 * 0.5 / math.sqrt(n_bits)
        assert ((m - 0.5).abs() < 5 * 0.5 / math.sqrt(n_bits / 64)).all()
    # a_c comes out of the client's sender OTs, b_s is the server's choice: independent; c is
    # 1 on a quarter of the bits
    assert abs(float(_bit_means(t.a[0] & t.b[1]).mean()) - 0.25) < 0.002
    assert abs(float(_bit_means(c).mean()) - 0.25) < 0.002
    assert p.issued["and"] == 1 and p.elements["and"] == 160 * 128
    t.take()
    with pytest.raises(beaver.TripleReuseError):
        t.take()


def test_ot_and_triples_never_hand_out_a_word_twice_across_pool_refills():
    from shardlm.protocols.mpc import beaver_ot

    p = beaver_ot.OTProvider(batch=1000)
    got = [p.and_((n,)) for n in (600, 300, 200, 999, 1, 1500, 7)]  # 4 refills after the first pool
    assert p._cursors["and"] == 7 and p.pool_size("and") == 1000
    for t in got:
        a, b, c = (x[0] ^ x[1] for x in (t.a, t.b, t.c))
        assert torch.equal(c, a & b)
    for side in range(2):  # 64-bit uniform words: a repeat would mean a reused slice of a pool
        words = torch.cat([t.a[side] for t in got] + [t.b[side] for t in got])
        assert words.unique().numel() == words.numel()
    assert len({t.serial for t in got}) == len(got)


def test_the_other_partys_slot_costs_nothing_and_cannot_be_read():
    """A party engine's other slot (protocols/mpc/void.py): every operation gives it back, reading it
    raises, so a slot mix-up fails instead of computing with zeros."""
    from shardlm.protocols.mpc.void import VOID, real

    t = torch.arange(6).view(2, 3)
    for got in (t + VOID, 1 - VOID, VOID * t, t ^ VOID, torch.cat([t, VOID]), torch.bitwise_right_shift(VOID, 3),
                VOID[..., :1].reshape(-1), torch.where(t > 2, VOID, t), VOID.sum(-1, keepdim=True)):
        assert got is VOID
    with pytest.raises(AttributeError):
        VOID.shape
    with pytest.raises(TypeError):
        bool(VOID)
    assert real(VOID, t) is t and mpc.Shared(VOID, t).shape == (2, 3)
    with pytest.raises(ValueError):
        real(VOID, VOID)
