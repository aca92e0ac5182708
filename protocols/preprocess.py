"""The offline phase: a dealer the client trusts makes single-use mask material.

For every offload unit (a linear op, or a fused group of ops sharing an input) the online
phase will run, the dealer draws masks ``r`` (kept as a 32-byte seed: row i of the unit's
mask matrix is row i of its AES-CTR stream) and computes ``W r`` exactly in the ring. Online,
the client sends ``x - r`` and adds ``W r`` to the server's ``W (x - r)``. Computing ``W r``
costs as much as ``W x``: it is moved ahead of time, not avoided (DESIGN.md s2).

Single use: each unit's pool hands out rows through a cursor that only moves forward. A store
on disk is used by one run at most:

- :meth:`MaterialStore.load` claims it exclusively (``flock`` on ``STORE/lock``, held until the
  store is closed or the process ends, a kill included): a second run while the first holds it
  is refused;
- before the first row leaves :meth:`MaterialStore.take`, the cursor file marks every row as
  taken, written to a temporary file, fsynced, renamed and the directory fsynced: a run that
  crashes or is killed after that point has used the store, and a later load refuses it;
- a store whose cursor file is missing is refused (its use cannot be known);
- a ``cursor.json.tmp`` left by a run killed mid-write is removed by the next claim.

On disk (``shardlm preprocess --out STORE``): ``STORE/meta.json`` (model fingerprint, variant,
fixed point, units with their shapes and row counts, ``mask_shift`` for HE-made material), ``STORE/material.safetensors`` (per unit
``<unit>.wr`` int64 rows x out, ``<unit>.seed`` uint8[32]) and ``STORE/cursor.json``. The
seeds are secrets of the client: files are created mode 0600.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import ring


class MaterialError(Exception):
    """Mask material is missing, exhausted, already used, or for another model."""


@dataclasses.dataclass
class Pool:
    seed: bytes
    in_dim: int
    # (rows, out) ring: a tensor, or for a store on disk a safetensors slice read row range by
    # row range as they are taken (a long generation's store need not fit in memory)
    wr: Any
    rows: int
    cursor: int = 0


class MaterialStore:
    def __init__(self, meta: dict, pools: dict[str, Pool], path: Path | None = None):
        self.meta = meta
        self.pools = pools
        self.path = path
        # the online masks are 2^shift times the seed's rows (--offline he: protocols/he/service.py);
        # the client encodes its activations that many bits higher and shifts products back down
        self.shift = int(meta.get("mask_shift", 0))
        self._lock_fd: int | None = None  # the exclusive claim of an on-disk store (load)
        self._spent = path is None  # on disk: whether the cursor file already marks every row taken

    def close(self) -> None:
        """Release the claim on an on-disk store (the process's end does too)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

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
        if not self._spent:  # durably "used" before any row can reach a server
            self._persist_cursor({u: q.rows for u, q in self.pools.items()})
            self._spent = True
        start = p.cursor
        p.cursor += n
        r = ring.mask_rows(p.seed, start, n, p.in_dim)
        return (r * (1 << self.shift) if self.shift else r), p.wr[start:start + n]  # int64 products wrap mod 2^64

    def _persist_cursor(self, cursor: dict[str, int]) -> None:
        tmp = self.path / "cursor.json.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(cursor))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "cursor.json")
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- disk ---------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        tensors = {}
        for name, p in self.pools.items():
            tensors[f"{name}.wr"] = p.wr[:p.rows].contiguous()
            tensors[f"{name}.seed"] = torch.frombuffer(bytearray(p.seed), dtype=torch.uint8)
        fd = os.open(d / "material.safetensors", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        save_file(tensors, str(d / "material.safetensors"))
        (d / "meta.json").write_text(json.dumps(self.meta, indent=1))
        self.path = d
        self._persist_cursor({u: p.cursor for u, p in self.pools.items()})
        self._spent = any(p.cursor for p in self.pools.values())

    @classmethod
    def load(cls, directory: str | Path) -> "MaterialStore":
        d = Path(directory)
        if not (d / "meta.json").is_file() or not (d / "material.safetensors").is_file():
            raise MaterialError(f"{d} is not a mask material store (expected meta.json and material.safetensors)")
        lock_fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise MaterialError(f"{d} is in use by another run; masks are single-use: make more with "
                                f"`shardlm preprocess`") from None
        try:
            # a run killed between writing the new cursor and renaming it left this behind: no row
            # of it had left (rows leave after the rename), and holding the claim, no one else writes it
            (d / "cursor.json.tmp").unlink(missing_ok=True)
            if not (d / "cursor.json").is_file():
                raise MaterialError(f"{d} has no cursor.json: how much of it was used cannot be known, so it is "
                                    f"refused; make new material with `shardlm preprocess`")
            cursor = json.loads((d / "cursor.json").read_text())
            used = {u: c for u, c in cursor.items() if c}
            if used:
                raise MaterialError(f"{d} was already used by an earlier run ({len(used)} units taken); masks are "
                                    f"single-use: make more with `shardlm preprocess`")
            meta = json.loads((d / "meta.json").read_text())
            f = safe_open(str(d / "material.safetensors"), framework="pt")
            pools = {}
            for name, info in meta["units"].items():
                wr = f.get_slice(f"{name}.wr")
                if wr.get_shape() != [info["rows"], info["out"]]:
                    raise MaterialError(f"{d}: {name}'s products have shape {wr.get_shape()}, meta.json says "
                                        f"{[info['rows'], info['out']]}")
                pools[name] = Pool(bytes(f.get_tensor(f"{name}.seed").numpy()), info["in"], wr, info["rows"])
        except BaseException:
            os.close(lock_fd)
            raise
        store = cls(meta, pools, d)
        store._lock_fd = lock_fd
        store._file = f  # the slices read through it
        return store


def new_seed() -> bytes:
    """A unit's mask seed, from the OS CSPRNG (its AES-CTR stream gives the mask rows)."""
    return os.urandom(ring.MaskPRG.SEED_BYTES)


def products(W, seed: bytes, start: int, n: int) -> torch.Tensor:
    """``W r`` for rows ``start .. start+n`` of the masks expanded from ``seed``: (n, out) ring,
    exact mod 2^64. A dealer may compute a unit's rows a slice at a time (protocols/dealer)."""
    return W.matmul(ring.mask_rows(seed, start, n, W.in_dim)).cpu()


def material_meta(dims: dict[str, tuple[int, int]], rows: dict[str, int], *, model_fingerprint: str, variant: str,
                  fx: ring.FixedPoint, dealer_seconds: float, **extra) -> dict:
    """A store's meta.json: what :meth:`MaterialStore.check_for` and :meth:`MaterialStore.load`
    read; ``dims``: per unit (in, out)."""
    return {
        "model_fingerprint": model_fingerprint, "variant": variant, "fixed_point": dataclasses.asdict(fx),
        "units": {name: {"in": i, "out": o, "rows": rows[name]} for name, (i, o) in dims.items()},
        "created": time.time(), "dealer_seconds": dealer_seconds, **extra,
    }


def deal(
    units: dict[str, ring.RingMatrix],
    rows: dict[str, int],
    *,
    model_fingerprint: str,
    variant: str,
    fx: ring.FixedPoint,
    progress: Callable[[str, bool], None] | None = None,
) -> MaterialStore:
    """Make material: for each unit, ``rows[unit]`` masks and their exact products."""
    t0 = time.perf_counter()
    pools = {}
    for i, (name, W) in enumerate(units.items()):
        n = rows[name]
        seed = new_seed()
        pools[name] = Pool(seed, W.in_dim, products(W, seed, 0, n), n)
        if progress is not None:
            progress(f"offline: mask material {i + 1}/{len(units)} units", i + 1 == len(units))
    meta = material_meta({name: (W.in_dim, W.out_dim) for name, W in units.items()}, rows,
                         model_fingerprint=model_fingerprint, variant=variant, fx=fx,
                         dealer_seconds=time.perf_counter() - t0)
    return MaterialStore(meta, pools)
