"""Typed messages over any trio stream, with byte and round counters per phase.

The same protocol code runs over a TLS socket between two processes and over an in-memory
stream pair in one test process: it only ever sees a :class:`Channel`.

Counting: ``bytes_sent``/``bytes_received`` count whole frames (header + payload). A *round*
is one flight: a maximal run of messages this party sends before it next receives. A
request/response exchange is one round on each side, so "4L+1 rounds per token" reads the
same from either end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from typing import Callable

import trio

from ..wire import codec, frames
from ..wire.errors import ConnectionClosed, ErrorCode, PeerStalled, ProtocolError, RemoteError, first_error
from ..wire.msgtypes import MsgType, is_known
from .transcript import TranscriptRecorder

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

# Below this size a frame is joined into one write (one TLS record); above, the tensor buffers
# are written as they are, without a copy.
_JOIN_BELOW = 64 * 1024


@dataclasses.dataclass
class PhaseStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    rounds: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Message:
    type: MsgType
    body: dict
    seq: int
    nbytes: int


class Channel:
    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        limits: frames.Limits = frames.Limits(),
        recorder: TranscriptRecorder | None = None,
        send_timeout: float | None = None,
        recv_timeout: float | None = None,
    ):
        """``send_timeout``: seconds a single message may take to leave (a peer that stops
        reading is cut off instead of holding this side forever; the server sets it);
        ``recv_timeout``: seconds to wait for each message (the server's idle timeout, also
        inside a protocol handler's own exchanges)."""
        self.stream = stream
        self.send_timeout = send_timeout
        self.recv_timeout = recv_timeout
        self.limits = limits
        self.recorder = recorder
        self._decoder = frames.FrameDecoder(limits)
        self._send_seq = 0
        self._recv_seq = 0
        self._last_direction: str | None = None
        self.phase_name = "setup"
        self.stats: dict[str, PhaseStats] = {}
        # called after each message either way: a run's progress reports hang here, so a long
        # phase of any protocol is reported without a task of its own
        self.on_message: Callable[[], None] | None = None

    # -- accounting ---------------------------------------------------------------------
    def _phase_stats(self) -> PhaseStats:
        return self.stats.setdefault(self.phase_name, PhaseStats())

    @contextlib.contextmanager
    def phase(self, name: str):
        """Attribute traffic inside the block to phase ``name``."""
        previous, self.phase_name = self.phase_name, name
        try:
            yield self._phase_stats()
        finally:
            self.phase_name = previous

    def totals(self) -> PhaseStats:
        total = PhaseStats()
        for s in self.stats.values():
            for f in dataclasses.fields(PhaseStats):
                setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))
        return total

    # -- sending --------------------------------------------------------------------------
    async def send(self, msg_type: MsgType, body: dict | None = None) -> int:
        """Send one message; return its size on the wire."""
        self._count_flight()
        return await self._write(msg_type, self._encode(msg_type, body))

    def _count_flight(self) -> None:
        if self._last_direction != "send":
            self._phase_stats().rounds += 1
            self._last_direction = "send"

    async def exchange(self, msg_type: MsgType, body: dict, receive) -> Message:
        """One flight each way at once: send this message while ``await receive()`` (this
        channel's recv/expect, perhaps under a timeout) takes the peer's, so the round costs one
        trip, not two. Counted as one round, as a send followed by a receive. A small frame is
        written first and then received (the socket buffers take it whole, so the peer need
        not be reading: no deadlock), a large one in a second task, so two large flights never
        block each other (a task pair costs ~0.15 ms per round, most of a small round's CPU)."""
        self._count_flight()
        frame = self._encode(msg_type, body)
        if frame[1] < _JOIN_BELOW:
            await self._write(msg_type, frame)
            return await receive()
        got = []

        async def take():
            got.append(await receive())
        await concurrently(lambda: self._write(msg_type, frame), take)
        return got[0]

    def _encode(self, msg_type: MsgType, body: dict | None) -> tuple[list, int]:
        parts = codec.encode_body(body or {})
        header = frames.encode_header(int(msg_type), self._send_seq, parts)
        return [header, *parts], len(header) + sum(memoryview(p).nbytes for p in parts)

    async def _write(self, msg_type: MsgType, frame: tuple[list, int]) -> int:
        parts, size = frame
        try:
            with trio.fail_after(self.send_timeout if self.send_timeout is not None else math.inf):
                if size < _JOIN_BELOW:
                    await self.stream.send_all(b"".join(parts))
                else:
                    for part in parts:
                        await self.stream.send_all(part)
        except trio.TooSlowError:
            raise PeerStalled(f"{msg_type.name} ({size:,} bytes) not taken by the peer within "
                              f"{self.send_timeout:g} s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"connection lost while sending {msg_type.name}") from exc
        self._send_seq += 1
        st = self._phase_stats()
        st.bytes_sent += size
        st.messages_sent += 1
        if self.on_message is not None:
            self.on_message()
        return size

    async def send_error(self, code: ErrorCode, message: str) -> None:
        """Best effort: the peer may already be gone."""
        with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            await self.send(MsgType.ERROR, {"code": code.value, "message": message})

    # -- receiving ------------------------------------------------------------------------
    async def recv(self) -> Message:
        """The next message. Raises RemoteError for an ERROR frame, ProtocolError for a bad one
        (IDLE_TIMEOUT when none completes within ``recv_timeout``), ConnectionClosed at end of
        stream."""
        if self.recv_timeout is None:
            frame = await self._next_frame()
        else:
            with trio.move_on_after(self.recv_timeout) as waited:
                frame = await self._next_frame()
            if waited.cancelled_caught:
                raise ProtocolError(ErrorCode.IDLE_TIMEOUT, f"no message for {self.recv_timeout:g} s")
        if frame.seq != self._recv_seq & 0xFFFFFFFF:
            raise ProtocolError(ErrorCode.MALFORMED, f"sequence number {frame.seq}, expected {self._recv_seq}")
        self._recv_seq += 1
        if self.recorder is not None:
            self.recorder.record(frame, self.phase_name)
        if not is_known(frame.type):
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type 0x{frame.type:04x}")
        body = codec.decode_body(frame.payload, self.limits)
        st = self._phase_stats()
        st.bytes_received += frames.HEADER_SIZE + len(frame.payload)
        st.messages_received += 1
        self._last_direction = "recv"
        if self.on_message is not None:
            self.on_message()
        msg_type = MsgType(frame.type)
        if msg_type == MsgType.ERROR:
            raise RemoteError(str(body.get("code", "?")), str(body.get("message", "")))
        return Message(msg_type, body, frame.seq, frames.HEADER_SIZE + len(frame.payload))

    async def _next_frame(self) -> frames.Frame:
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            try:
                data = await self.stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionClosed("connection lost") from exc
            if not data:
                raise ConnectionClosed("peer closed the connection")
            self._decoder.feed(data)

    async def expect(self, *types: MsgType) -> Message:
        msg = await self.recv()
        if msg.type not in types:
            names = "/".join(t.name for t in types)
            raise ProtocolError(ErrorCode.WRONG_STATE, f"expected {names}, got {msg.type.name}")
        return msg

    async def request(self, msg_type: MsgType, body: dict | None, reply: MsgType) -> dict:
        await self.send(msg_type, body)
        return (await self.expect(reply)).body

    async def aclose(self, timeout: float = 2.0) -> None:
        """Close gracefully if the peer takes the close within ``timeout`` (TLS sends a
        close_notify, which blocks on a peer that stopped reading), else forcefully."""
        try:
            with contextlib.suppress(Exception):
                with trio.move_on_after(timeout):
                    await self.stream.aclose()
                    return
                await trio.aclose_forcefully(self.stream)
        finally:  # even when cancelled (a server shutting down): flush the transcript
            if self.recorder is not None:
                self.recorder.close()


async def concurrently(*fns) -> None:
    """Run async callables in one nursery; re-raise the first real error itself (not wrapped
    in an exception group), so callers and the server see ProtocolError and friends."""
    try:
        async with trio.open_nursery() as nursery:
            for fn in fns:
                nursery.start_soon(fn)
    except BaseExceptionGroup as group:
        first = first_error(group)
        if first is None:
            raise
        raise first from None
