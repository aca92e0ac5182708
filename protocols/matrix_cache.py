"""The server's ring matrices on disk, so a restarted server loads them instead of rebuilding them.

One safetensors file per ring matrix (units._leaves' key: a single op's weights, or a v3-2r
composite's ``cross`` or ``then`` matrix; a fused unit is its ops' files, so v2, v3 and v3-2r share
their common files as they share the matrices in memory), under
``<root>/v<ENCODING_VERSION>/<model fingerprint>/``. A file holds the digit planes, row scales
and integer bounds (ring.RingMatrix.from_digits) and, in its metadata, the encoding version, the
model fingerprint, its own name and a sha256 over all of it. A file is used only if all of these
match and every block has the shape the plan says: anything else (a torn write, a flipped bit,
another encoding) is counted as ``rejected``, rebuilt and rewritten. Files are written to a
temporary name and renamed, so a reader never sees half a file.

Memory: a loaded tensor is the matrix's own storage (safetensors copies it out of a mapping that
is closed at once); nothing of the file stays resident.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import ring

log = logging.getLogger("shardlm.matrix_cache")

# Bump whenever what a cached matrix holds or means changes: ring.py's weight encoding (WMAX, digit
# planes, row scales), units.py's grouping or composition (ring.compose). Old files are then ignored.
# 2: one file per leaf matrix (op, cross, then), no fused or composed files.
ENCODING_VERSION = 2
FORMAT = "shardlm-ring-matrix"


class MatrixCache:
    """A server's matrix cache for one model; ``stats`` counts loaded / built / rejected / written
    matrices (health and info report them: the evidence that a restart did not rebuild)."""

    def __init__(self, root: str | Path, fingerprint: str):
        self.fingerprint = fingerprint
        self.dir = Path(root) / f"v{ENCODING_VERSION}" / fingerprint.removeprefix("sha256:")
        self.stats: collections.Counter = collections.Counter()
        self._lock = threading.Lock()  # stats are counted from worker threads

    def path(self, name: str) -> Path:
        return self.dir / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".safetensors")

    def wrap(self, name: str, shapes: list[tuple[int, int]], make):
        """``make`` as a function that reads the matrix from disk when a valid copy is there,
        else builds it with ``make()`` and stores it; ``shapes``: [(out, in)] of the matrix."""
        def load_or_make():
            matrix = self.load(name, shapes)
            if matrix is not None:
                self._count("loaded")
                return matrix
            matrix = make()
            self._count("built")
            try:
                self.save(name, matrix)
                self._count("written")
            except (OSError, RuntimeError) as exc:  # e.g. a full disk: costs the next start time, nothing else
                log.warning("cannot cache %s in %s: %s", name, self.dir, exc)
            return matrix
        return load_or_make

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    def save(self, name: str, matrix) -> None:
        tensors, ints = _flatten(matrix)
        meta = {"format": FORMAT, "encoding_version": str(ENCODING_VERSION), "model_fingerprint": self.fingerprint,
                "name": name, "ints": json.dumps(ints)}
        meta["sha256"] = _digest(tensors, meta)
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, self.path(name))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, name: str, shapes: list[tuple[int, int]]):
        """The stored matrix, or None (absent; or rejected: logged and counted)."""
        path = self.path(name)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return _check(meta, tensors, name, self.fingerprint, shapes)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, OverflowError) as exc:
            log.warning("ignoring cached matrix %s (%s); rebuilding it", path, exc)
            self._count("rejected")
            return None


def _flatten(matrix: ring.RingMatrix) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"w.digits": matrix.digits.cpu().contiguous()}
    if matrix.row_scales is not None:
        tensors["w.scales"] = matrix.row_scales.cpu().contiguous()
    return tensors, {"w": [matrix.max_abs, matrix.max_row_l1]}


def _digest(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"\0{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _check(meta: dict, tensors: dict, name: str, fingerprint: str, shapes: list[tuple[int, int]]):
    """The matrix a file holds, after checking everything it claims (ValueError otherwise)."""
    want = {"format": FORMAT, "encoding_version": str(ENCODING_VERSION), "model_fingerprint": fingerprint, "name": name}
    for k, v in want.items():
        if meta.get(k) != v:
            raise ValueError(f"{k} is {meta.get(k)!r}, not {v!r}")
    if meta.get("sha256") != _digest(tensors, meta):
        raise ValueError("content hash mismatch")
    ints = json.loads(meta["ints"])
    (out_dim, in_dim), = shapes
    digits, scales = tensors["w.digits"], tensors.get("w.scales")
    if tuple(digits.shape) != (in_dim, ring.N_DIGITS * out_dim) or (scales is not None and scales.shape != (out_dim,)):
        raise ValueError(f"the matrix has shape {tuple(digits.shape)}, the plan says ({in_dim}, 3 x {out_dim})")
    return ring.RingMatrix.from_digits(digits, scales, int(ints["w"][0]), int(ints["w"][1]))


def for_server(server) -> MatrixCache | None:
    """The server's cache (one per process, shared by its protocols), or None with ``--no-cache``."""
    root = server.config.matrix_cache
    if root is None or server.model is None:
        return None
    return server.protocol_state("matrix-cache", lambda: MatrixCache(root, server.fingerprint))
