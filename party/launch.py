"""Start a ``shardlm serve`` process on loopback with a fresh certificate and wait until it is healthy.

What the demo, the benchmarks that need a second party (``party/bench_link``,
``protocols/ot/bench_ot``) and the tests that run the CLI as users do all need: a real server
process on 127.0.0.1, a certificate no one else holds, a client configuration pinned to it, and
afterwards the process gone and the certificate deleted::

    with launch.server(["-m", "smollm2"]) as srv:
        cfg = srv.client_config(timeout=300)   # or srv.client_args for the client CLI

:func:`proxy` starts a ``shardlm netsim-proxy`` the same way, to put a simulated WAN in front of
it; ``prefix`` runs either under a command such as ``ip netns exec NS`` (another host's network).

The server is started as a process (``python -m shardlm.cli serve --json``), never imported:
this module depends on the client and TLS layers only, not on the CLI or the protocols.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import trio

from ..wire import tls
from .client import ClientConfig, ClientError, connect

READY_TIMEOUT = 300.0  # seconds from start to healthy: loading a model on a busy 2-core machine
STOP_TIMEOUT = 10.0  # seconds a terminated server may take before it is killed


class LaunchError(ClientError):
    """The server process exited, or was not healthy in time, before it could be used.

    A :class:`ClientError` so that the CLI reports it like an unreachable server (exit status 1);
    ``returncode`` is the server's exit status if it exited, else None. The server's own error
    output goes to this process's stderr.
    """

    code = "server"

    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode


@dataclasses.dataclass
class ServerProcess:
    """A running server: the process, its ``listening`` event and the fingerprint to pin."""

    proc: subprocess.Popen
    event: dict  # the JSON line `serve --json` prints once listening
    fingerprint: str

    @property
    def port(self) -> int:
        return self.event["port"]

    @property
    def address(self) -> str:
        host = self.event.get("host", "127.0.0.1")
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.port}"

    @property
    def client_args(self) -> list[str]:
        """The client CLI's options that reach this server and pin its certificate."""
        return ["-s", self.address, "--tls-fingerprint", self.fingerprint]

    def client_config(self, **options) -> ClientConfig:
        """A ClientConfig pinned to this server; ``options`` are its other fields (timeout, net, ...)."""
        return ClientConfig(server=self.address, fingerprint=self.fingerprint, **options)


@contextlib.contextmanager
def server(extra_args: Sequence[str] = (), *, cert_dir: str | Path | None = None, env: dict | None = None,
           ready_timeout: float = READY_TIMEOUT, stderr=None, command: str = "serve", host: str = "127.0.0.1",
           prefix: Sequence[str] = (), wait_ready: bool = True) -> Iterator[ServerProcess]:
    """Run ``shardlm serve --json --host HOST --port 0 --cert .. --key .. *extra_args``
    (``command="dealer"``: a ``shardlm dealer``, the same way; see :func:`dealer`).
    ``prefix``: a command to run it under, e.g. ``["ip", "netns", "exec", NS]``; the health check
    then runs as ``shardlm health`` under the same prefix (this process may not reach that network).

    ``cert_dir`` holds ``server.crt`` and ``server.key`` to serve (as ``shardlm certs --out``
    writes them); without it a fresh self-signed pair is made in a temporary directory, removed
    on exit. Yields once the server has printed its listening event and answered a HEALTH
    request over TLS pinned to that certificate and, with ``wait_ready`` (the default), reported
    ``ready`` (its preloaded protocols built: party/preload.py), within ``ready_timeout`` seconds; raises
    :class:`LaunchError` if it exits or times out first. ``stderr``: where its log goes (default:
    this process's stderr). On exit the server is terminated
    (killed if it does not stop within STOP_TIMEOUT seconds).
    """
    deadline = time.monotonic() + ready_timeout
    with contextlib.ExitStack() as stack:
        if cert_dir is None:
            cert_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="shardlm-server-"))
            fingerprint = tls.generate_server_cert(cert_dir)
        else:
            fingerprint = tls.fingerprint_of(Path(cert_dir) / "server.crt")
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "shardlm.cli", command, "--json", "--host", host, "--port", "0",
             "--cert", str(Path(cert_dir) / "server.crt"), "--key", str(Path(cert_dir) / "server.key"),
             *extra_args],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )
        stack.callback(_stop, proc)
        launched = ServerProcess(proc, _listening_event(proc, deadline, "server"), fingerprint)
        if prefix:  # a session arriving while the server loads waits for it: one answer is enough
            _check_health_under(launched, prefix, deadline, env)
        else:
            _check_health(launched, deadline, wait_ready)
        yield launched


def next_event(launched: ServerProcess, timeout: float = READY_TIMEOUT) -> dict:
    """The next JSON line the server prints after its listening event (e.g. ``ready``)."""
    with selectors.DefaultSelector() as sel:
        sel.register(launched.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise LaunchError(f"the server printed nothing more within {timeout:g} s")
    return json.loads(launched.proc.stdout.readline() or "{}")


def dealer(extra_args: Sequence[str] = (), **options) -> contextlib.AbstractContextManager[ServerProcess]:
    """A ``shardlm dealer`` process (``extra_args`` must name its model: ``["-m", DIR]``), started and
    checked as :func:`server` starts a server, with a certificate of its own."""
    return server(extra_args, command="dealer", **options)


def _listening_event(proc: subprocess.Popen, deadline: float, what: str) -> dict:
    """The ``listening`` event the server (``what``) prints first; LaunchError if it prints
    anything else (``serve --json`` reports a failure as ``{"error": ...}`` and exits), exits, or
    is silent until the deadline."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(max(0.0, deadline - time.monotonic())):
            raise LaunchError(f"the {what} did not report listening before the ready timeout")
    line = proc.stdout.readline()
    try:
        event = json.loads(line) if line else {}
    except ValueError:
        event = None
    if not isinstance(event, dict):
        event = {"error": f"it printed {line.strip()[:200]!r}, not its JSON listening event"}
    if event.get("event") == "listening":
        return event
    try:
        status = proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        status = None
    reason = f": {event['error']}" if "error" in event else ""
    if status is None:
        raise LaunchError(f"the {what} did not start{reason}")
    raise LaunchError(f"the {what} exited with status {status} before listening{reason}", status)


def _check_health(launched: ServerProcess, deadline: float, wait_ready: bool = True) -> None:
    """A HEALTH request over pinned TLS: the server is up and serves the certificate we pin;
    ``wait_ready``: repeated (a connection each: the server's handshake timeout bounds how long
    one may stay before HELLO) until it says ``ready``."""

    async def health() -> dict:
        while True:
            async with connect(launched.client_config(timeout=max(1.0, deadline - time.monotonic()))) as conn:
                h = await conn.health()
            if not wait_ready or h.get("status") == "ready":
                return h
            if time.monotonic() > deadline:
                raise ClientError(f"still {h.get('status')} at the ready timeout: {h.get('loading')}", "timeout")
            await trio.sleep(0.2)

    try:
        trio.run(health)
    except ClientError as exc:
        status = launched.proc.poll()
        if status is not None:
            raise LaunchError(f"the server exited with status {status} before it was healthy", status) from exc
        raise LaunchError(f"the server at {launched.address} is not healthy: {exc}") from exc


def _check_health_under(launched: ServerProcess, prefix: Sequence[str], deadline: float, env: dict | None) -> None:
    """The same check as :func:`_check_health`, by a ``shardlm health`` process run under ``prefix``."""
    try:
        done = subprocess.run([*prefix, sys.executable, "-m", "shardlm.cli", "health", *launched.client_args],
                              capture_output=True, text=True, env=env, timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise LaunchError(f"the server at {launched.address} did not answer HEALTH before the ready timeout") from None
    if done.returncode != 0:
        status = launched.proc.poll()
        raise LaunchError(f"the server at {launched.address} is not healthy: {done.stderr.strip()[-500:]}", status)


@dataclasses.dataclass
class ProxyProcess:
    """A running ``shardlm netsim-proxy``: its listening event; ``report`` (its closing JSON
    report: connections, resets, bytes and mean delay each way) once it has stopped."""

    proc: subprocess.Popen
    event: dict
    report: dict | None = None

    @property
    def address(self) -> str:
        return f"{self.event['host']}:{self.event['port']}"

    def stop(self) -> dict:
        """Terminate it (SIGTERM) and return its report."""
        if self.report is None:
            _stop(self.proc, close=False)
            out = self.proc.stdout.read()
            self.proc.stdout.close()
            lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            self.report = next((e for e in lines if e.get("event") == "report"), {})
        return self.report


@contextlib.contextmanager
def proxy(target: str, *, rtt: str = "0ms", bw: str | None = None, listen: str = "127.0.0.1:0",
          extra_args: Sequence[str] = (), prefix: Sequence[str] = (), env: dict | None = None, stderr=None,
          ready_timeout: float = 60.0) -> Iterator[ProxyProcess]:
    """Run ``shardlm netsim-proxy --json --listen LISTEN --target TARGET --rtt RTT [--bw BW]
    *extra_args`` (e.g. ``--jitter 2ms``, ``--loss-reset 1``, ``-v``) until the block ends; yields
    once it listens. Clients reach the target through ``.address``; ``.report`` after the block."""
    cmd = [*prefix, sys.executable, "-m", "shardlm.cli", "netsim-proxy", "--json", "--listen", listen,
           "--target", target, "--rtt", rtt, *(["--bw", bw] if bw else []), *extra_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    launched = None
    try:
        launched = ProxyProcess(proc, _listening_event(proc, time.monotonic() + ready_timeout, "proxy"))
        yield launched
    finally:
        if launched is not None:
            launched.stop()
        else:
            _stop(proc)


def _stop(proc: subprocess.Popen, close: bool = True) -> None:
    """Terminate the process (SIGTERM, then SIGKILL after STOP_TIMEOUT: a stuck server must not
    outlive its caller) and close our end of its stdout (``close=False``: the caller reads the rest)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if close:
        proc.stdout.close()
