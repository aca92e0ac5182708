"""Start a ``shardlm serve`` process on loopback with a fresh certificate and wait until it is healthy.

What the demo, the benchmarks that need a second party (``party/bench_link``,
``protocols/ot/bench_ot``) and the tests that run the CLI as users do all need: a real server
process on 127.0.0.1, a certificate no one else holds, a client configuration pinned to it, and
afterwards the process gone and the certificate deleted::

    with launch.server(["-m", "smollm2"]) as srv:
        cfg = srv.client_config(timeout=300)   # or srv.client_args for the client CLI

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
        return f"127.0.0.1:{self.port}"

    @property
    def client_args(self) -> list[str]:
        """The client CLI's options that reach this server and pin its certificate."""
        return ["-s", self.address, "--tls-fingerprint", self.fingerprint]

    def client_config(self, **options) -> ClientConfig:
        """A ClientConfig pinned to this server; ``options`` are its other fields (timeout, net, ...)."""
        return ClientConfig(server=self.address, fingerprint=self.fingerprint, **options)


@contextlib.contextmanager
def server(extra_args: Sequence[str] = (), *, cert_dir: str | Path | None = None, env: dict | None = None,
           ready_timeout: float = READY_TIMEOUT, stderr=None, command: str = "serve",
           wait_ready: bool = True) -> Iterator[ServerProcess]:
    """Run ``shardlm serve --json --host 127.0.0.1 --port 0 --cert .. --key .. *extra_args``
    (``command="dealer"``: a ``shardlm dealer``, the same way; see :func:`dealer`).

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
            [sys.executable, "-m", "shardlm.cli", command, "--json", "--host", "127.0.0.1", "--port", "0",
             "--cert", str(Path(cert_dir) / "server.crt"), "--key", str(Path(cert_dir) / "server.key"),
             *extra_args],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )
        stack.callback(_stop, proc)
        launched = ServerProcess(proc, _listening_event(proc, deadline), fingerprint)
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


def _listening_event(proc: subprocess.Popen, deadline: float) -> dict:
    """The ``listening`` event the server prints first; LaunchError if it prints anything else
    (``serve --json`` reports a failure as ``{"error": ...}`` and exits), exits, or is silent
    until the deadline."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(max(0.0, deadline - time.monotonic())):
            raise LaunchError("the server did not report listening before the ready timeout")
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
        raise LaunchError(f"the server did not start{reason}")
    raise LaunchError(f"the server exited with status {status} before listening{reason}", status)


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


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server (SIGTERM, then SIGKILL after STOP_TIMEOUT: a stuck server must not
    outlive its caller) and close our end of its stdout."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.stdout.close()
