"""The dealer's mask material: correct products, single use, persistence."""
import pytest
import torch

from shardlm.protocols import preprocess, ring
from shardlm.protocols.preprocess import MaterialError, MaterialStore

FX = ring.FixedPoint()


def _units():
    g = torch.Generator().manual_seed(0)
    return {"a": ring.RingMatrix.from_float(torch.randn(8, 6, generator=g)),
            "b": ring.RingMatrix.from_float(torch.randn(3, 10, generator=g))}


def test_material_products_are_exact_and_masks_unmask():
    units = _units()
    store = preprocess.deal(units, {"a": 5, "b": 2}, model_fingerprint="m", variant="v3", fx=FX)
    r, wr = store.take("a", 3)
    assert torch.equal(units["a"].matmul(r), wr)
    x = FX.encode(torch.randn(3, 6), 30)
    assert torch.equal(units["a"].matmul(x - r) + wr, units["a"].matmul(x))
    r2, _ = store.take("a", 2)
    assert not (r2[:, None, :] == r[None, :, :]).all(-1).any()  # no row handed out twice
    with pytest.raises(MaterialError, match="exhausted"):
        store.take("a", 1)


def test_store_on_disk_refuses_rows_used_by_an_earlier_run(tmp_path):
    units = _units()
    store = preprocess.deal(units, {"a": 4, "b": 1}, model_fingerprint="m", variant="v3", fx=FX)
    store.save(tmp_path / "s")
    assert (tmp_path / "s/material.safetensors").stat().st_mode & 0o077 == 0
    first = MaterialStore.load(tmp_path / "s")
    r, wr = first.take("a", 3)
    second = MaterialStore.load(tmp_path / "s")  # e.g. a second `generate --material s`
    with pytest.raises(MaterialError, match="already used"):
        second.take("a", 3)
    r_last, wr_last = second.take("a", 1)
    assert torch.equal(units["a"].matmul(r_last), wr_last)
    assert not (r_last == r).all(-1).any()
    with pytest.raises(MaterialError, match="model_fingerprint"):
        second.check_for("other", "v3", FX)
    second.check_for("m", "v3", FX)


def test_loading_a_non_store_is_a_clear_error(tmp_path):
    with pytest.raises(MaterialError, match="not a mask material store"):
        MaterialStore.load(tmp_path)
