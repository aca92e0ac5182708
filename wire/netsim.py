"""Network simulation in user space: a trio stream wrapper adding latency and a bandwidth cap.

The kernel here has no netem qdisc (DESIGN.md s10), so latency and bandwidth are simulated on
one side of the connection, below TLS. Wrapping one endpoint models the whole path: bytes it
sends are held for ``rtt/2`` after being serialised at ``bw``, and bytes it receives are released
``rtt/2`` after they would have finished arriving at ``bw``. Back-to-back writes queue behind
each other on the link, so large transfers pay the bandwidth and small ones pay the latency.

Spec strings (CLI ``--net``, env ``SHARDLM_NET``): ``rtt=50ms,bw=100mbit,jitter=2ms`` (any part
may be omitted; units ms/s/us and bit/kbit/mbit/gbit per second). The same link model
(:class:`Link`) and value syntax serve ``shardlm netsim-proxy`` (party/proxy), which puts the
link in a process of its own between two unmodified parties.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
import sys
import time

import trio

from .errors import first_error

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


@dataclasses.dataclass(frozen=True)
class NetSpec:
    rtt: float = 0.0  # seconds
    bandwidth: float = math.inf  # bits per second, each direction
    jitter: float = 0.0  # seconds: each one-way delay varies uniformly by up to this much either way

    @property
    def one_way(self) -> float:
        return self.rtt / 2

    def transfer_time(self, nbytes: int) -> float:
        return 0.0 if math.isinf(self.bandwidth) else nbytes * 8 / self.bandwidth

    def describe(self) -> str:
        bw = "unlimited" if math.isinf(self.bandwidth) else f"{self.bandwidth / 1e6:g} Mbit/s"
        jitter = f", jitter={self.jitter * 1e3:g} ms" if self.jitter else ""
        return f"rtt={self.rtt * 1e3:g} ms, bandwidth={bw}{jitter}"


_TIME = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_RATE = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def parse_duration(text: str, what: str = "duration") -> float:
    """``20ms`` / ``0.2s`` / ``500us`` in seconds; ValueError naming ``what`` and the accepted forms."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s)", text.strip().lower())
    try:
        return float(m.group(1)) * _TIME[m.group(2)]
    except (AttributeError, ValueError):
        raise ValueError(f"bad {what} {text!r}: use e.g. 50ms, 0.2s, 500us") from None


def parse_rate(text: str) -> float:
    """``100mbit`` / ``512kbit`` / ``1gbit`` in bits per second (> 0); ValueError otherwise."""
    m = re.fullmatch(r"([0-9.]+)(bit|kbit|mbit|gbit)", text.strip().lower())
    try:
        rate = float(m.group(1)) * _RATE[m.group(2)]
    except (AttributeError, ValueError):
        rate = 0.0
    if rate <= 0:
        raise ValueError(f"bad bandwidth {text!r}: use e.g. 100mbit, 512kbit, 1gbit")
    return rate


def parse_netspec(text: str) -> NetSpec:
    """Parse ``rtt=50ms,bw=100mbit,jitter=2ms``; raise ValueError with the accepted forms on bad input."""
    values = {}
    for item in filter(None, (p.strip() for p in text.lower().split(","))):
        key, _, value = item.partition("=")
        if key in ("rtt", "jitter"):
            values[key] = parse_duration(value, key)
        elif key in ("bw", "bandwidth"):
            values["bandwidth"] = parse_rate(value)
        else:
            raise ValueError(f"unknown netsim key {key!r} in {text!r}: expected rtt=..., bw=..., jitter=...")
    return NetSpec(**values)


class Link:
    """One direction of a simulated path: bytes queue for the bandwidth (back-to-back sends wait
    for each other), then travel ``rtt/2``, varied by the jitter but never reordered (a later
    chunk never arrives before an earlier one: TCP delivers in order whatever the path does)."""

    def __init__(self, spec: NetSpec, rng: random.Random | None = None):
        self.spec = spec
        self._rng = rng or random.Random()
        self.free_at = 0.0  # when the link has serialised all it holds
        self._last = 0.0  # when the last chunk arrives at the far end

    def send(self, nbytes: int, now: float) -> tuple[float, float]:
        """Put ``nbytes`` on the link at ``now``: (when they have left, when they arrive)."""
        self.free_at = max(now, self.free_at) + self.spec.transfer_time(nbytes)
        delay = self.spec.one_way
        if self.spec.jitter:
            delay = max(0.0, delay + self._rng.uniform(-self.spec.jitter, self.spec.jitter))
        self._last = max(self.free_at + delay, self._last)
        return self.free_at, self._last


# trio's timed waits end late here: epoll takes whole-millisecond timeouts, so a 10 ms sleep
# ended 0.87 ms late on average (measured), and a link delay paid that two or three times per
# round trip (+1.5 ms per simulated 20 ms ping-pong). A protocol of thousands of rounds would be
# charged for the simulator's clock, so each delay sleeps to within _SPIN of its deadline and
# then either yields to other tasks until the deadline passes (spin: inside a party, whose other
# tasks must run) or blocks the thread for the rest (a proxy process: spinning would take a core
# from the parties; a blocking sleep ends ~0.1 ms late, measured under load).
_SPIN = 0.002


async def sleep_until(deadline: float, *, spin: bool = True) -> None:
    if deadline - trio.current_time() > _SPIN:
        await trio.sleep_until(deadline - _SPIN)
    if not spin:
        left = deadline - trio.current_time()
        if left > 0:
            time.sleep(left)
        await trio.sleep(0)
    while trio.current_time() < deadline:
        await trio.sleep(0)


class NetsimStream(trio.abc.HalfCloseableStream):
    """Use through :func:`simulate`, which runs the two delivery pumps."""

    def __init__(self, inner: trio.abc.Stream, spec: NetSpec):
        self.inner = inner
        self.spec = spec
        self._out_send, self._out_recv = trio.open_memory_channel(math.inf)
        self._in_send, self._in_recv = trio.open_memory_channel(math.inf)
        self._tx = Link(spec)
        self._rx = Link(spec)
        self._pending = b""
        self._eof = False
        self._drained = trio.Event()

    async def send_all(self, data) -> None:
        data = bytes(data)
        left, arrives = self._tx.send(len(data), trio.current_time())
        # The link is busy while the bytes serialise: the sender waits like a full socket buffer.
        await sleep_until(left)
        self._out_send.send_nowait((arrives, data))

    async def wait_send_all_might_not_block(self) -> None:
        await sleep_until(self._tx.free_at)

    async def send_eof(self) -> None:
        self._out_send.send_nowait((self._tx.send(0, trio.current_time())[1], None))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending and not self._eof:
            ready_at, data = await self._in_recv.receive()
            await sleep_until(ready_at)
            if not data:
                self._eof = True
            self._pending = data or b""
        if max_bytes is None:
            max_bytes = len(self._pending)
        out, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return out

    async def aclose(self) -> None:
        # Deliver what is still in flight first (a closing BYE, TLS's close_notify): closing the
        # socket at once would drop it, and the peer would see a lost connection.
        self._out_send.close()
        with trio.move_on_after(self.spec.one_way + 1.0):
            await self._drained.wait()
        await self.inner.aclose()

    async def _pump_out(self) -> None:
        async for deliver_at, data in self._out_recv:
            await sleep_until(deliver_at)
            if data is None:
                if isinstance(self.inner, trio.abc.HalfCloseableStream):
                    await self.inner.send_eof()
                continue
            try:
                await self.inner.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
        self._drained.set()

    async def _pump_in(self) -> None:
        while True:
            try:
                data = await self.inner.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self._in_send.send_nowait((self._rx.send(len(data), trio.current_time())[1], data))
            if not data:
                return


@contextlib.asynccontextmanager
async def simulate(stream: trio.abc.Stream, spec: NetSpec | None):
    """Yield ``stream`` wrapped in a simulated link (or unchanged when ``spec`` is None)."""
    if spec is None:
        yield stream
        return
    sim = NetsimStream(stream, spec)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sim._pump_out)
            nursery.start_soon(sim._pump_in)
            try:
                yield sim
            finally:
                # Deliver what is still in flight (a closing BYE, say), then stop the pumps.
                sim._out_send.close()
                with trio.move_on_after(spec.one_way + 1.0):
                    await sim._drained.wait()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The pumps' nursery wraps what the caller's block raised (a lost connection, say) in an
        # exception group; the caller gets the exception itself, as without --net.
        first = first_error(group)
        if first is None:
            raise
        raise first from None
