"""Cross-session batching: concurrent products with the same matrix run as one product.

Decode is memory-bound: one pass over a unit's weights costs about the same for one row as for
eight, so when several sessions ask for the same unit at about the same time the server stacks
their rows, runs ONE product (in a worker thread, behind the compute limiter) and hands each
session exactly its rows back. Only exact products may be batched (ring products mod 2^64: the
row of a stacked product is bit for bit the row of a lone product); float GEMMs may change
bits with the row count, so plain and split do not come here.

When a batch is dispatched:

- at once when no other session could still join it. A session could if it is behind in the
  schedule (waiting on a product of a lower ``order``: it will come to this one; one at a higher
  order went past it), or if it waits on nothing and its last product came back less than a
  window ago (its client is computing its next request; a session idle for longer, e.g. a chat
  waiting for its user, is not waited for). So a lone session never waits;
- when ``max_rows`` would be exceeded (the batch goes, the new rows start the next one);
- at the latest ``window`` seconds after its first rows arrived.

The batch's own task (in the batcher's nursery), not any session's, waits and computes: a
session that is cancelled (TTL, disconnect) only stops waiting, the others still get their rows;
an error in the product reaches every session of the batch as :class:`BatchError`.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import trio


# serve's defaults: 20 ms, a few client-side steps between two units of a decode step on a loaded
# machine (an idle session is waited for at most once); rows enough for every session's decode
# row plus a prefill chunk (masked.CHUNK_ROWS)
DEFAULT_WINDOW = 0.02
DEFAULT_MAX_ROWS = 64


class BatchError(RuntimeError):
    """The batched product failed; every session of the batch gets this."""


@dataclasses.dataclass
class _Request:
    session: str
    rows: torch.Tensor
    at: int = 0  # where its rows start in the stacked product


class _Batch:
    def __init__(self, key, fn, order: int):
        self.key, self.fn, self.order = key, fn, order
        self.requests: list[_Request] = []
        self.rows = 0
        self.go = trio.Event()    # dispatch now (before the window ends)
        self.done = trio.Event()  # result or error set
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None

    def add(self, req: _Request) -> None:
        req.at = self.rows
        self.requests.append(req)
        self.rows += req.rows.shape[0]


class Batcher:
    """Gathers products per key (one matrix) across sessions. ``window``: seconds a batch may
    wait for other sessions (0: no batching, every request runs alone); ``max_rows``: rows in one
    product at most. ``limiter``: the server's compute limiter."""

    def __init__(self, limiter: trio.CapacityLimiter, window: float, max_rows: int):
        if window < 0 or max_rows < 1:
            raise ValueError("the batch window must be >= 0 and max rows >= 1")
        self.limiter, self.window, self.max_rows = limiter, window, max_rows
        self._nursery: trio.Nursery | None = None
        self._open: dict[object, _Batch] = {}     # key -> the batch still taking rows
        self._sessions: set[str] = set()          # sessions that have used the batcher and not left
        self._busy: dict[str, int] = {}           # session -> order of the product it waits for
        self._last: dict[str, float] = {}         # session -> when its last product came back (trio clock)
        # counters for info/health
        self.batches = 0
        self.requests = 0
        self.rows = 0
        self.shared = 0          # products that served more than one session
        self.early = 0           # batches dispatched before their window ended
        self.immediate = 0       # of which without waiting at all (no other session could join)
        self.max_seen = 0
        self.product_cpu = 0.0   # CPU seconds of the worker threads' products (the rest is per-request handling)

    @property
    def enabled(self) -> bool:
        return self.window > 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The batches' tasks live here (the server's nursery starts it); until it runs,
        :meth:`product` computes every request alone."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def leave(self, session: str) -> None:
        """The session ended: batches need not wait for it any more."""
        self._sessions.discard(session)
        self._busy.pop(session, None)
        self._last.pop(session, None)
        self._check_open()

    def stats(self) -> dict:
        return {"enabled": self.enabled, "window_ms": self.window * 1e3, "max_rows": self.max_rows,
                "batches": self.batches, "requests": self.requests, "rows": self.rows, "shared_batches": self.shared,
                "early_dispatches": self.early, "immediate_dispatches": self.immediate,
                "mean_rows": round(self.rows / self.batches, 3) if self.batches else 0.0,
                "mean_requests": round(self.requests / self.batches, 3) if self.batches else 0.0,
                "max_rows_seen": self.max_seen, "product_cpu_s": round(self.product_cpu, 6)}

    async def product(self, session: str, key, fn, rows: torch.Tensor, order: int = 0) -> torch.Tensor:
        """``fn(rows)``, possibly computed as part of ``fn(stacked rows)`` with other sessions'
        requests of the same ``key`` (the caller promises ``fn`` is row-wise exact and that one
        key means one ``fn``). ``order``: the request's place in the session's schedule."""
        if not self.enabled or self._nursery is None:
            self._count(rows.shape[0], 1)
            return await trio.to_thread.run_sync(self._timed, fn, rows, limiter=self.limiter)
        self._sessions.add(session)
        batch = self._open.get(key)
        if batch is not None and batch.rows + rows.shape[0] > self.max_rows:
            self._dispatch(batch)
            batch = None
        if batch is None:
            batch = self._open[key] = _Batch(key, fn, order)
            self._nursery.start_soon(self._drive, batch)
        req = _Request(session, rows)
        batch.add(req)
        self._busy[session] = order
        try:
            if batch.rows >= self.max_rows:
                self._dispatch(batch)
            self._check_open()
            await batch.done.wait()
        finally:
            self._busy.pop(session, None)
            if session in self._sessions:
                self._last[session] = trio.current_time()
        if batch.error is not None:
            raise BatchError(f"batched product of {len(batch.requests)} requests failed: "
                             f"{type(batch.error).__name__}: {batch.error}") from batch.error
        return batch.result[req.at:req.at + rows.shape[0]]

    def _expected_until(self, batch: _Batch) -> float:
        """Until when a session outside ``batch`` may still bring rows to it (the trio clock;
        in the past: no one will)."""
        inside = {r.session for r in batch.requests}
        now, until = trio.current_time(), -math.inf
        for s in self._sessions - inside:
            order = self._busy.get(s)
            if order is not None and order < batch.order:  # waiting on an earlier unit: it comes here next
                return math.inf
            if order is None:  # free: its client is making its next request, unless it went idle
                until = max(until, self._last.get(s, now) + self.window)
        return until

    def _could_join(self, batch: _Batch) -> bool:
        return self._expected_until(batch) > trio.current_time()

    def _check_open(self) -> None:
        for batch in list(self._open.values()):
            if not self._could_join(batch):
                self._dispatch(batch)

    def _dispatch(self, batch: _Batch) -> None:
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        batch.go.set()

    async def _drive(self, batch: _Batch) -> None:
        deadline = trio.current_time() + self.window
        self.immediate += batch.go.is_set()  # gone before this task first ran: no wait at all
        while not batch.go.is_set() and trio.current_time() < deadline:
            # wake when the window ends or when the last session that might come has gone idle
            with trio.move_on_at(min(deadline, self._expected_until(batch))):
                await batch.go.wait()
            if not self._could_join(batch):
                self._dispatch(batch)
        if batch.go.is_set():
            self.early += 1
        else:
            self._dispatch(batch)
        try:
            rows = [r.rows for r in batch.requests]
            stacked = rows[0] if len(rows) == 1 else torch.cat(rows)
            self._count(batch.rows, len(rows))
            batch.result = await trio.to_thread.run_sync(self._timed, batch.fn, stacked, limiter=self.limiter)
        except Exception as exc:  # every waiting session gets it (BatchError), none hangs
            batch.error = exc
        finally:
            if batch.result is None and batch.error is None:  # cancelled (the server is stopping)
                batch.error = RuntimeError("the server stopped before the product ran")
            batch.done.set()

    def _timed(self, fn, rows: torch.Tensor) -> torch.Tensor:
        t0 = time.thread_time()  # this worker thread's CPU (torch runs one-thread products here)
        try:
            return fn(rows)
        finally:
            self.product_cpu += time.thread_time() - t0

    def _count(self, rows: int, requests: int) -> None:
        self.batches += 1
        self.requests += requests
        self.rows += rows
        self.shared += requests > 1
        self.max_seen = max(self.max_seen, rows)
