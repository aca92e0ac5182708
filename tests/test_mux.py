"""The OT multiplexer (protocols/mpc/mux.py): ``b x`` for a XOR-shared bit and an additively
shared value by two 1-of-2 OTs per element, v3-ot's ReLU/clip/max step.

- exact at scale through the engine (both parties over an in-memory channel), and relu/clip/max
  through v3-ot's engine equal their plaintext;
- the receiver's view: its chosen entries are uniform whatever x and the bits (chi-square), and
  the check fails when the sender's mask r is not fresh (a broken variant);
- the cost: 32 bytes each way per element, against ~3 KB for a Beaver product by OT triples.
"""
import numpy as np
import pytest
import torch

from shardlm.protocols.mpc import lut, mux

from ot_support import run_ext
from support import assert_uniform_ring


@pytest.fixture(scope="module")
def eng(lut_engine):
    return lut_engine


def test_mux_is_exact_at_scale_and_cheap(eng):
    g = torch.Generator().manual_seed(0)
    v = torch.randint(-(1 << 62), 1 << 62, (20_000,), generator=g)
    x = eng.share(torch.zeros(20_000))
    x = type(x)(v - x.s, x.s)  # arbitrary ring values, uniformly shared
    bc, bs = (torch.randint(0, 2, (20_000,), generator=g) for _ in range(2))
    b0 = eng.provider.ot_bytes
    z = eng.mux(x, bc, bs)
    assert torch.equal(z.c + z.s, (bc ^ bs) * v)
    per_element = (eng.provider.ot_bytes - b0) / 20_000
    assert per_element <= 2 * 32 + 1, per_element  # both ways: 16 B of IKNP columns + 2 x 8 B entries


def test_relu_clip_and_max_through_the_multiplexer(eng):
    x = torch.linspace(-30, 30, 241).reshape(1, -1)
    assert torch.allclose(eng.reveal(eng.relu(eng.share(x))), x.double().clamp(min=0), atol=2 ** -19)
    y = eng.reveal(eng.clip(eng.share(x), -7.875, 7.875, bounded=True))
    assert ((y - x.double().clamp(-7.875, 7.875)).abs() <= eng.CMP_SLACK + 2 ** -19).all()
    s = torch.randn(5, 3, 21, generator=torch.Generator().manual_seed(3)) * 9
    m = eng.reveal(eng.max_last(eng.share(s), bounded=True))
    assert m.shape == (5, 3, 1) and torch.allclose(m, s.double().amax(-1, keepdim=True), atol=2 ** -19)


def _received(monkeypatch=None, fixed=None):
    """What the receiver obtains for x = 1 everywhere, random bits on both sides."""
    n = 8192
    x = np.ones(n, dtype=np.uint64)
    b_s = np.random.default_rng(1).integers(0, 2, n).astype(np.uint64)
    b_r = np.random.default_rng(2).integers(0, 2, n)
    if fixed is not None:
        monkeypatch.setattr(lut, "random_ring", lambda k: np.full(k, fixed, dtype=np.uint64))
    r, got, _, _ = run_ext(lambda ch, S: mux.offer(ch, S, x, b_s), lambda ch, R: mux.choose(ch, R, b_r))
    assert np.array_equal(got + r, (b_s ^ b_r.astype(np.uint64)) * x)
    return got


def test_receiver_view_is_uniform_and_fails_without_a_fresh_mask(monkeypatch):
    got = _received()
    assert_uniform_ring([got.view(np.int64)])
    broken = _received(monkeypatch, fixed=12345)  # a reused mask: the entries show b x
    with pytest.raises(AssertionError):
        assert_uniform_ring([broken.view(np.int64)])


def test_bit_product_by_one_correlated_ot(eng):
    """``bc bs c`` (a client bit, a server bit, a public constant): exact, 24 bytes each element,
    and the client's outputs uniform; a zero pad (the correction sent as it is) shows b c."""
    g = torch.Generator().manual_seed(5)
    bc, bs = (torch.randint(0, 2, (20_000,), generator=g) for _ in range(2))
    c = torch.randint(-(1 << 62), 1 << 62, (20_000,), generator=g)
    b0 = eng.provider.ot_bytes
    z = eng.bit_product(bc, bs, c)
    assert torch.equal(z.c + z.s, bc * bs * c)
    assert (eng.provider.ot_bytes - b0) / 20_000 <= 24 + 1
    assert_uniform_ring([z.c.numpy()])
    with pytest.raises(AssertionError):  # what the client would hold without the pad x (a broken variant)
        assert_uniform_ring([(bc * bs * c).numpy()])
