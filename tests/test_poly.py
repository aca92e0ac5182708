"""Polynomials on shares (protocols/mpc/poly.py): the correlations every provider makes, one-round
evaluation, and lazy truncations and comparison bits riding in the round of their product."""

import pytest
import torch

from shardlm.protocols import mpc, ring
from shardlm.protocols.mpc import Lazy, Shared, beaver, beaver_ot, poly
from shardlm.protocols.mpc.poly import Poly
from shardlm.protocols.mpc.void import VOID

SUBSETS = ((0, 1), (0, 2), (1, 1), (0, 1, 2), (0, 1, 1))


def _check_correlation(masks, prods):
    for S, p in prods.items():
        want = masks[S[0]]
        for i in S[1:]:
            want = want * masks[i]
        assert torch.equal(p, want), S


@pytest.mark.parametrize("provider", ["dealer", "seeded", "ot"])
def test_every_provider_makes_masks_and_their_products(provider):
    shape = (3, 7)
    if provider == "seeded":
        seed = bytes(range(32))
        c, s = beaver.SeededDealerProvider("client", seed, 64), beaver.SeededDealerProvider("server", seed, 64)
        tc, ts = c.poly(shape, 3, SUBSETS), s.poly(shape, 3, SUBSETS)
        assert tc.masks[0][1] is VOID and ts.masks[0][0] is VOID  # each party holds only its own shares
        masks = [a[0] + b[1] for a, b in zip(tc.masks, ts.masks)]
        prods = {S: tc.prods[S][0] + ts.prods[S][1] for S in SUBSETS}
    else:
        p = beaver.DealerProvider() if provider == "dealer" else beaver_ot.OTProvider(batch=64)
        t = p.poly(shape, 3, SUBSETS)
        masks = [a[0] + a[1] for a in t.masks]
        prods = {S: v[0] + v[1] for S, v in t.prods.items()}
    assert all(m.shape == shape for m in masks)
    assert len({m[0, 0].item() for m in masks}) == 3  # independent masks
    _check_correlation(masks, prods)


def test_a_correlation_is_single_use():
    t = beaver.DealerProvider().poly((4,), 2, ((0, 1),))
    t.take()
    with pytest.raises(beaver.TripleReuseError):
        t.take()


def test_a_polynomial_is_multiplied_out_in_one_round_exactly():
    """Degree 4 with repeated variables, tensor and int coefficients and a constant: the ring value
    of the plaintext polynomial, exactly, in one round that opens one masked value per variable."""
    e = mpc.Engine()
    prg = ring.MaskPRG()
    vals = [prg.ring(5, 6) for _ in range(3)]
    xs = [Shared(v - r, r) for v in vals for r in [prg.ring(5, 6)]]
    coef = prg.ring(5, 6)
    p = Poly(xs, {(0, 1, 1, 2): 3, (0, 2): coef, (1,): -7, (): 11})
    r0, o0 = e.stats.rounds, e.stats.opened_elements
    (z,) = e.run([("force", p)])
    a, b, c = vals
    assert torch.equal(z.c + z.s, 3 * a * b * b * c + coef * a * c - 7 * b + 11)
    assert e.stats.rounds - r0 == 1 and e.stats.opened_elements - o0 == 3 * 30


def test_a_product_of_lazy_truncations_equals_truncating_first_in_one_round_less():
    """x y truncated, times z: the lazy truncation gives the same ring value as the eager one (the
    same local shifts and wrap bits of the same shares), in 2 rounds instead of 3 (squares too)."""
    g = torch.Generator().manual_seed(0)
    e = mpc.Engine()
    x, y, z = (e.share(torch.randn(200, generator=g) * 30) for _ in range(3))
    (xy,) = e.run([("mul", x, y, None)])
    r0 = e.stats.rounds
    t = e.trunc(xy, e.f)
    eager = e.run([("mul", t, z, None), ("mul", t, t, None)])
    r1 = e.stats.rounds
    lz = e.lazy_trunc(xy, e.f)
    lazy = e.run([("mul", lz, z, None), ("mul", lz, lz, None)])
    r2 = e.stats.rounds
    for u, v in zip(eager, lazy):
        assert torch.equal(u.c + u.s, v.c + v.s)
    assert (r1 - r0, r2 - r1) == (2, 1)


def test_lazy_results_chain_one_round_per_product():
    """x^(2^4) by four lazy squarings: 4 rounds and one to force, against 8 eager."""
    e = mpc.Engine()
    x = torch.linspace(-1.2, 1.2, 101, dtype=torch.float64)
    y, r0 = e.share(x), e.stats.rounds
    for _ in range(4):
        (y,) = e.run([("mul", y, y, Lazy(e.f))])
    out = e.reveal(e.force(y))
    assert e.stats.rounds - r0 == 5
    want = x ** 16
    assert ((out - want).abs() <= 1e-5 + 2e-5 * want).all()


def test_a_lazy_comparison_bit_rides_in_its_products_round():
    """relu = x - x [x < 0] with the bit's XOR-to-additive step inside the product's round: exact."""
    e = mpc.Engine()
    x = torch.linspace(-50, 50, 1001, dtype=torch.float64)
    X = e.share(x)
    r0 = e.stats.rounds
    bit = e.ltz(X, lazy=True)
    r1 = e.stats.rounds
    (z,) = e.run([("mul", X, bit, None)])
    assert e.stats.rounds - r1 == 1 and r1 - r0 == 7  # the AND rounds only, then the product
    assert torch.equal(e.reveal(X - z), e.decode(e.encode(x)).clamp_min(0))
    with pytest.raises(ValueError):
        e.ltz(X, lazy=True, also=[("trunc", X, 1)])


def test_a_truncation_of_a_general_polynomial_is_refused():
    e = mpc.Engine()
    X = e.share(torch.ones(3))
    with pytest.raises(TypeError):
        e.run([("trunc", Poly.of(X), 2)])


def test_a_truncations_wrap_bits_are_opened_in_their_low_k_bits_only():
    """In ``(L - 2^(64-k) (mc + ms - mc ms)) y`` the wrap bits only appear times 2^(64-k): only the
    low k bits of their openings are read (and sent); L and y are read whole."""
    e = mpc.Engine()
    x, y = e.share(torch.randn(10)), e.share(torch.randn(10))
    lz = e.lazy_trunc(x, 20)
    vars, _, opened, _, need, _, _ = poly.plan([lz * Poly.of(y)])
    names = {id(lz.vars[0]): "L", id(lz.vars[1]): "mc", id(lz.vars[2]): "ms", id(y): "y"}
    assert {names[id(vars[i])]: b for i, b in zip(opened, need)} == {"L": 64, "mc": 20, "ms": 20, "y": 64}


@pytest.mark.parametrize("provider", ["dealer", "ot"])
def test_the_parties_own_wrap_bits_open_as_one_bit_only_when_the_client_deals(provider):
    """A truncation's wrap bits: with the client as dealer (who knows every mask and could unmask
    anything anyway) the server's ``ms`` (mpc.ServerBit) is opened as it is and the client's
    ``mc`` (mpc.ClientBit) as ``mc XOR a`` for a random bit mask a: one bit each, and no mask
    product involves ``ms``; with jointly generated (OT) correlations both are masked ring
    elements like any variable. The value is the same either way."""
    e = mpc.Engine(beaver.DealerProvider() if provider == "dealer" else beaver_ot.OTProvider(batch=256))
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, generator=g) * 50, torch.randn(64, generator=g) * 3
    X, Y = e.share(x), e.share(y)
    lz = e.lazy_trunc(X, 20)
    pl = poly.plan([lz * Poly.of(Y)], e._shown, e._xor)
    assert isinstance(lz.vars[1], mpc.ClientBit) and isinstance(lz.vars[2], mpc.ServerBit)
    if provider == "dealer":  # L, mc (XOR-masked), y; then ms as it is
        assert [pl.vars[i] for i in pl.opened] == [lz.vars[0], lz.vars[1], Y, lz.vars[2]]
        assert pl.n_masked == 3 and pl.bit_slots == (1,) and pl.need == [64, 1, 64, 1]
        assert all(3 not in S for S in pl.subsets)
        corr = e.provider.poly((64,), 3, pl.subsets, pl.bit_slots)
        assert set(corr.bits[1].unique().tolist()) <= {0, 1}  # the mask of mc: a random bit ...
        assert torch.equal(corr.masks[1][0] + corr.masks[1][1], corr.bits[1])  # ... shared additively
    else:
        assert pl.n_masked == 4 and pl.bit_slots == () and pl.need == [64, 20, 20, 64]
        with pytest.raises(ValueError):
            e.provider.poly((64,), 2, [(0, 1)], (1,))
    (z,) = e.run([("mul", lz, Y, e.f)])
    want = e.decode(e.encode(x) // 2 ** 20) * y
    assert (e.reveal(z) - want).abs().max() < 1e-4


def test_a_tensor_coefficient_of_one_value_is_an_int_and_a_vanishing_one_drops_out():
    """Per-element shifts that all agree make int coefficients, so that a product of two
    truncations loses its terms with ``2^(64-k) 2^(64-k') = 0 mod 2^64`` (fewer monomials and
    mask products), and the value is still exact; shifts that differ stay a tensor."""
    g = torch.Generator().manual_seed(1)
    e = mpc.Engine()
    x, y = (e.share(torch.randn(40, generator=g) * 30) for _ in range(2))
    (xy,) = e.run([("mul", x, y, None)])
    same = e.lazy_trunc(xy, torch.full((40,), e.f))
    assert all(isinstance(c, int) for c in same.terms.values())
    sq = same * same
    assert all(m.count(1) <= 1 and m.count(2) <= 1 for m in sq.terms)  # no (wrap bit)^2 term
    assert len(sq.terms) < len(same.terms) ** 2
    (got,) = e.run([("force", sq)])
    t = e.trunc(xy, e.f)
    (want,) = e.run([("mul", t, t, None)])
    assert torch.equal(got.c + got.s, want.c + want.s)
    differ = e.lazy_trunc(xy, torch.arange(40) % 3 + e.f)
    assert any(isinstance(c, torch.Tensor) for c in differ.terms.values())
