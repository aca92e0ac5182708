"""netsim-proxy: a TCP proxy that puts a simulated WAN between two unmodified processes.

``--net`` simulates the link inside the client, where keeping deadlines takes the client's own
CPU (DESIGN.md s10) and only our client can use it; the kernel has no netem. This proxy is a
process of its own: each accepted connection is forwarded to the target, and each direction
is a :class:`netsim.Link` (bandwidth queue, then ``rtt/2`` with optional jitter, in order).
It forwards bytes, so TLS passes through untouched and the client's pin of the server
certificate still holds.

Every chunk read from one side is released to the other when the link model says it arrives;
the reader stops reading while the link's queue is long, so a fast sender is held back by its
own socket buffer as on a real bottleneck. ``loss_reset``: a connection is doomed with that
probability and reset (RST both ways) once a random number of bytes, log-uniform in
[1, ``reset_within``], has been forwarded, or at its clean close if it ends first, so that with
probability 1 every connection is reset.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import socket
import struct
import sys

import trio

from ..wire import netsim
from ..wire.errors import first_error

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("shardlm.proxy")

CHUNK = 64 * 1024  # bytes read at once
QUEUE_ITEMS = 1024  # chunks in flight per direction at most (bounds memory at unlimited bandwidth)
QUEUE_BYTES = 256 * 1024  # what the link may hold beyond the chunk on the wire, so it never idles
QUEUE_MIN_S = 0.005  # ... and at least this long (trio's timers end up to ~1 ms late)


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    listen: tuple[str, int]
    target: tuple[str, int]
    spec: netsim.NetSpec
    loss_reset: float = 0.0
    reset_within: int = 1 << 20
    seed: int | None = None

    def describe(self) -> dict:
        s = self.spec
        return {"listen": "%s:%d" % self.listen, "target": "%s:%d" % self.target, "rtt_ms": s.rtt * 1e3,
                "bw_mbit": None if math.isinf(s.bandwidth) else s.bandwidth / 1e6, "jitter_ms": s.jitter * 1e3,
                "loss_reset": self.loss_reset, "reset_within": self.reset_within}


@dataclasses.dataclass
class Flow:
    """What one direction forwarded: bytes, chunks and the delay each chunk spent in the proxy."""

    bytes: int = 0
    chunks: int = 0
    delay_sum: float = 0.0
    delay_max: float = 0.0

    def add(self, nbytes: int, delay: float) -> None:
        self.bytes += nbytes
        self.chunks += 1
        self.delay_sum += delay
        self.delay_max = max(self.delay_max, delay)

    def report(self) -> dict:
        mean = self.delay_sum / self.chunks if self.chunks else 0.0
        return {"bytes": self.bytes, "chunks": self.chunks, "mean_delay_ms": round(mean * 1e3, 3),
                "max_delay_ms": round(self.delay_max * 1e3, 3)}


class _Reset(Exception):
    """The connection is to be reset: by --loss-reset (its message starts with "reset"), or because
    one side broke (then the other side gets the reset too)."""


def _reset(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    stream.socket.close()


class _Connection:
    def __init__(self, proxy: Proxy, number: int, peer: str):
        self.proxy, self.number, self.peer = proxy, number, peer
        self.flows = {"up": Flow(), "down": Flow()}  # up: accepted side -> target
        self.forwarded = 0
        rng = proxy.rng
        self.reset_at = (math.ceil(math.exp(rng.uniform(0, math.log(proxy.config.reset_within))))
                         if rng.random() < proxy.config.loss_reset else None)
        self.ended = "open"

    async def run(self, downstream: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(*self.proxy.config.target)
        except OSError as exc:
            self.ended = f"target unreachable: {exc.strerror or exc}"
            _reset(downstream)
            return
        cfg = self.proxy.config
        try:
            async with trio.open_nursery() as nursery:
                for name, src, dst in (("up", downstream, upstream), ("down", upstream, downstream)):
                    send, recv = trio.open_memory_channel(QUEUE_ITEMS)
                    link = netsim.Link(cfg.spec, self.proxy.rng)
                    nursery.start_soon(self._read, src, link, send)
                    nursery.start_soon(self._write, dst, recv, name)
            self.ended = "closed"
            await upstream.aclose()
            await downstream.aclose()
        except BaseExceptionGroup as group:
            first = first_error(group)
            if first is None:  # cancelled: the proxy is stopping
                raise
            _reset(upstream)
            _reset(downstream)
            self.ended = str(first)
            if not isinstance(first, _Reset):  # a bug: this connection ends, the proxy serves on
                self.ended = f"failed: {first!r}"
                log.error("connection %d: %s", self.number, self.ended, exc_info=first)

    async def _read(self, src: trio.SocketStream, link: netsim.Link, out: trio.MemorySendChannel) -> None:
        slack = max(QUEUE_MIN_S, link.spec.transfer_time(QUEUE_BYTES))
        async with out:
            while True:
                try:
                    data = await src.receive_some(CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise _Reset(f"peer reset: {exc.__cause__ or exc}") from None
                now = trio.current_time()
                left, arrives = link.send(len(data), now)
                await out.send((now, arrives, data))
                if not data:
                    return
                await trio.sleep_until(left - slack)  # the queue drains before we read on

    async def _write(self, dst: trio.SocketStream, queue: trio.MemoryReceiveChannel, flow: str) -> None:
        async for read_at, arrives, data in queue:
            await netsim.sleep_until(arrives, spin=False)
            if self.reset_at is not None:
                if not data:
                    raise _Reset("reset (--loss-reset, at its close)")
                if self.forwarded + len(data) >= self.reset_at:
                    data = data[:self.reset_at - self.forwarded]
                    await self._send(dst, data, read_at, flow)
                    raise _Reset(f"reset (--loss-reset, after {self.reset_at} bytes)")
            if not data:
                try:
                    await dst.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # the far side is gone already; its own reader reports how
                return
            await self._send(dst, data, read_at, flow)

    async def _send(self, dst: trio.SocketStream, data: bytes, read_at: float, flow: str) -> None:
        try:
            await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Reset(f"peer reset: {exc.__cause__ or exc}") from None
        self.forwarded += len(data)
        delay = trio.current_time() - read_at
        self.flows[flow].add(len(data), delay)
        self.proxy.flows[flow].add(len(data), delay)

    def report(self) -> dict:
        return {"event": "connection", "number": self.number, "peer": self.peer, "ended": self.ended,
                **{name: f.report() for name, f in self.flows.items()}}


class Proxy:
    """Serve :class:`ProxyConfig` until cancelled; :meth:`report` sums every connection so far."""

    def __init__(self, config: ProxyConfig, on_connection_end=None):
        self.config = config
        self.rng = random.Random(config.seed)  # jitter and resets: a simulation, not a secret
        self.flows = {"up": Flow(), "down": Flow()}
        self.connections = self.resets = self.open = 0
        self.on_connection_end = on_connection_end

    async def listen(self) -> list[trio.SocketListener]:
        host, port = self.config.listen
        return await trio.open_tcp_listeners(port, host=host)

    async def serve(self, listeners, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # with port 0, report the port bound
        self.config = dataclasses.replace(self.config, listen=listeners[0].socket.getsockname()[:2])
        task_status.started(self.config.listen[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        self.connections += 1
        self.open += 1
        try:
            peer = "%s:%s" % downstream.socket.getpeername()[:2]
        except OSError:
            peer = "?"
        conn = _Connection(self, self.connections, peer)
        try:
            await conn.run(downstream)
        finally:
            self.open -= 1
            self.resets += conn.ended.startswith("reset")
            if self.on_connection_end is not None:
                self.on_connection_end(conn.report())

    def report(self) -> dict:
        # resets: those --loss-reset made (a peer's own reset is passed on, not counted)
        return {"event": "report", **self.config.describe(), "connections": self.connections,
                "open": self.open, "resets": self.resets,
                **{name: f.report() for name, f in self.flows.items()}}
