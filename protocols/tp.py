"""Tensor parallelism on torch.distributed: each masked unit's ring matrix sharded by output rows.

``serve --tp N`` runs N ranks of one process group (gloo on CPU, NCCL on CUDA). Every rank loads
the model and builds only its slice of each unit's rows (:func:`shard_rows`); rank 0 also holds
the sessions. A product ``W m`` is then, in this order on every rank (collectives must match):

1. rank 0 broadcasts a header ``[op, variant, unit, rows]`` and the masked rows ``m``;
2. each rank multiplies ``m`` by its rows of every block of the unit (ring.RingMatrix: exact);
3. rank 0 gathers the products (padded to the largest shard) and places them by column.

Ring products are exact and a row of ``W m`` depends only on that row of ``W``, so the result is
bit-identical to one rank's. What the other ranks see is what the server sees: masked rows.

Rank 0 serializes its collectives behind one lock (sessions' products arrive in worker threads,
never on the event loop) and, while idle, sends a heartbeat every quarter of the operation
timeout, so a worker waiting for work never times out and a dead worker is noticed. Any failed
collective (a rank died: gloo reports the closed connection, or the group's timeout expires)
marks the group failed for good: every later product is refused with a clear error instead of
hanging. The masked protocols v2, v3 and v3-2r are sharded; everything else a server offers
(plain, split, v3-cc, v3-mpc, ``--offline he`` products) runs on rank 0 alone with full weights.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from ..wire.errors import ErrorCode, ProtocolError
from . import ring
from .units import FUSED, blocks, matrix_key, unit_weight, units_for

log = logging.getLogger("shardlm.tp")

VARIANTS = tuple(FUSED)  # the sharded protocols, indexed in the header
OP_STOP, OP_PING, OP_PREPARE, OP_MATMUL = range(4)
RENDEZVOUS_TIMEOUT = 600.0  # seconds for every rank to load its model and join
STORE_ENV = "SHARDLM_TP_STORE"  # host:port of rank 0's TCPStore, for the ranks serve --tp starts itself


class TPFailure(ProtocolError):
    """A product the rank group could not make (a rank died or timed out): the session ends."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.INTERNAL, message)


def shard_rows(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that ``rank`` of ``size`` holds: contiguous, sizes differing by at most 1."""
    return n * rank // size, n * (rank + 1) // size


def block_rows(model, u, block: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer weights and row scales of rows ``[lo, hi)`` of a unit's block (units.blocks order),
    made from those rows' weights only. Every encoding step is per row (row scales, and for a
    composite ring.compose with its one whole-matrix scale of ``first``), so these are exactly
    the full matrix's rows (tests compare them)."""
    w = model.weights
    comp = u.composite
    if comp is None:
        return ring.encode_weights(unit_weight(u, w)[lo:hi])
    gain = w[comp.norm.weight].to(torch.float64)

    def t_rows(a: int, b: int) -> torch.Tensor:  # rows of T = then-weights times the norm's gain
        return torch.cat([w[op.weight] for op in comp.then])[a:b].to(torch.float64) * gain
    if block == 1:
        return ring.encode_weights(t_rows(lo, hi))
    o1 = comp.first.out_dim  # block 0 is [first; cross], cross = T first (ring.compose)
    parts = []
    if lo < o1:
        parts.append(ring.encode_weights(w[comp.first.weight][lo:min(hi, o1)]))
    if hi > o1:
        parts.append(ring.compose(*ring.encode_weights(t_rows(max(lo, o1) - o1, hi - o1)), w[comp.first.weight]))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class Shards:
    """One rank's rows of every unit it has built, per variant, and its product with them."""

    def __init__(self, model, device: str, rank: int, size: int):
        self.model, self.device, self.rank, self.size = model, device, rank, size
        self.units = {v: list(units_for(model.plan, v).values()) for v in VARIANTS}
        self.built: dict[str, list[list[ring.RingMatrix]]] = {}

    def build(self, variant: str, progress=None) -> dict:
        """Make (once per process; variants share a unit they have in common) this rank's rows of
        ``variant``'s units with both kernels' weights; returns their shapes and resident bytes
        (ring.RingMatrix.nbytes)."""
        out, units = [], self.units[variant]
        for i, u in enumerate(units):
            def make(u=u):
                mats = []
                for b, (_, _, _, n_out) in enumerate(blocks(u)):
                    lo, hi = shard_rows(n_out, self.size, self.rank)
                    if hi <= lo:
                        raise ValueError(f"{u.name} has {n_out} output rows: too few for {self.size} ranks")
                    w_int, scales = block_rows(self.model, u, b, lo, hi)
                    mats.append(ring.RingMatrix(w_int, self.device, scales))
                for m in mats:
                    m.prepare()
                return mats
            mats = self.model.derived((*matrix_key(u), "tp", self.rank, self.size, str(self.device)), make)
            out.append(mats)
            if progress is not None:
                progress(i + 1, len(units))
        self.built[variant] = out
        return {u.name: [[m.out_dim, m.in_dim, sum(m.nbytes().values())] for m in mats] for u, mats in zip(units, out)}

    def width(self, variant: str, index: int, rank: int) -> int:
        """Output columns ``rank`` contributes to a unit's product."""
        return sum(shard_rows(n_out, self.size, rank)[1] - shard_rows(n_out, self.size, rank)[0]
                   for *_, n_out in blocks(self.units[variant][index]))

    def product(self, variant: str, index: int, m: torch.Tensor) -> torch.Tensor:
        """This rank's columns of ``W m``: its rows of each block, blocks side by side."""
        u = self.units[variant][index]
        return torch.cat([mat.matmul(m[:, i0:i0 + ni]) for mat, (i0, ni, _, _) in zip(self.built[variant][index],
                                                                                      blocks(u))], dim=1)


def _backend(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


class Group:
    """This process's membership of the rank group: the process group and this rank's shards.

    ``store``: rank 0's TCPStore when ``serve --tp`` launched the workers itself; otherwise the
    rendezvous is torchrun's (``env://``: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""

    def __init__(self, model, device: str, size: int, rank: int, timeout: float, store=None):
        self.size, self.rank, self.timeout = size, rank, timeout
        backend = _backend(device)
        self.comm = torch.device(device) if backend == "nccl" else torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(self.comm)
        if store is None and STORE_ENV in os.environ:  # a worker serve --tp started: rank 0's store
            host, port = os.environ[STORE_ENV].rsplit(":", 1)
            store = dist.TCPStore(host, int(port), size, is_master=False,
                                  timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT))
        kw = dict(store=store) if store is not None else dict(init_method="env://")
        dist.init_process_group(backend, rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT), **kw)
        # the products' own group: a rank that stops answering fails an operation within `timeout`
        self.pg = dist.new_group(list(range(size)), timeout=datetime.timedelta(seconds=timeout), backend=backend)
        self.shards = Shards(model, device, rank, size)
        self._check_model(model)

    def _check_model(self, model) -> None:
        """Every rank must hold the same model: sharded rows of different weights would mix."""
        every = [None] * self.size
        dist.all_gather_object(every, (model.fingerprint(), self.timeout))
        prints = [p for p, _ in every]
        odd = {r: p for r, p in enumerate(prints) if p != prints[0]}
        if odd:
            raise ValueError(f"tensor-parallel ranks hold different models: rank 0 has {prints[0]}, "
                             + ", ".join(f"rank {r} has {p}" for r, p in odd.items()) + "; refusing to serve")
        # a worker waits for work up to its own timeout; rank 0's heartbeats are paced by its own
        if len({t for _, t in every}) > 1:
            raise ValueError(f"tensor-parallel ranks were given different --tp-timeout values "
                             f"({', '.join(f'rank {r}: {t:g} s' for r, (_, t) in enumerate(every))}); give all the same")

    def header(self, op: int = 0, variant: int = 0, unit: int = 0, rows: int = 0) -> list[int]:
        h = torch.tensor([op, variant, unit, rows], dtype=torch.int64, device=self.comm)
        dist.broadcast(h, 0, group=self.pg)
        return h.tolist()

    def matmul(self, variant: str, index: int, m: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        """The collective product (rank 0 passes ``m`` and gets the whole ``W m``; others None)."""
        u = self.shards.units[variant][index]
        if m is None:
            m = torch.empty(rows, u.in_dim, dtype=torch.int64, device=self.comm)
        else:
            m = m.to(self.comm).contiguous()
        dist.broadcast(m, 0, group=self.pg)
        widths = [self.shards.width(variant, index, r) for r in range(self.size)]
        mine = self.shards.product(variant, index, m).to(self.comm)
        padded = torch.zeros(rows, max(widths), dtype=torch.int64, device=self.comm)
        padded[:, :mine.shape[1]] = mine
        parts = [torch.empty_like(padded) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(padded, parts, dst=0, group=self.pg)
        if self.rank != 0:
            return None
        out = torch.empty(rows, u.out_dim, dtype=torch.int64)
        for r, part in enumerate(parts):
            at = 0
            for *_, o0, n_out in blocks(u):
                lo, hi = shard_rows(n_out, self.size, r)
                out[:, o0 + lo:o0 + hi] = part[:, at:at + hi - lo].cpu()
                at += hi - lo
        return out

    def prepare(self, variant: str, progress=None) -> list[dict]:
        """Build this rank's shards of ``variant``; rank 0 gets every rank's shapes and bytes."""
        mine = self.shards.build(variant, progress)
        every = [None] * self.size if self.rank == 0 else None
        # on the default group (the rendezvous timeout): a large model's build takes minutes on
        # some rank, longer than a product may
        dist.gather_object(mine, every, dst=0)
        return every

    def close(self) -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # a group a failed rank left broken: nothing more to release
            pass


class Coordinator:
    """Rank 0's side: the one dispatcher of the group's collectives (a lock orders them), the
    heartbeat while idle, and the failure that refuses every product once a rank is lost."""

    def __init__(self, group: Group, workers: list[subprocess.Popen] = ()):
        self.group, self.workers = group, list(workers)
        self.lock = threading.Lock()
        self.failed: str | None = None
        self.shapes: dict[str, list[dict]] = {}  # per prepared variant: every rank's shard shapes and bytes
        self.products = 0
        self.collective_bytes = 0  # sent and received by rank 0 for products (header, rows, gathered columns)
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="tp-heartbeat", daemon=True)
        self._beat.start()

    def _run(self, fn, *args):
        with self.lock:
            if self.failed:
                raise TPFailure(self.failed)
            try:
                return fn(*args)
            except (RuntimeError, ValueError) as exc:  # torch.distributed's errors are RuntimeErrors
                dead = [f"rank {r + 1} (pid {p.pid}) exited with status {status}"
                        for r, p in enumerate(self.workers) if (status := _exit_status(p)) is not None]
                self.failed = ("a tensor-parallel rank is lost" + (f": {'; '.join(dead)}" if dead else "")
                               + f" ({str(exc).splitlines()[0].split('. ')[0][:300]}); this server can make no more products: "
                                 "restart it")
                log.error("%s", self.failed)
                raise TPFailure(self.failed) from None
            finally:
                self.last = time.monotonic()

    def _heartbeat(self) -> None:
        every = self.group.timeout / 4
        while not self._stop.wait(every / 4):
            if self.failed:
                return
            if time.monotonic() - self.last >= every:
                try:
                    self._run(self.group.header, OP_PING)
                except TPFailure:
                    return

    def matrices(self, variant: str, progress=None) -> dict:
        """``variant``'s units as :class:`ShardedMatrix` (the masked handler's unit matrices)."""
        self.shapes[variant] = self._run(self._prepare, variant, progress)
        units = self.group.shards.units[variant]
        return {u.name: ShardedMatrix(self, variant, i, u.in_dim, u.out_dim) for i, u in enumerate(units)}

    def _prepare(self, variant: str, progress):
        self.group.header(OP_PREPARE, VARIANTS.index(variant))
        return self.group.prepare(variant, progress)

    def product(self, variant: str, index: int, m: torch.Tensor) -> torch.Tensor:
        return self._run(self._product, variant, index, m, m.shape[0])

    def _product(self, variant, index, m, rows):
        g = self.group
        g.header(OP_MATMUL, VARIANTS.index(variant), index, rows)
        out = g.matmul(variant, index, m, rows)
        widest = max(g.shards.width(variant, index, r) for r in range(g.size))
        self.products += 1
        self.collective_bytes += (g.size - 1) * (4 * 8 + m.numel() * 8 + rows * widest * 8)
        return out

    def describe(self) -> dict:
        """What ``info`` and ``health`` show: the group, its state, every rank's shards."""
        return {"size": self.group.size, "backend": _backend(str(self.group.comm)),
                "status": f"failed: {self.failed}" if self.failed else "ok",
                "sharded_protocols": list(VARIANTS), "products": self.products,
                "collective_bytes": self.collective_bytes,
                "worker_pids": [p.pid for p in self.workers],
                "shards": {v: [{"rank": r, "units": s} for r, s in enumerate(every)]
                           for v, every in self.shapes.items()}}

    def close(self) -> None:
        """Tell the workers to stop (best effort), then release the group."""
        self._stop.set()
        if not self.failed and self.lock.acquire(timeout=5):
            try:
                self.group.header(OP_STOP)
            except RuntimeError:
                pass
            finally:
                self.lock.release()
        self.group.close()
        for p in self.workers:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def _exit_status(proc: subprocess.Popen, wait: float = 1.0):
    """A worker's exit status if it exited (a closed connection may be seen before it is reaped)."""
    try:
        return proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        return None


class ShardedMatrix:
    """A unit's matrix held across the ranks, used as the masked handler uses ring.RingMatrix."""

    def __init__(self, coordinator: Coordinator, variant: str, index: int, in_dim: int, out_dim: int):
        self.coordinator, self.variant, self.index = coordinator, variant, index
        self.in_dim, self.out_dim = in_dim, out_dim

    def prepare(self) -> None:  # every rank prepared its shards in Coordinator.matrices
        pass

    def matmul(self, m: torch.Tensor) -> torch.Tensor:
        """(n, in) ring -> (n, out) ring: exactly ``m @ W^T mod 2^64``, made by all ranks."""
        return self.coordinator.product(self.variant, self.index, m)


def run_worker(group: Group) -> None:
    """A rank other than 0: answer rank 0's operations until it says stop (or the group fails:
    the exception propagates and the process exits)."""
    while True:
        op, variant, unit, rows = group.header()
        if op == OP_STOP:
            break
        if op == OP_PREPARE:
            group.prepare(VARIANTS[variant])
        elif op == OP_MATMUL:
            group.matmul(VARIANTS[variant], unit, None, rows)
    group.close()


def spawn_workers(size: int, argv: list[str]) -> tuple[object, list[subprocess.Popen]]:
    """One host: rank 0's TCPStore on a free loopback port, and ranks 1..size-1 as processes running
    ``argv`` (the same ``shardlm serve`` command) with RANK, WORLD_SIZE and the store's address. Each dies
    with this process (Linux: PR_SET_PDEATHSIG), so a killed server leaves no worker behind."""
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT))
    env = {**os.environ, "WORLD_SIZE": str(size), STORE_ENV: f"127.0.0.1:{store.port}"}
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent)
             for r in range(1, size)]
    return store, procs


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
