"""Memory per weight (one shared encoding of the weights for v2, v3, v3-2r; no float64 copy) and
the device self-check of the exact kernels (issue 20)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from shardlm import cli
from shardlm.models.load import load_model
from shardlm.party import launch
from shardlm.protocols import ring, units

from conftest import build_tiny

MASKED = ("v2", "v3", "v3-2r")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    build_tiny("llama", d, seed=5)
    return d


def _held_bytes(model) -> tuple[int, int]:
    """Independently of RingMatrix.nbytes: every tensor the built matrices hold (found by walking
    their attributes; a storage shared by several counts once) and fbgemm's packed copies (their
    int8 weights and column offsets, as fbgemm unpacks them); and the integer weights they encode."""
    leaves, stack = {}, [v for k, v in model._derived.items() if k[0] == "masked"]
    while stack:
        obj = stack.pop()
        if isinstance(obj, ring.RingMatrix):
            leaves[id(obj)] = obj
        elif isinstance(obj, (ring.RowStack, units.ComposedMatrix)):
            stack.extend(vars(obj).values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    storages, total = set(), 0
    for m in leaves.values():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in storages:
                storages.add(v.untyped_storage().data_ptr())
                total += v.untyped_storage().nbytes()
        for _lo, p in m._packed or ():
            w, _ = torch.ops.quantized.linear_unpack(p)
            total += w.int_repr().nbytes + 4 * w.shape[0]
    return total, sum(m.in_dim * m.out_dim for m in leaves.values())


def test_info_reports_the_bytes_the_matrices_hold_and_they_fit_8_per_weight(tiny):
    # a real server that preloads all three masked protocols: its info against this process's count
    with launch.server(["--model", str(tiny), "--threads", "1", "--preload", ",".join(MASKED), "--no-cache"]) as srv:
        info = json.loads(subprocess.run([sys.executable, "-m", "shardlm.cli", "info", *srv.client_args, "--json"],
                                         capture_output=True, text=True, timeout=120, check=True).stdout)
    assert info["kernels"]["exact"] and info["kernels"]["kernels"]["prefill"] == "float64"
    model = load_model(str(tiny))
    for v in MASKED:
        for u in units.units_for(model.plan, v).values():
            units.matrix_for(model, u).prepare()
    held, weights = _held_bytes(model)
    # constants per matrix (its limb shifts and masks: 64 bytes) are all the walk may find besides
    n_leaves = len({n for v in MASKED for u in units.units_for(model.plan, v).values() for n in units.cache_names(u)})
    total = info["protocols"]["v3"]["memory"]["all_masked"]
    assert total["weights"] == weights and held - 128 * n_leaves <= total["bytes"] <= held
    assert total["bytes_per_model_weight_per_protocol"] <= 8
    for v in MASKED:
        mem = info["protocols"][v]["memory"]
        assert mem == {**units.resident(model, [v])["protocols"][v], "all_masked": total}
        assert 4 < mem["bytes_per_weight"] <= 8, (v, mem)
    # v2 and v3 hold the very same matrices: v2 costs nothing once v3 is built
    assert info["protocols"]["v2"]["memory"]["bytes"] == info["protocols"]["v3"]["memory"]["bytes"]
    assert total["bytes"] < sum(info["protocols"][v]["memory"]["bytes"] for v in MASKED)


def test_shared_encodings_give_the_unshared_products_bit_for_bit(tiny):
    model = load_model(str(tiny))
    w = model.weights
    g = torch.Generator().manual_seed(3)
    for v in MASKED:
        for name, u in units.units_for(model.plan, v).items():
            shared = units.matrix_for(model, u)
            if u.composite is None:  # the unshared encoding: the unit's weights as one matrix
                alone = ring.RingMatrix.from_float(units.unit_weight(u, w))
            else:  # as before sharing: [first; cross] as one matrix, T on its own
                comp = u.composite
                t_int, t_scales = units._then(model, comp)
                first_int, _ = ring.encode_weights(w[comp.first.weight])
                cross_int, _ = ring.compose(t_int, t_scales, w[comp.first.weight])
                alone = units.ComposedMatrix(ring.RingMatrix(torch.cat([first_int, cross_int])),
                                             ring.RingMatrix(t_int), [])
            for rows in (1, ring.INT8_MAX_ROWS + 2):  # the int8 kernel and the float64 limbs
                m = torch.randint(-2**63, 2**63 - 1, (rows, u.in_dim), generator=g)
                assert torch.equal(shared.matmul(m), alone.matmul(m)), (v, name, rows)
    # and they are shared, not copies: v2's q is a part of v3's qkv, v3-2r's first is the op's
    v2, v3, v32r = (units.matrices_for(model, v) for v in MASKED)
    assert v3["layers.0.qkv"].parts[0] is v2["layers.0.q"]
    assert v32r["layers.0.o+layers.0.gate_up"].a_side.parts[0] is v2["layers.0.o"]


def _float32_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A GEMM accumulating in float32: exact for small sums, loses low bits beyond 2^24."""
    return torch.matmul(a.to(torch.float32), b.to(torch.float32)).to(torch.int64)


def _broken_f64(self, m):
    """The float64 limbs' product with a float32 accumulation (a plausible device bug)."""
    n, nl = m.shape[0], self._shifts64.shape[0]
    limbs = torch.bitwise_and(torch.bitwise_right_shift(m.unsqueeze(0), self._shifts64), self._masks64)
    partial = _float32_gemm(limbs.view(nl * n, self.in_dim), self.w32.t())
    return torch.bitwise_left_shift(partial.view(nl, n, self.out_dim), self._shifts64).sum(dim=0)


def _broken_int8(self, m):
    """The int8 digit product accumulated in float32."""
    n = m.shape[0]
    raw = torch.add(m, ring._BALANCE).view(torch.uint8).view(n, self.in_dim, ring.N_LIMBS)
    limbs = torch.bitwise_xor(raw, 0x80).view(torch.int8).permute(2, 0, 1).reshape(ring.N_LIMBS * n, self.in_dim)
    partial = _float32_gemm(limbs, self.digits).view(ring.N_LIMBS, n, ring.N_DIGITS, self.out_dim)
    return (partial * self._factors).sum(dim=(0, 2))


def test_the_self_check_passes_here_and_catches_a_kernel_that_loses_bits(monkeypatch):
    report = ring.self_check("cpu")
    assert report["exact"] and not report["failures"] and report["products_checked"] == 8
    assert report["kernels"]["decode"] == ring.RingMatrix(torch.ones(1, 1, dtype=torch.int64)).kernel(1)
    for kernel, broken in (("_matmul_f64", _broken_f64), ("_matmul_int8", _broken_int8)):
        with monkeypatch.context() as mp:
            mp.setattr(ring.RingMatrix, kernel, broken)
            bad = ring.self_check("cpu")
        assert not bad["exact"] and bad["failures"], kernel
        assert all(("float64" in f) == (kernel == "_matmul_f64") for f in bad["failures"]), bad["failures"]


def test_serve_refuses_to_start_on_an_inexact_kernel(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDLM_HOME", str(tmp_path))
    monkeypatch.setattr(ring.RingMatrix, "_matmul_f64", _broken_f64)
    started = []
    monkeypatch.setattr(cli, "_serve_forever", lambda *a, **k: started.append(a))  # never block
    result = CliRunner().invoke(cli.cli, ["serve", "--model", str(tiny), "--port", "0", "--json"])
    assert not started and result.exit_code == 1, result.output
    err = json.loads([line for line in result.output.splitlines() if line.startswith("{")][-1])
    assert err["code"] == "device" and "not exact" in err["error"] and "float64" in err["error"]
