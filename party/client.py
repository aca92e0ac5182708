"""The client: connect (with retries), authenticate the server, then health / info / sessions.

``connect`` layers, bottom up: TCP, optional netsim (so TLS bytes pay the simulated link),
TLS 1.3 with the server pinned by fingerprint or verified against a CA, then a Channel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import ssl
import time

import trio

from ..wire import frames, netsim, tls
from ..wire.errors import ConnectionClosed
from ..wire.msgtypes import MsgType
from . import handshake
from .channel import Channel
from .transcript import TranscriptRecorder


class ClientError(Exception):
    """A failure the user can act on (unreachable server, TLS refusal, timeout); ``code`` is
    the CLI's error code (cli.ERROR_CODES)."""

    def __init__(self, message: str, code: str = "failed"):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class ClientConfig:
    server: str = "127.0.0.1:9090"
    fingerprint: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout: float = 30.0
    connect_retries: int = 3
    net: netsim.NetSpec | None = None
    limits: frames.Limits = dataclasses.field(default_factory=frames.Limits)
    record_dir: str | None = None  # record what this client receives (audits of the client's view)


def parse_address(text: str, *, any_port: bool = False) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a URL-ish ``tls://host:port`` (the seeds used http://);
    ``any_port``: port 0 too (an address to listen on, where 0 picks a free port)."""
    addr = text.strip()
    for scheme in ("tls://", "https://", "http://", "shardlm://"):
        if addr.startswith(scheme):
            addr = addr[len(scheme):]
    addr = addr.rstrip("/")
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not (0 if any_port else 1) <= int(port) < 65536:
        raise ClientError(f"bad server address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9090", "usage")
    return host, int(port)


# The bandwidth probe: one PING this large, echoed (2 ms at 1 Gbit/s, 42 ms at 100 Mbit/s).
PROBE_BYTES = 256 * 1024


class Connection:
    def __init__(self, channel: Channel, config: ClientConfig):
        self.channel = channel
        self.config = config
        self.session: dict | None = None

    async def health(self) -> dict:
        return await self.channel.request(MsgType.HEALTH, {}, MsgType.HEALTH_OK)

    async def info(self) -> dict:
        return await self.channel.request(MsgType.INFO, {}, MsgType.INFO_OK)

    async def open_session(self, protocol: str, model_fingerprint: str = "none", max_seq_len: int = 2048) -> dict:
        body = await self.channel.request(
            MsgType.HELLO, handshake.hello(protocol, model_fingerprint, max_seq_len), MsgType.HELLO_OK
        )
        self.session = handshake.check_hello_ok(body, protocol=protocol)
        if self.channel.recorder is not None:
            self.channel.recorder.update_meta(protocol=protocol, model_fingerprint=model_fingerprint)
        return self.session

    async def ping(self, data=None, echo: bool = True) -> tuple[float, dict]:
        """Round-trip one PING; return (seconds, reply body)."""
        t0 = time.perf_counter()
        reply = await self.channel.request(MsgType.PING, {"data": data, "echo": echo}, MsgType.PONG)
        return time.perf_counter() - t0, reply

    async def probe_link(self, pings: int = 3, nbytes: int = PROBE_BYTES) -> dict:
        """The link's RTT (the fastest of ``pings`` small PINGs) and bandwidth (one PING of
        ``nbytes`` echoed back: 2 * nbytes over its time less one RTT), in seconds and bytes/s.
        Valid before HELLO (``--protocol auto`` chooses the protocol from it)."""
        t0 = time.perf_counter()
        rtt = min([(await self.ping(b""))[0] for _ in range(pings)])
        big, _ = await self.ping(bytes(nbytes))
        bandwidth = 2 * nbytes / max(big - rtt, 1e-6)
        return {"rtt": rtt, "bandwidth": bandwidth, "probe_seconds": time.perf_counter() - t0}

    async def bye(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.channel.send(MsgType.BYE, {})


async def _open_tcp(host: str, port: int, cfg: ClientConfig) -> trio.SocketStream:
    delay = 0.2
    for attempt in range(cfg.connect_retries + 1):
        try:
            with trio.fail_after(cfg.timeout):
                return await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            if attempt == cfg.connect_retries:
                raise ClientError(
                    f"cannot reach {host}:{port} after {attempt + 1} attempts: {exc or 'timed out'}", "unreachable"
                ) from exc
            await trio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def connect(cfg: ClientConfig):
    """Yield a :class:`Connection` to an authenticated server."""
    host, port = parse_address(cfg.server)
    ctx = tls.client_context(fingerprint=cfg.fingerprint, ca=cfg.ca, cert=cfg.cert, key=cfg.key)
    tcp = await _open_tcp(host, port, cfg)
    async with netsim.simulate(tcp, cfg.net) as link:
        stream = trio.SSLStream(link, ctx, server_hostname=host if cfg.ca else None)
        try:
            with trio.fail_after(cfg.timeout):
                await stream.do_handshake()
            if cfg.fingerprint is not None:
                tls.check_pin(stream.getpeercert(binary_form=True), cfg.fingerprint)
        except tls.PinMismatch as exc:
            await trio.aclose_forcefully(stream)
            raise ClientError(f"refusing to talk to {host}:{port}: {exc}", "pin_mismatch") from exc
        except (ssl.SSLError, trio.BrokenResourceError) as exc:
            await trio.aclose_forcefully(stream)
            cause = exc.__cause__ or exc
            if "WRONG_VERSION_NUMBER" in str(cause) or "record layer failure" in str(cause):
                cause = f"the peer does not speak TLS (is {host}:{port} a shardlm server?) [{cause}]"
            raise ClientError(f"TLS handshake with {host}:{port} failed: {cause}", "tls_failed") from exc
        except trio.TooSlowError as exc:
            await trio.aclose_forcefully(stream)
            raise ClientError(f"TLS handshake with {host}:{port} timed out after {cfg.timeout:g} s", "timeout") from exc
        recorder = None
        if cfg.record_dir:
            recorder = TranscriptRecorder(cfg.record_dir, secrets.token_hex(8), role="client", peer=f"{host}:{port}")
        channel = Channel(stream, limits=cfg.limits, recorder=recorder)
        conn = Connection(channel, cfg)
        try:
            yield conn
        finally:
            if conn.session is not None:
                await conn.bye()
            await channel.aclose()
