"""protocols/ring: fixed point, CSPRNG masks, and the exact limb product mod 2^64."""
import numpy as np
import pytest
import torch

from shardlm.protocols import ring


@pytest.mark.parametrize("rows,kernel", [(4, "fbgemm"), (4, "int_mm"), (ring.INT8_MAX_ROWS + 3, "float64")])
@pytest.mark.parametrize("max_w,k", [(1, 7), (127, 64), (ring.WMAX, 1536), (ring.WMAX, 300), (300, 5000),
                                     (ring.WMAX, 20000)])
def test_ring_product_is_exact_mod_2_64(max_w, k, rows, kernel):
    if kernel == "fbgemm" and not ring.fbgemm_exact():
        pytest.skip("fbgemm is not exact on this CPU: its products use the float64 limbs (int_mm is the GPU's)")
    g = torch.Generator().manual_seed(k)
    w = torch.randint(-max_w, max_w + 1, (5, k), generator=g)
    w[0, :] = max_w  # the bounds are reached: a full row of extreme weights ...
    w[1, :] = -max_w
    m = ring.random_ring(rows, k)
    m[0, :] = -1  # ... times all-ones words, the limb split's worst case
    m[1, :] = -(2**63)
    m[2, :] = 2**63 - 1
    R = ring.RingMatrix(w, kernel=kernel)
    assert R.kernel(rows) == kernel
    got = (R._matmul_f64 if kernel == "float64" else R._matmul_int8)(m)  # each kernel, whichever matmul picks
    want = ring.exact_matmul_reference(m.numpy(), w.numpy())
    assert np.array_equal(got.numpy(), want)
    assert np.array_equal(R.matmul(m).numpy(), want)


def test_weights_outside_the_digit_range_are_refused():
    with pytest.raises(OverflowError):
        ring.RingMatrix(torch.full((2, 3), ring.WMAX + 1))
    with pytest.raises(OverflowError):
        ring.RingMatrix(torch.ones((2, 140000), dtype=torch.int64))  # int32 accumulation bound


def test_weight_encoding_keeps_every_row_precise():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 50, generator=g) * torch.tensor([1e-3, 0.02, 0.5, 9.25, 100.0, 0.0])[:, None]
    w_int, scales = ring.encode_weights(w)
    assert int(w_int.abs().max()) == ring.WEIGHT_SCALE_MAX
    back = w_int.double() / scales[:, None]
    rel = (back - w).abs().amax(dim=1) / w.abs().amax(dim=1).clamp_min(1e-30)
    assert (rel[:5] <= 0.5 / ring.WEIGHT_SCALE_MAX + 1e-12).all()  # half a step of each row's own scale
    assert (w_int[5] == 0).all()


def test_masking_then_unmasking_recovers_the_plain_product():
    fx = ring.FixedPoint()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 64, generator=g) * 0.1
    x = torch.randn(4, 64, generator=g) * 3
    W = ring.RingMatrix.from_float(w)
    bits = fx.bits_for(float(x.abs().max()), W.max_row_l1)
    assert 20 <= bits <= fx.max_bits
    r = ring.random_ring(4, 64)
    masked = fx.encode(x, bits) - r  # what the server sees
    y = fx.decode_product(W.matmul(masked) + W.matmul(r), bits, W.row_scales)
    assert torch.allclose(y, x @ w.T, atol=1e-5)
    # and it equals the unmasked fixed-point product exactly, bit for bit
    assert torch.equal(W.matmul(masked) + W.matmul(r), W.matmul(fx.encode(x, bits)))


def test_fixed_point_bits_keep_products_inside_the_ring():
    fx = ring.FixedPoint()
    assert fx.bits_for(1.0, 2**20) == fx.max_bits  # plenty of room: capped
    bits = fx.bits_for(3000.0, 2**30)
    assert 3000 * 2**bits * 2**30 < 2**62 <= 3000 * 2 ** (bits + 1) * 2**30
    with pytest.raises(OverflowError):
        fx.bits_for(2.0**40, 2**20)
    # exactly: the largest encoded |x| (rounded) times L1 stays below 2^62, also where amax * L1 is
    # a power of two and the float budget alone would reach 2^62 (protocols/verify's bound)
    for amax, l1 in [(1.0, 2**22), (0.5, 2**30), (3.0, 2**40), (2.0**-3, 2**50), (3000.0, 2**30)]:
        bits = fx.bits_for(amax, l1)
        assert int(np.floor(amax * 2.0**bits + 0.5)) * l1 < 2**62
        assert bits == fx.max_bits or int(np.floor(amax * 2.0**(bits + 1) + 0.5)) * l1 >= 2**62  # no bit wasted


def test_mask_prg_is_seeded_uniform_and_fresh():
    a = ring.MaskPRG()
    b = ring.MaskPRG(a.seed)
    x = a.ring(1000, 64)
    assert torch.equal(x, b.ring(1000, 64))  # reproducible from the seed
    assert not torch.equal(x, ring.MaskPRG().ring(1000, 64))  # fresh seeds differ
    bits = np.unpackbits(x.numpy().view(np.uint8))
    # 512k bits: the balance is within 5 standard deviations of a fair coin
    assert abs(bits.mean() - 0.5) < 5 * 0.5 / np.sqrt(bits.size)
    # every byte position is uniform (chi-square, 255 dof; the 1e-6 tail is ~370)
    by_pos = x.numpy().view(np.uint8).reshape(-1, 8)
    for pos in range(8):
        counts = np.bincount(by_pos[:, pos], minlength=256)
        expected = by_pos.shape[0] / 256
        assert ((counts - expected) ** 2 / expected).sum() < 370
    with pytest.raises(ValueError):
        ring.MaskPRG(b"short")


def test_mask_rows_slices_the_same_stream():
    seed = ring.MaskPRG().seed
    full = ring.MaskPRG(seed).ring(10, 6)
    for start, n in [(0, 10), (3, 4), (9, 1), (1, 2)]:
        assert torch.equal(ring.mask_rows(seed, start, n, 6), full[start:start + n])
    odd = ring.MaskPRG(seed).ring(7, 5)  # 40-byte rows: slices start mid AES block
    assert torch.equal(ring.mask_rows(seed, 3, 3, 5), odd[3:6])


@pytest.mark.parametrize("bits", [10, 16, 17, 32, 63])
def test_packed_low_bits_round_trip_and_take_a_fraction_of_the_words(bits):
    v = ring.MaskPRG().ring(1001)
    p = ring.pack_low(v, bits)
    lane = ring.lane_bits(bits)
    assert p.dtype == torch.int64 and p.numel() == -(-1001 * lane // 64)
    back = ring.unpack_low(p, 1001, bits)
    low = (1 << bits) - 1 if bits < 64 else -1
    assert torch.equal(back & low, v & low)  # every meaningful bit survives
