"""v3-ot's comparisons by the millionaires' protocol over 1-of-N OT (protocols/mpc/millionaire.py),
in memory (the two-party simulator and a raw channel pair):

- the carry bit, hence bit p of xc + xs, against plaintext at scale (1.2 10^4 per case) over random
  and edge values (0, 2^p - 1, equal digits, digits equal but one, p not a multiple of m, p = 1);
- ltz, clip and the max through LutEngine give the same bits as Kogge-Stone on the same shares,
  in fewer rounds (counted);
- both views: the client's chosen entries and the server's received messages (IKNP columns, AND
  openings) are uniform, and the checks fail on broken variants (entries sent unmasked, one mask
  for every element, r_eq = r_lt, a reused AND triple).
"""
import dataclasses
import math

import numpy as np
import pytest
import torch

from shardlm.protocols import mpc
from shardlm.protocols.mpc import beaver_ot, millionaire
from shardlm.protocols.mpc.approx_lut import LutEngine
from shardlm.protocols.mpc.shares import Shared
from shardlm.wire.msgtypes import MsgType

from ot_support import run_ext
from support import assert_uniform_ring

MASK64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def eng(lut_engine):
    return lut_engine


def _edge_addends(p: int, m: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n addends (xc, xs) as two int64 arrays: random, and (half of them) the edges of the comparison
    [y < x] with x = xc mod 2^p, y = 2^p - 1 - (xs mod 2^p): x = 0, x = 2^p - 1, y = 0, y = 2^p - 1,
    y = x, and y = x but for one digit (one more, one less, or mirrored there), under random high bits."""
    rng = np.random.default_rng(seed)
    q, w = millionaire.split(p, m)
    top = (1 << p) - 1
    xc = [int(v) for v in rng.integers(0, 1 << 63, n, dtype=np.uint64) * 2 + rng.integers(0, 2, n, dtype=np.uint64)]
    xs = [int(v) for v in rng.integers(0, 1 << 63, n, dtype=np.uint64) * 2 + rng.integers(0, 2, n, dtype=np.uint64)]
    high = lambda v: v & ~top & MASK64  # noqa: E731 (keep the bits above p)
    for i in range(0, n // 2):  # half the batch on the edges
        x, y = xc[i] & top, top - (xs[i] & top)
        case = i % 8
        if case == 0:
            x = 0
        elif case == 1:
            x = top
        elif case == 2:
            y = 0
        elif case == 3:
            y = top
        elif case == 4:
            y = x
        else:  # y = x except in one digit: one more, one less, or its mirror image there
            d = (i // 8) % q
            dig = (x >> (w * d)) & ((1 << w) - 1)
            new = {5: dig + 1, 6: dig - 1, 7: (1 << w) - 1 - dig}[case] % (1 << w)
            y = ((x & ~(((1 << w) - 1) << (w * d))) | (new << (w * d))) & top
        xc[i] = high(xc[i]) | x
        xs[i] = high(xs[i]) | (top - y)
    return (np.array(xc, dtype=np.uint64).view(np.int64), np.array(xs, dtype=np.uint64).view(np.int64))


@pytest.mark.parametrize("p,m", [(1, 4), (2, 4), (7, 2), (16, 4), (17, 4), (20, 3), (32, 5), (30, 6), (63, 4)])
def test_bit_p_of_the_sum_against_plaintext_at_scale(eng, p, m):
    xc, xs = _edge_addends(p, m, 12_000, seed=p * 10 + m)
    tc, ts = torch.from_numpy(xc), torch.from_numpy(xs)
    bc, bs = millionaire.sum_bit(eng, tc, ts, p, m)
    want = torch.bitwise_right_shift(tc + ts, p) & 1
    assert torch.equal(bc ^ bs, want)
    # and the carry alone is [y < x]: both values occur, and the equal-digit edges (y = x) give 0
    carry = want ^ (torch.bitwise_right_shift(tc, p) & 1) ^ (torch.bitwise_right_shift(ts, p) & 1)
    assert 0 < int(carry.sum()) < carry.numel()
    top = (1 << p) - 1
    x = xc.view(np.uint64) & np.uint64(top)
    y = np.uint64(top) - (xs.view(np.uint64) & np.uint64(top))
    assert np.array_equal(carry.numpy().astype(bool), y < x)
    assert (x == y).sum() >= 12_000 // 16 and (carry.numpy()[x == y] == 0).all()


def _pair():
    """A LutEngine and a v3-mpc Engine (Kogge-Stone), both on OT triples, recording nothing."""
    return (LutEngine(beaver_ot.OTProvider(batch=1 << 12, prefill_and=True)),
            mpc.Engine(beaver_ot.OTProvider(batch=1 << 12, prefill_and=True)))


def test_ltz_clip_and_max_equal_kogge_stones_bits_in_fewer_rounds():
    lut_e, ks_e = _pair()
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(700, generator=g) * 50, torch.tensor([0.0, -2.0 ** -20, 2.0 ** -20, 1 / 16, -1 / 16]),
                   (torch.rand(295, generator=g) - 0.5) / 4])  # around 0: the bounded slack's zone too
    xs = lut_e.share(x)  # the same shares into both engines: every bit must agree, slack zone included
    for kw, rounds in [({}, (6, 8)), (dict(bound=4000.0, slack=1 / 8), (4, 6)), (dict(bound=4000.0), (5, 7))]:
        got = []
        for e in (lut_e, ks_e):
            r0 = e.stats.rounds
            got.append(e.reveal(e.ltz(xs, **kw)))
            got.append(e.stats.rounds - r0)
        assert torch.equal(got[0], got[2]), kw
        assert (got[1], got[3]) == rounds, kw  # OT + tree levels + B2A against the adder's levels + B2A
        exact = x.abs() >= 1 / 8 if kw.get("slack") else torch.ones_like(x, dtype=torch.bool)
        assert torch.equal(got[0][exact] * 2 ** lut_e.f, (x[exact] < 0).double())  # the bit, revealed at scale 2^-F
    lim = 16.0 - lut_e.CMP_SLACK
    a, b = (e.reveal(e.clip(xs, -lim, lim, bounded=True)) for e in (lut_e, ks_e))
    assert torch.equal(a, b) and (a.abs() <= 16.0).all()
    s = x[:200].view(40, 5)  # (the winner products of wide rows are slow in the simulator, not the comparisons)
    ss = lut_e.share(s)
    a, b = (e.reveal(e.max_last(ss, bounded=True)) for e in (lut_e, ks_e))
    assert torch.equal(a, b) and torch.equal(a, lut_e.decode(lut_e.encode(s)).max(-1, keepdim=True).values)


# -- the views ---------------------------------------------------------------------------------------
def _ot_step(x: np.ndarray, y: np.ndarray, p: int = 16, m: int = 4, record: bool = False):
    """The OT step alone between a raw sender (server) and receiver (client): (server's r's,
    client's outputs, server's channel)."""
    (rl, re), (cl, ce), cs, _ = run_ext(lambda ch, S: millionaire.offer(ch, S, y, p, m),
                                         lambda ch, R: millionaire.choose(ch, R, x, p, m), record=record)
    return (rl, re), (cl, ce), cs


def _assert_bits_uniform(bits: np.ndarray) -> None:
    """0/1 bits (a multiple of 64 of them) uniform: packed to words, chi-square per byte position."""
    assert_uniform_ring([np.packbits(bits.reshape(-1), bitorder="little").view(np.int64)])


N_VIEW = 1 << 15


def _client_view(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    (rl, re), (cl, ce), _ = _ot_step(x, y)
    q, w = millionaire.split(16, 4)
    dx, dy = millionaire.digits(x, 16, 4), millionaire.digits(y, 16, 4)
    assert np.array_equal(cl ^ rl, (dy < dx).astype(np.uint8)) and np.array_equal(ce ^ re, (dy == dx).astype(np.uint8))
    return np.stack([cl, ce], -1)


def test_client_view_is_uniform_and_fails_on_broken_masks(monkeypatch):
    # one input for every element: anything but fresh masks shows (lt = 1 in digit 0, eq = 1 above)
    x, y = np.full(N_VIEW, 0x1235, np.uint64), np.full(N_VIEW, 0x1234, np.uint64)
    _assert_bits_uniform(_client_view(x, y))

    fresh = millionaire.random_bits
    broken = {"unmasked": lambda n: np.zeros(n, np.uint8),
              "one mask for all": lambda n: np.repeat(fresh(2), n // 2),
              "r_eq = r_lt": lambda n: np.tile(fresh(n // 2), 2)}
    for name, bits in broken.items():
        monkeypatch.setattr(millionaire, "random_bits", bits)
        got = _client_view(x, y)  # still correct
        monkeypatch.setattr(millionaire, "random_bits", fresh)
        with pytest.raises(AssertionError):
            _assert_bits_uniform(got)
            pytest.fail(f"the client's view passed with {name}")


def _structure(view):
    return [(m.type, m.nbytes) for m in view]


def test_server_view_of_the_ot_is_uniform_and_independent_of_the_inputs():
    rng = np.random.default_rng(7)
    views = []
    for x, y in [(np.full(8192, 0x1235, np.uint64), np.full(8192, 0x1234, np.uint64)),
                 (rng.integers(0, 1 << 16, 8192, dtype=np.uint64), np.zeros(8192, np.uint64))]:
        _, _, cs = _ot_step(x, y, record=True)
        views.append(cs.view)
    assert _structure(views[0]) == _structure(views[1])
    for view in views:
        assert {m.type for m in view} <= {MsgType.OT_BASE_A, MsgType.OT_BASE_B, MsgType.OT_EXT_U}
        u = np.concatenate([m.body["u"].reshape(-1) for m in view if m.type == MsgType.OT_EXT_U])
        assert u.size >= 100_000
        assert_uniform_ring([u[: u.size // 8 * 8].view(np.int64)])


def _and_openings(e: LutEngine, n: int = N_VIEW) -> list[torch.Tensor]:
    """What the parties open in the AND rounds of n equal comparisons (the engine's recorded view)."""
    xc = torch.full((n,), 0x5_1235, dtype=torch.int64)
    xs = torch.full((n,), -0x1234 - 1, dtype=torch.int64)  # y = ~xs mod 2^16 = 0x1234 < x mod 2^16
    e.view.clear()
    bc, bs = e._sum_bit(xc, xs, 16)
    assert torch.equal(bc ^ bs, torch.bitwise_right_shift(xc + xs, 16) & 1)
    return list(e.view)


def _assert_fresh_uniform(opened: list[torch.Tensor]) -> None:
    words = torch.cat([v.reshape(-1) for v in opened])
    assert_uniform_ring([words])
    assert torch.unique(words).numel() == words.numel()  # no opened word twice (DESIGN.md 6.4)


def test_and_openings_are_uniform_and_fail_on_a_reused_triple(monkeypatch):
    e = LutEngine(beaver_ot.OTProvider(batch=1 << 12, prefill_and=True), record=True)
    opened = _and_openings(e)
    q = millionaire.split(16, 4)[0]
    ands = 2 * (q - 1) - math.ceil(math.log2(q))
    assert sum(v.numel() for v in opened) == 2 * ands * N_VIEW // 64  # packed: 64 AND bits to a word
    _assert_fresh_uniform(opened)

    made = {}

    def reused(shape, real=e.provider.and_):  # one triple per shape, handed out again and again
        t = made.setdefault(tuple(shape), real(shape))
        return dataclasses.replace(t, used=False)
    monkeypatch.setattr(e.provider, "and_", reused)
    opened = _and_openings(e)
    opened += _and_openings(e)
    with pytest.raises(AssertionError):
        _assert_fresh_uniform(opened)


def test_combine_tree_on_shares_counts_its_ands(eng):
    """The tree alone on random XOR-shared digit bits: [y < x] from digits (lowest first), with
    2 (q - 1) - ceil(log2 q) ANDs in ceil(log2 q) rounds, for q = 1..9."""
    rng = np.random.default_rng(9)
    for q in range(1, 10):
        dx, dy = rng.integers(0, 3, (500, q)), rng.integers(0, 3, (500, q))  # small digits: many ties
        lt, eq = torch.from_numpy((dy < dx).astype(np.int64)), torch.from_numpy((dy == dx).astype(np.int64))
        r1, r2 = torch.from_numpy(rng.integers(0, 2, lt.shape)), torch.from_numpy(rng.integers(0, 2, lt.shape))
        w0, rd0 = eng.provider.elements.get("and", 0), eng.stats.rounds
        got = millionaire.combine(Shared(lt ^ r1, r1), Shared(eq ^ r2, r2).map(lambda t: t[:, 1:]),
                                  lambda pairs: millionaire.and_bits(eng, pairs))
        want = [tuple(a[::-1]) > tuple(b[::-1]) for a, b in zip(dx, dy)]  # x > y, most significant first
        assert (got.c ^ got.s).tolist() == [int(v) for v in want], q
        ands = 2 * (q - 1) - math.ceil(math.log2(q)) if q > 1 else 0
        assert eng.stats.rounds - rd0 == (math.ceil(math.log2(q)) if q > 1 else 0)
        levels = math.ceil(math.log2(q)) if q > 1 else 0
        assert eng.provider.elements.get("and", 0) - w0 <= math.ceil(ands * 500 / 64) + levels  # packed
