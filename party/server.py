"""The server: one trio task per connection, each a small state machine.

Connection states and the messages each accepts (anything else is WRONG_STATE)::

    new      HEALTH -> HEALTH_OK (stay), INFO -> INFO_OK (stay), PING -> PONG (stay: a client
             measuring the link before it picks a protocol), HELLO -> HELLO_OK (session)
    session  PING -> PONG, BYE (close), the session protocol's own message types

Every violation (bad frame, unknown type, wrong state, limit) is answered with an ERROR frame
carrying a code and a human message, then that connection is closed; other connections are
unaffected. Timeouts: ``handshake_timeout`` covers TLS plus the first message,
``idle_timeout`` any later wait for the client (a client trickling a frame byte by byte
included), ``send_timeout`` each message the server sends (a client that stops reading),
``session_ttl`` the whole session, handler work included (a cancel scope), times the protocol's
``session_ttl_scale`` (v3-mpc and v3-ot: 20).

Resources: products run in worker threads behind one process-wide limiter
(``compute_slots``), never on the event loop; a protocol charges the rows a session asks for
against the session's capacity (``ServerSession.charge``) and refuses a request whose working
memory exceeds ``session_memory_mb`` (``ServerSession.check_memory``). Every cut-off is
counted by reason in ``health``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import ssl
import time

import trio

from .. import __version__
from ..wire import frames
from ..wire.errors import ConnectionClosed, ErrorCode, PeerStalled, ProtocolError, RemoteError
from ..wire.msgtypes import MsgType
from . import handshake
from .batching import DEFAULT_MAX_ROWS, DEFAULT_WINDOW, Batcher
from .channel import Channel, Message
from .preload import Preloader
from .spec import ProtocolSpec
from .transcript import TranscriptRecorder

log = logging.getLogger("shardlm.server")


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9090
    max_sessions: int = 16
    session_ttl: float = 300.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    send_timeout: float = 60.0
    max_seq_len: int = 8192
    compute_slots: int = 1         # products running at once, across sessions (each uses torch's threads)
    session_memory_mb: int = 1024  # working memory one request of a session may need
    limits: frames.Limits = dataclasses.field(default_factory=frames.Limits)
    device: str = "cpu"
    record_dir: str | None = None
    cc_provider: str = "software"  # v3-cc: software (simulated TEE) or nvidia
    cc_key: str | None = None      # v3-cc software provider's key file (default: $SHARDLM_HOME/cc)
    matrix_cache: str | None = None  # directory of the ring-matrix disk cache (protocols/matrix_cache); None: off
    batch_window: float = DEFAULT_WINDOW  # seconds a product may wait for other sessions' rows (0: no batching)
    batch_rows: int = DEFAULT_MAX_ROWS    # rows in one batched product at most


@dataclasses.dataclass
class ServerSession:
    """What a protocol handler sees of its session."""

    session_id: str
    channel: Channel
    protocol: str
    server: "Server"
    max_seq_len: int
    state: dict = dataclasses.field(default_factory=dict)  # the protocol's own per-session state
    handler: object = None  # the protocol's handler; its optional close() runs when the session ends
    used: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def charge(self, key: str, rows: int, *, per_request: int | None = None, total: int | None = None) -> None:
        """Count ``rows`` against ``key``'s budget: at most ``per_request`` in one request and
        ``total`` (default: the session's capacity, max_seq_len) over the session."""
        total = self.max_seq_len if total is None else total
        if per_request is not None and rows > per_request:
            raise ProtocolError(ErrorCode.SEQ_TOO_LONG, f"{key}: {rows} rows in one request; the schedule allows "
                                                        f"{per_request}")
        if self.used[key] + rows > total:
            raise ProtocolError(ErrorCode.SEQ_TOO_LONG, f"{key}: {self.used[key] + rows} rows in this session, more "
                                                        f"than its capacity of {total}")
        self.used[key] += rows

    def check_memory(self, nbytes: int, what: str) -> None:
        limit = self.server.config.session_memory_mb << 20
        if nbytes > limit:
            raise ProtocolError(ErrorCode.RESOURCE_LIMIT, f"{what} would need {nbytes / 2**20:,.0f} MiB; this server "
                                                          f"allows {limit >> 20:,} MiB per request")


class Server:
    def __init__(self, config: ServerConfig, ssl_context: ssl.SSLContext, model=None, *,
                 protocols: dict[str, ProtocolSpec], preload: list[str] = (), tp=None, kernels: dict | None = None):
        """``protocols``: the specs this server offers (protocols/registry.offered); a protocol
        needing a model is refused here when there is none. ``preload``: offered protocols whose
        state :meth:`serve` builds at start-up (party/preload.py); health says ``loading`` until
        they are built, then ``ready``. ``tp``: the tensor-parallel coordinator (protocols/tp) the
        masked protocols multiply through, or None (one process). ``kernels``: the device
        self-check's report (cli serve runs protocols/ring.self_check before it builds a server),
        shown by info."""
        self.config = config
        self.tp = tp
        self.kernels = kernels
        self.ssl_context = ssl_context
        self.model = model
        missing = sorted(n for n, s in protocols.items() if s.needs_model and model is None)
        if missing:
            raise ValueError(f"protocols {', '.join(missing)} need a model")
        if any(s.dealer for s in protocols.values()) and len(protocols) > 1:
            # one process dealing masks and receiving x - r would unmask x: a dealer offers nothing else
            raise ValueError(f"a dealer offers its dealer protocol alone, not with {', '.join(sorted(protocols))}")
        self.offered = dict(protocols)
        unknown = sorted(set(preload) - set(self.offered))
        if unknown:
            raise ValueError(f"cannot preload {', '.join(unknown)}: not offered")
        self.preloader = Preloader(self, list(preload))
        self.active = 0
        self.served = 0
        self.started = time.time()
        self.fingerprint = model.fingerprint() if model is not None else "none"
        # Open sessions by id; a session leaves (and its handler's close() runs) when its
        # connection ends for any reason: BYE, error, expiry, disconnect.
        self.sessions: dict[str, ServerSession] = {}
        self._ttl: dict[str, float] = {}  # session id -> its TTL in seconds (--session-ttl x the protocol's scale)
        self._protocol_state: dict[str, object] = {}
        self.compute_limiter = trio.CapacityLimiter(config.compute_slots)
        # exact row-wise products of one matrix from several sessions run as one (party/batching.py)
        self.batcher = Batcher(self.compute_limiter, config.batch_window, config.batch_rows)
        self.cut_off: collections.Counter = collections.Counter()  # connections ended by a limit, by reason

    async def compute(self, fn, *args):
        """Run ``fn(*args)`` in a worker thread behind the process-wide limiter: the event loop
        keeps serving other sessions (and their timeouts) while a product runs."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.compute_limiter)

    async def batched(self, session: "ServerSession", key, fn, rows, order: int = 0):
        """``fn(rows)`` like :meth:`compute`, for a row-wise exact ``fn`` (one per ``key``): stacked
        with other sessions' rows of the same key when they come within the batch window."""
        return await self.batcher.product(session.session_id, key, fn, rows, order)

    async def preloaded(self, protocol: str) -> None:
        """Wait until ``protocol``'s start-up build is over (at once if it has none)."""
        await self.preloader.wait(protocol)

    def matrices(self, name: str) -> dict | None:
        """``{"built": k, "total": n}`` of a protocol's server-side matrices (its optional
        ``matrices_built`` hook), None for a protocol without any."""
        hook = self.offered[name].hook("matrices_built") if self.model is not None else None
        return hook(self.offered[name], self) if hook is not None else None

    def protocol_state(self, protocol: str, make):
        """State a protocol keeps across its sessions on this server (v3-cc's provider, v3-mpc's
        used dealer seeds), made by ``make()`` on first use and owned by the server."""
        if protocol not in self._protocol_state:
            self._protocol_state[protocol] = make()
        return self._protocol_state[protocol]

    def info(self, request: dict | None = None) -> dict:
        # private: whether a generation keeps the prompt from the server; None for protocols that
        # run no inference (echo, ot), which have no prompt to keep
        protocols = {n: {"private": s.private if s.runs_generation else None, "summary": s.summary}
                     for n, s in sorted(self.offered.items())}
        for n, s in self.offered.items():
            server_info = s.hook("server_info")
            if server_info is not None:
                protocols[n].update(server_info(s, self, request or {}))
            if (built := self.matrices(n)) is not None:
                protocols[n]["matrices"] = built
            if n in self.preloader.state:
                protocols[n]["preload"] = dict(self.preloader.state[n])
        return {
            "name": "shardlm", "version": __version__,
            "protocol_version": handshake.PROTOCOL_VERSION,
            "protocols": protocols,
            "model": getattr(self.model, "name", None),
            "model_fingerprint": self.fingerprint,
            "device": self.config.device,
            **({"tp": self.tp.describe()} if self.tp is not None else {}),
            **({"kernels": self.kernels} if self.kernels is not None else {}),
            "limits": {
                "max_sessions": self.config.max_sessions, "max_seq_len": self.config.max_seq_len,
                "max_frame_bytes": self.config.limits.max_frame_bytes,
                "max_tensor_elements": self.config.limits.max_tensor_elements,
                "session_ttl_secs": self.config.session_ttl, "idle_timeout_secs": self.config.idle_timeout,
                "send_timeout_secs": self.config.send_timeout, "session_memory_mb": self.config.session_memory_mb,
            },
            "batching": self.batcher.stats(),
        }

    def health(self) -> dict:
        """``active_sessions``: sessions past HELLO and not yet ended; ``connections``: open
        connections, the one asking included (it used to be reported as active_sessions, so an
        idle server said 1)."""
        ready = self.preloader.ready
        out = {"status": "ready" if ready else "loading", "uptime_secs": round(time.time() - self.started, 3),
               "active_sessions": len(self.sessions), "connections": self.active, "served": self.served,
               "cut_off": dict(self.cut_off), "batching": self.batcher.stats()}
        if not ready:
            out["loading"] = self.preloader.progress()
        out["protocols"] = {n: {**self.preloader.state.get(n, {"status": "on first use"}),
                                **({"matrices": m} if (m := self.matrices(n)) is not None else {})}
                            for n in sorted(self.offered)}
        if self.preloader.seconds is not None:
            out["ready_secs"] = self.preloader.seconds
        if self.tp is not None:  # a failed rank group makes no more products: not ready, whatever was built
            out["tp"] = {k: v for k, v in self.tp.describe().items() if k in ("size", "status")}
            if self.tp.failed:
                out["status"] = "failed"
        return out

    async def listen(self) -> list[trio.SocketListener]:
        """Bind the configured address (an OSError, e.g. the port is taken, raises here)."""
        return await trio.open_tcp_listeners(self.config.port, host=self.config.host)

    async def serve(self, listeners=None, *, on_listening=None, on_ready=None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections and, meanwhile, build the preloaded protocols' state:
        ``on_listening(port)`` once listening (before the preload starts), ``on_ready(preloader)``
        once the preload is done."""
        if listeners is None:
            listeners = await self.listen()
        ports = sorted({ln.socket.getsockname()[1] for ln in listeners})
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(trio.serve_listeners, self._handle_tcp, [listener])
            if on_listening is not None:
                on_listening(ports[0])
            await nursery.start(self.batcher.run)
            task_status.started(ports[0])
            nursery.start_soon(self.preloader.run, on_ready)
            await trio.sleep_forever()

    async def _handle_tcp(self, tcp: trio.SocketStream) -> None:
        try:
            peer = "%s:%s" % tcp.socket.getpeername()[:2]
        except OSError:
            peer = "?"
        stream = trio.SSLStream(tcp, self.ssl_context, server_side=True)
        self.active += 1
        try:
            await self.handle_stream(stream, peer)
        finally:
            self.active -= 1
            self.served += 1

    async def handle_stream(self, stream: trio.abc.Stream, peer: str) -> None:
        """Serve one connection on ``stream`` (an SSLStream in production, anything in tests)."""
        session_id = secrets.token_hex(8)
        started = trio.current_time()
        try:
            with trio.fail_after(self.config.handshake_timeout):
                if isinstance(stream, trio.SSLStream):
                    await stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            log.info("%s: TLS handshake failed: %s", peer, exc or type(exc).__name__)
            await _close(stream)
            return
        recorder = None
        if self.config.record_dir:
            recorder = TranscriptRecorder(self.config.record_dir, session_id, role="server", peer=peer)
        channel = Channel(stream, limits=self.config.limits, recorder=recorder, send_timeout=self.config.send_timeout)
        ended = "bye"  # how the connection ended, for the log
        try:
            if self.active > self.config.max_sessions:
                raise ProtocolError(ErrorCode.BUSY, f"server is at its limit of {self.config.max_sessions} sessions; retry later")
            await self._run(channel, session_id, started, peer)
        except PeerStalled as exc:  # not reading: an ERROR frame would not get through either
            self.cut_off["send_timeout"] += 1
            ended = f"cut off: {exc}"
        except ProtocolError as exc:
            if exc.code in _CUT_OFF:
                self.cut_off[exc.code.value] += 1
            ended = f"error {exc}"
            await channel.send_error(exc.code, exc.message)
        except RemoteError as exc:
            ended = f"the client reported {exc.code}: {exc.message}"
        except ConnectionClosed as exc:
            ended = f"disconnected: {exc}"
        except Exception as exc:  # a bug in one session must not take the server down
            log.exception("%s [%s]: internal error", peer, session_id)
            ended = f"internal error {type(exc).__name__}"
            await channel.send_error(ErrorCode.INTERNAL, f"internal server error: {type(exc).__name__}")
        finally:
            await channel.aclose()
            session = self.sessions.pop(session_id, None)
            self._log_end(peer, session_id, session, channel, ended, trio.current_time() - started)

    def _log_end(self, peer: str, session_id: str, session, channel: Channel, ended: str, seconds: float) -> None:
        """One line per connection at -v: a session's protocol, traffic and how it ended; a
        connection that opened no session (health, info) only when it ended badly."""
        if session is None:
            (log.debug if ended.startswith(("bye", "disconnected: peer closed")) else log.info)(
                "%s [%s]: connection ended without a session: %s", peer, session_id, ended)
            return
        stats = channel.stats.values()
        log.info("%s [%s]: %s session ended after %.1f s (%s): %d requests, %s bytes received, %s bytes sent", peer,
                 session_id, session.protocol, seconds, ended, sum(s.messages_received for s in stats),
                 f"{sum(s.bytes_received for s in stats):,}", f"{sum(s.bytes_sent for s in stats):,}")

    async def _recv_by(self, channel: Channel, deadline: float) -> Message:
        """A message before the handshake's deadline (after HELLO, channel.recv_timeout, the
        idle timeout, bounds every wait instead)."""
        with trio.move_on_at(deadline) as scope:
            return await channel.recv()
        assert scope.cancelled_caught
        raise ProtocolError(ErrorCode.HANDSHAKE_TIMEOUT,
                            f"no message within {self.config.handshake_timeout:g} s of connecting")

    async def _run(self, channel: Channel, session_id: str, started: float, peer: str) -> None:
        cfg = self.config
        deadline = started + cfg.handshake_timeout
        # The TTL bounds everything the session does, a handler's own exchanges and sends too.
        with trio.CancelScope() as ttl:
            try:
                await self._loop(channel, session_id, deadline, ttl, peer)
            finally:
                session = self.sessions.get(session_id)  # it leaves self.sessions in handle_stream
                if session is not None and hasattr(session.handler, "close"):
                    session.handler.close()  # e.g. free a per-session KV cache
                self.batcher.leave(session_id)  # no batch waits for it any more
                secs = self._ttl.pop(session_id, cfg.session_ttl)
        if ttl.cancelled_caught:
            raise ProtocolError(ErrorCode.SESSION_EXPIRED, f"session exceeded its TTL of {secs:g} s; start a new one")

    async def _loop(self, channel: Channel, session_id: str, deadline: float, ttl: trio.CancelScope,
                    peer: str) -> None:
        cfg = self.config
        session: ServerSession | None = None
        handler = None
        while True:
            if session is None:
                msg = await self._recv_by(channel, deadline)
            else:
                msg = await channel.recv()
            if session is None:
                if msg.type == MsgType.HEALTH:
                    await channel.send(MsgType.HEALTH_OK, self.health())
                elif msg.type == MsgType.INFO:
                    await channel.send(MsgType.INFO_OK, self.info(msg.body))
                elif msg.type == MsgType.PING:  # bounded like the rest of the handshake by its deadline
                    await channel.send(MsgType.PONG, _pong(msg.body))
                elif msg.type == MsgType.HELLO:
                    protocol = handshake.check_hello(
                        msg.body, offered=self.offered, model_fingerprint=self.fingerprint,
                        max_seq_len=cfg.max_seq_len,
                    )
                    spec = self.offered[protocol]
                    session = ServerSession(session_id, channel, protocol, self, int(msg.body["max_seq_len"]))
                    channel.recv_timeout = cfg.idle_timeout  # every later wait, a handler's own included
                    handler = spec.server_handler(session)
                    session.handler = handler
                    self.sessions[session_id] = session
                    self._ttl[session_id] = cfg.session_ttl * spec.session_ttl_scale
                    ttl.deadline = trio.current_time() + self._ttl[session_id]
                    log.info("%s [%s]: %s session started, capacity %d positions", peer, session_id,
                             protocol, session.max_seq_len)
                    if channel.recorder is not None:
                        channel.recorder.update_meta(protocol=protocol, model_fingerprint=self.fingerprint)
                    await channel.send(MsgType.HELLO_OK, handshake.hello_ok(
                        session_id=session_id, protocol=protocol, private=spec.private,
                        model=getattr(self.model, "name", None) or "none", model_fingerprint=self.fingerprint,
                        max_seq_len=session.max_seq_len,
                    ))
                else:
                    raise ProtocolError(ErrorCode.WRONG_STATE, f"{msg.type.name} before HELLO; send HELLO first")
                continue
            if msg.type == MsgType.PING:
                await channel.send(MsgType.PONG, _pong(msg.body))
            elif msg.type == MsgType.BYE:
                return
            elif handler is not None and msg.type in handler.message_types:
                await handler.handle(msg)
            else:
                raise ProtocolError(ErrorCode.WRONG_STATE, f"{msg.type.name} is not valid in a {session.protocol} session")


# Errors that end a connection because the client broke a limit (counted in health's cut_off).
_CUT_OFF = frozenset({ErrorCode.HANDSHAKE_TIMEOUT, ErrorCode.IDLE_TIMEOUT, ErrorCode.SESSION_EXPIRED,
                      ErrorCode.SEQ_TOO_LONG, ErrorCode.RESOURCE_LIMIT})


def _pong(body: dict) -> dict:
    """Echo the ping's data, or with ``echo: False`` only its size (for throughput tests)."""
    echo = body.get("echo", True)
    if not isinstance(echo, bool):  # (a tensor has no truth value)
        raise ProtocolError(ErrorCode.MALFORMED, f"PING 'echo' must be true or false, not {type(echo).__name__}")
    if echo:
        return body
    data = body.get("data")
    return {"nbytes": int(getattr(data, "nbytes", 0))}


async def _close(stream) -> None:
    try:
        await trio.aclose_forcefully(stream)
    except Exception:
        pass
