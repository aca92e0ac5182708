"""The ``shardlm`` command line.

Every option also reads the environment variable shown in ``--help`` (``SHARDLM_*``), and every
command takes ``--json``: one JSON object on stdout; errors as ``{"error": ..., "code": ...}``
with a non-zero exit status (1: the operation failed, 2: bad usage).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import trio

from . import __version__
from .party import client as client_mod
from .party import server as server_mod
from .wire import frames, netsim, tls
from .wire.errors import ConnectionClosed, ProtocolError, RemoteError


def shardlm_home() -> Path:
    return Path(os.environ.get("SHARDLM_HOME") or Path.home() / ".cache" / "shardlm")


class Failure(Exception):
    """An operation failed in a way the user should read (exit status 1)."""

    def __init__(self, message: str, code: str = "failed"):
        super().__init__(message)
        self.code = code


def _emit(obj: dict, as_json: bool, human: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(obj, default=str))
    else:
        click.echo(human if human is not None else json.dumps(obj, indent=2, default=str))


def _reports_errors(fn):
    """Turn known failures into a clear message (or JSON) and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json = kwargs.get("as_json", False)
        try:
            return fn(*args, **kwargs)
        except (Failure, client_mod.ClientError, tls.TLSConfigError, RemoteError, ProtocolError,
                ConnectionClosed, ValueError) as exc:
            code = getattr(exc, "code", None)
            code = getattr(code, "value", code) or type(exc).__name__
            if as_json:
                click.echo(json.dumps({"error": str(exc), "code": code}))
            else:
                click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper


def _json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")(fn)


def _net_spec(value: str | None) -> netsim.NetSpec | None:
    if not value:
        return None
    try:
        return netsim.parse_netspec(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--net") from None


def client_options(fn):
    """Options shared by every command that talks to a server."""
    opts = [
        click.option("-s", "--server", envvar="SHARDLM_SERVER", default="127.0.0.1:9090", show_default=True,
                     show_envvar=True, help="Server address HOST:PORT."),
        click.option("--tls-fingerprint", envvar="SHARDLM_TLS_FINGERPRINT", show_envvar=True,
                     help="Pin the server certificate's SHA-256 fingerprint (sha256:<hex>)."),
        click.option("--ca", envvar="SHARDLM_CA", show_envvar=True, type=click.Path(dir_okay=False),
                     help="Trust server certificates signed by this CA file instead of pinning."),
        click.option("--cert", envvar="SHARDLM_CLIENT_CERT", show_envvar=True, type=click.Path(dir_okay=False),
                     help="Client certificate for servers that require mutual TLS."),
        click.option("--key", envvar="SHARDLM_CLIENT_KEY", show_envvar=True, type=click.Path(dir_okay=False),
                     help="Private key of --cert."),
        click.option("--timeout", envvar="SHARDLM_TIMEOUT", show_envvar=True, default=30.0, show_default=True,
                     help="Seconds to wait for connect, TLS and each reply."),
        click.option("--net", envvar="SHARDLM_NET", show_envvar=True,
                     help="Simulate a network on this side, e.g. 'rtt=50ms,bw=100mbit'."),
    ]

    @functools.wraps(fn)
    def wrapper(*args, server, tls_fingerprint, ca, cert, key, timeout, net, **kwargs):
        # Validated lazily inside the command so a bad fingerprint is reported like other failures.
        def make_config() -> client_mod.ClientConfig:
            return client_mod.ClientConfig(
                server=server, fingerprint=tls.normalize_fingerprint(tls_fingerprint) if tls_fingerprint else None,
                ca=ca, cert=cert, key=key, timeout=timeout, net=_net_spec(net),
            )
        return fn(*args, client_config=make_config, **kwargs)

    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


async def _with_timeout(cfg: client_mod.ClientConfig, fn):
    async with client_mod.connect(cfg) as conn:
        with trio.fail_after(cfg.timeout):
            return await fn(conn)


def _run_client(cfg: client_mod.ClientConfig, fn):
    try:
        return trio.run(_with_timeout, cfg, fn)
    except trio.TooSlowError:
        raise Failure(f"no reply from {cfg.server} within {cfg.timeout:g} s", "timeout") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="shardlm")
def cli():
    """shardlm: private LLM inference between a client (holding the prompt) and an untrusted
    server (holding the hardware), over TLS.

    Start a server with `shardlm serve`, then talk to it with `health`, `info` and (as
    protocols land) `generate`. `shardlm demo` does both on loopback.
    """


# -- certs -------------------------------------------------------------------------------------
@cli.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for server.crt and server.key (created if missing).")
@click.option("--host", "hosts", multiple=True, help="Extra DNS name or IP for the certificate (repeatable).")
@click.option("--client", is_flag=True,
              help="Also write client-ca.crt/.key and a client.crt/.key it signed, for mutual TLS.")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@_json_option
@_reports_errors
def certs(out_dir, hosts, client, force, as_json):
    """Create a self-signed server certificate and print its fingerprint.

    Give the fingerprint to clients: `--tls-fingerprint sha256:<hex>`.
    """
    out = Path(out_dir)
    if (out / "server.key").exists() and not force:
        raise Failure(f"{out / 'server.key'} exists; pass --force to replace it", "exists")
    fp = tls.generate_server_cert(out, hosts=("localhost", "127.0.0.1", "::1", *hosts))
    result = {"cert": str(out / "server.crt"), "key": str(out / "server.key"), "fingerprint": fp}
    if client:
        tls.generate_client_ca(out)
        result.update(client_ca=str(out / "client-ca.crt"), client_cert=str(out / "client.crt"),
                      client_key=str(out / "client.key"))
    _emit(result, as_json, human="\n".join([f"wrote {result['cert']} and {result['key']}", fp]))


# -- serve -------------------------------------------------------------------------------------
def _server_cert(cert, key) -> tuple[str, str]:
    if cert and key:
        return cert, key
    if cert or key:
        raise Failure("--cert and --key go together", "usage")
    d = shardlm_home() / "certs"
    if not (d / "server.crt").exists():
        tls.generate_server_cert(d)
    return str(d / "server.crt"), str(d / "server.key")


@cli.command()
@click.option("--host", envvar="SHARDLM_HOST", default="127.0.0.1", show_default=True, show_envvar=True,
              help="Address to bind; 0.0.0.0 to accept other hosts.")
@click.option("--port", envvar="SHARDLM_PORT", default=9090, show_default=True, show_envvar=True,
              help="TCP port (0 picks a free one).")
@click.option("--cert", envvar="SHARDLM_CERT", show_envvar=True, type=click.Path(dir_okay=False),
              help="Server certificate (default: a self-signed one kept in $SHARDLM_HOME/certs).")
@click.option("--key", envvar="SHARDLM_KEY", show_envvar=True, type=click.Path(dir_okay=False),
              help="Private key of --cert.")
@click.option("--client-ca", envvar="SHARDLM_CLIENT_CA", show_envvar=True, type=click.Path(dir_okay=False),
              help="Require client certificates signed by this CA (mutual TLS).")
@click.option("--max-sessions", envvar="SHARDLM_MAX_SESSIONS", default=16, show_default=True, show_envvar=True)
@click.option("--session-ttl", envvar="SHARDLM_SESSION_TTL_SECS", default=300.0, show_default=True,
              show_envvar=True, help="Seconds a session may live.")
@click.option("--handshake-timeout", envvar="SHARDLM_HANDSHAKE_TIMEOUT_SECS", default=10.0, show_default=True,
              show_envvar=True, help="Seconds from connect to the first message.")
@click.option("--idle-timeout", envvar="SHARDLM_IDLE_TIMEOUT_SECS", default=300.0, show_default=True,
              show_envvar=True, help="Seconds a session may wait for the client.")
@click.option("--max-seq-len", envvar="SHARDLM_MAX_SEQ_LEN", default=8192, show_default=True, show_envvar=True)
@click.option("--max-frame-bytes", envvar="SHARDLM_MAX_FRAME_BYTES", default=frames.Limits.max_frame_bytes,
              show_default=True, show_envvar=True)
@click.option("--device", envvar="SHARDLM_DEVICE", default="cpu", show_default=True, show_envvar=True,
              help="torch device for the server's linear work (cpu, cuda, cuda:1).")
@click.option("--record-transcript", envvar="SHARDLM_RECORD_TRANSCRIPT", show_envvar=True,
              type=click.Path(file_okay=False), help="Record every received frame, per session, to this directory.")
@click.option("-v", "--verbose", is_flag=True, help="Log each connection to stderr.")
@_json_option
@_reports_errors
def serve(host, port, cert, key, client_ca, max_sessions, session_ttl, handshake_timeout, idle_timeout,
          max_seq_len, max_frame_bytes, device, record_transcript, verbose, as_json):
    """Run a server until interrupted.

    Prints the address and the certificate fingerprint clients must pin (with --json, one JSON
    line when listening).
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    cert, key = _server_cert(cert, key)
    ctx = tls.server_context(cert, key, client_ca)
    config = server_mod.ServerConfig(
        host=host, port=port, max_sessions=max_sessions, session_ttl=session_ttl,
        handshake_timeout=handshake_timeout, idle_timeout=idle_timeout, max_seq_len=max_seq_len,
        limits=frames.Limits(max_frame_bytes=max_frame_bytes), device=device, record_dir=record_transcript,
    )
    server = server_mod.Server(config, ctx)
    fp = tls.fingerprint_of(cert)

    async def main():
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(server.serve)
            event = {"event": "listening", "host": host, "port": bound, "fingerprint": fp,
                     "protocols": sorted(server.offered), "mutual_tls": client_ca is not None}
            _emit(event, as_json, human=f"shardlm {__version__} listening on {host}:{bound}\n"
                                        f"TLS fingerprint: {fp}\nprotocols: {', '.join(event['protocols'])}")
            sys.stdout.flush()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise Failure(f"cannot listen on {host}:{port}: {exc}", "listen") from None


# -- health / info -----------------------------------------------------------------------------
@cli.command()
@client_options
@_json_option
@_reports_errors
def health(client_config, as_json):
    """Check that a server is up and reachable over authenticated TLS."""
    cfg = client_config()
    result = _run_client(cfg, lambda conn: conn.health())
    _emit(result, as_json, human=f"{cfg.server}: {result['status']} (up {result['uptime_secs']:.0f} s, "
                                 f"{result['active_sessions']} active sessions)")


@cli.command()
@client_options
@_json_option
@_reports_errors
def info(client_config, as_json):
    """Show the server's version, protocols, model, device and limits."""
    cfg = client_config()
    result = _run_client(cfg, lambda conn: conn.info())
    lines = [f"shardlm {result['version']} (protocol v{result['protocol_version']}) on {result['device']}",
             f"model: {result['model'] or 'none'} {result['model_fingerprint']}", "protocols:"]
    for name, p in result["protocols"].items():
        lines.append(f"  {name:8s} {'private' if p['private'] else 'NOT PRIVATE'}: {p['summary']}")
    lines.append("limits: " + ", ".join(f"{k}={v}" for k, v in result["limits"].items()))
    _emit(result, as_json, human="\n".join(lines))


# -- demo --------------------------------------------------------------------------------------
def start_server_process(args: list[str], env=None) -> tuple[subprocess.Popen, dict]:
    """Start `shardlm serve --json ...` as a child process; return it and its listening event."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardlm.cli", "serve", "--json", *args],
        stdout=subprocess.PIPE, stderr=None, text=True, env=env,
    )
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        raise Failure(f"server exited with status {proc.returncode} before listening", "server")
    return proc, json.loads(line)


@cli.command()
@_json_option
@_reports_errors
def demo(as_json):
    """Start a server and a client on loopback over pinned TLS and talk to it."""
    with tempfile.TemporaryDirectory(prefix="shardlm-demo-") as tmp:
        fp = tls.generate_server_cert(tmp)
        proc, event = start_server_process(
            ["--host", "127.0.0.1", "--port", "0", "--cert", f"{tmp}/server.crt", "--key", f"{tmp}/server.key"]
        )
        try:
            cfg = client_mod.ClientConfig(server=f"127.0.0.1:{event['port']}", fingerprint=fp)

            async def talk(conn):
                h = await conn.health()
                i = await conn.info()
                s = await conn.open_session("echo")
                rtts = [(await conn.ping(b"x" * 64))[0] for _ in range(20)]
                return h, i, s, sorted(rtts)[len(rtts) // 2]

            h, i, s, rtt = _run_client(cfg, talk)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    result = {"server": event, "health": h, "info": i, "session": s, "median_rtt_ms": rtt * 1e3}
    _emit(result, as_json, human="\n".join([
        f"server listening on 127.0.0.1:{event['port']}, pinned {fp}",
        f"health: {h['status']}", f"protocols offered: {', '.join(i['protocols'])}",
        f"session {s['session_id']} ({s['protocol']}): median round trip {rtt * 1e3:.2f} ms over TLS 1.3",
        "(private generation arrives with the protocol issues)",
    ]))

from .protocols.ot.bench import ot_bench  # noqa: E402
cli.add_command(ot_bench)

def main():
    cli(prog_name="shardlm")


if __name__ == "__main__":
    main()
