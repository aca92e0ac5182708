"""The dealer's mask material: correct products, single use, persistence."""
import json
import subprocess
import sys

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
    with pytest.raises(MaterialError, match="model_fingerprint"):
        first.check_for("other", "v3", FX)
    first.check_for("m", "v3", FX)
    with pytest.raises(MaterialError, match="in use by another run"):  # while the first holds it
        MaterialStore.load(tmp_path / "s")
    r, wr = first.take("a", 1)
    assert torch.equal(units["a"].matmul(r), wr)
    # on disk, every row is marked taken before the first one leaves: nothing of it is used again
    assert json.loads((tmp_path / "s/cursor.json").read_text()) == {"a": 4, "b": 1}
    first.close()
    with pytest.raises(MaterialError, match="already used by an earlier run"):  # e.g. a second `generate --material s`
        MaterialStore.load(tmp_path / "s")


def test_a_store_without_its_cursor_is_refused(tmp_path):
    preprocess.deal(_units(), {"a": 2, "b": 1}, model_fingerprint="m", variant="v3", fx=FX).save(tmp_path / "s")
    (tmp_path / "s/cursor.json").unlink()
    with pytest.raises(MaterialError, match="no cursor.json"):
        MaterialStore.load(tmp_path / "s")


_HOLDER = """
import sys, time
from shardlm.protocols.preprocess import MaterialStore
store = MaterialStore.load(sys.argv[1])
store.take("a", 1)
print("taken", flush=True)
time.sleep(600)
"""


def test_a_concurrent_run_is_refused_and_a_killed_run_has_used_the_store(tmp_path):
    # another process (a real one: flock is per open file) claims the store and takes a row ...
    preprocess.deal(_units(), {"a": 3, "b": 1}, model_fingerprint="m", variant="v3", fx=FX).save(tmp_path / "s")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "s")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "taken"
        with pytest.raises(MaterialError, match="in use by another run"):
            MaterialStore.load(tmp_path / "s")
    finally:
        holder.kill()  # ... and dies mid-generation (SIGKILL: no clean-up of its own)
        holder.wait(timeout=30)
    with pytest.raises(MaterialError, match="already used by an earlier run"):
        MaterialStore.load(tmp_path / "s")


_KILLED_MID_WRITE = """
import os, signal, sys
from shardlm.protocols.preprocess import MaterialStore
real = os.replace
def replace(src, dst):  # killed (SIGKILL: no clean-up) after the new cursor is written, before its rename
    if str(dst).endswith("cursor.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
MaterialStore.load(sys.argv[1]).take("a", 1)
"""


def test_a_run_killed_while_marking_the_store_used_leaves_no_temporary_file(tmp_path):
    preprocess.deal(_units(), {"a": 3, "b": 1}, model_fingerprint="m", variant="v3", fx=FX).save(tmp_path / "s")
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(tmp_path / "s")], timeout=60)
    assert proc.returncode == -9 and (tmp_path / "s/cursor.json.tmp").exists()
    # no row had left: the store is still unused, and the next claim clears the leftover
    store = MaterialStore.load(tmp_path / "s")
    assert not (tmp_path / "s/cursor.json.tmp").exists()
    store.take("a", 3)
    store.close()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["cursor.json", "lock", "material.safetensors",
                                                                   "meta.json"]


def test_loading_a_non_store_is_a_clear_error(tmp_path):
    with pytest.raises(MaterialError, match="not a mask material store"):
        MaterialStore.load(tmp_path)
