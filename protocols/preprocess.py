"""The offline phase: a dealer the client trusts makes single-use mask material.

For every offload unit (a linear op, or a fused group of ops sharing an input) the online
phase will run, the dealer draws masks ``r`` (kept as a 32-byte seed: row i of the unit's
mask matrix is row i of its AES-CTR stream) and computes ``W r`` exactly in the ring. Online,
the client sends ``x - r`` and adds ``W r`` to the server's ``W (x - r)``. Computing ``W r``
costs as much as ``W x``: it is moved ahead of time, not avoided (DESIGN.md s2).

Single use: each unit's pool hands out rows through a cursor that only moves forward. A store
on disk persists the cursor *before* any row leaves :meth:`MaterialStore.take`, so a second
run over the same store (or a copy of the process) cannot get the same masks again: it is
refused with :class:`MaterialError`.

On disk (``shardlm preprocess --out STORE``): ``STORE/meta.json`` (model fingerprint, variant,
fixed point, units with their shapes and row counts), ``STORE/material.safetensors`` (per unit
``<unit>.wr`` int64 rows x out, ``<unit>.seed`` uint8[32]) and ``STORE/cursor.json``. The
seeds are secrets of the client: files are created mode 0600.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from . import ring


class MaterialError(Exception):
    """Mask material is missing, exhausted, already used, or for another model."""


@dataclasses.dataclass
class Pool:
    seed: bytes
    in_dim: int
    wr: torch.Tensor  # (rows, out) ring
    cursor: int = 0

    @property
    def rows(self) -> int:
        return self.wr.shape[0]


class MaterialStore:
    def __init__(self, meta: dict, pools: dict[str, Pool], path: Path | None = None):
        self.meta = meta
        self.pools = pools
        self.path = path

    def remaining(self, unit: str) -> int:
        p = self.pools[unit]
        return p.rows - p.cursor

    def check_for(self, model_fingerprint: str, variant: str, fx: ring.FixedPoint) -> None:
        want = {"model_fingerprint": model_fingerprint, "variant": variant,
                "fixed_point": dataclasses.asdict(fx)}
        for key, value in want.items():
            if self.meta.get(key) != value:
                raise MaterialError(f"mask material was made for {key}={self.meta.get(key)}, not {value}")

    def take(self, unit: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``n`` unused rows of ``unit``: (r, W r). Never returns a row twice."""
        if unit not in self.pools:
            raise MaterialError(f"no mask material for {unit!r}")
        p = self.pools[unit]
        if p.cursor + n > p.rows:
            used = "already used" if p.cursor else "available"
            raise MaterialError(
                f"mask material for {unit!r} exhausted: {n} rows needed, {p.rows - p.cursor} of {p.rows} left "
                f"({p.cursor} {used}); masks are single-use, make more with `shardlm preprocess`"
            )
        start = p.cursor
        p.cursor += n
        self._persist_cursor()
        return ring.mask_rows(p.seed, start, n, p.in_dim), p.wr[start:start + n]

    def _persist_cursor(self) -> None:
        if self.path is None:
            return
        tmp = self.path / "cursor.json.tmp"
        tmp.write_text(json.dumps({u: p.cursor for u, p in self.pools.items()}))
        os.replace(tmp, self.path / "cursor.json")

    # -- disk ---------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        tensors = {}
        for name, p in self.pools.items():
            tensors[f"{name}.wr"] = p.wr.contiguous()
            tensors[f"{name}.seed"] = torch.frombuffer(bytearray(p.seed), dtype=torch.uint8)
        fd = os.open(d / "material.safetensors", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        save_file(tensors, str(d / "material.safetensors"))
        (d / "meta.json").write_text(json.dumps(self.meta, indent=1))
        self.path = d
        self._persist_cursor()

    @classmethod
    def load(cls, directory: str | Path) -> "MaterialStore":
        d = Path(directory)
        if not (d / "meta.json").is_file() or not (d / "material.safetensors").is_file():
            raise MaterialError(f"{d} is not a mask material store (expected meta.json and material.safetensors)")
        meta = json.loads((d / "meta.json").read_text())
        tensors = load_file(str(d / "material.safetensors"))
        cursor = json.loads((d / "cursor.json").read_text()) if (d / "cursor.json").exists() else {}
        pools = {}
        for name, info in meta["units"].items():
            pools[name] = Pool(bytes(tensors[f"{name}.seed"].numpy()), info["in"], tensors[f"{name}.wr"],
                               cursor.get(name, 0))
        return cls(meta, pools, d)


def deal(
    units: dict[str, ring.RingMatrix],
    rows: dict[str, int],
    *,
    model_fingerprint: str,
    variant: str,
    fx: ring.FixedPoint,
    progress: Callable[[int, int, str], None] | None = None,
) -> MaterialStore:
    """Make material: for each unit, ``rows[unit]`` masks and their exact products."""
    t0 = time.perf_counter()
    pools = {}
    for i, (name, W) in enumerate(units.items()):
        n = rows[name]
        seed = os.urandom(ring.MaskPRG.SEED_BYTES)
        r = ring.mask_rows(seed, 0, n, W.in_dim)
        pools[name] = Pool(seed, W.in_dim, W.matmul(r).cpu())
        if progress is not None:
            progress(i + 1, len(units), name)
    meta = {
        "model_fingerprint": model_fingerprint, "variant": variant, "fixed_point": dataclasses.asdict(fx),
        "units": {name: {"in": W.in_dim, "out": W.out_dim, "rows": rows[name]} for name, W in units.items()},
        "created": time.time(), "dealer_seconds": time.perf_counter() - t0,
    }
    return MaterialStore(meta, pools)
