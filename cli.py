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
import ssl
import sys
import tempfile
import time
from pathlib import Path

import click
import trio

from . import __version__
from .models.config import ModelError
from .party import client as client_mod
from .party import server as server_mod
from .party import spec
from .party.run import summary
from .protocols import registry
from .wire import frames, netsim, tls
from .wire.errors import ConnectionClosed, ErrorCode, ProtocolError, RemoteError


class Failure(Exception):
    """An operation failed in a way the user should read (exit status 1; ``usage``: 2)."""

    def __init__(self, message: str, code: str = "failed"):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code


# Every code an error carries in `--json` output ({"error": ..., "code": ...}), in one table.
# "usage" exits 2 (bad usage, found before any work starts); every other code exits 1.
ERROR_CODES = {
    "usage": "bad usage: an unknown option or protocol, a value out of range, an empty prompt",
    "failed": "the operation failed",
    "internal": "a bug: the message names the exception; --debug shows the traceback",
    "exists": "the output already exists",
    "model": "the model cannot be loaded, or the request does not fit its context",
    "timeout": "no reply within --timeout",
    "material": "mask material missing, already used, exhausted or made for another model",
    "listen": "the server cannot listen on its address (e.g. the port is taken)",
    "cc_provider": "the confidential-computing provider is unavailable",
    "device": "the device's exact ring product failed its start-up self-check (wrong products): serve refuses",
    "unreachable": "no TCP connection to the server",
    "dealer": "the dealer cannot be used: it is the server itself (same certificate), or its reply is malformed",
    "pin_mismatch": "the server's certificate is not the pinned one",
    "tls_failed": "the TLS handshake failed (e.g. the peer does not speak TLS)",
    "tls_config": "bad TLS set-up: a missing file, a malformed fingerprint, no trust anchor",
    "not_shardlm": "the peer speaks TLS but not the shardlm protocol",
    "connection_closed": "the server closed the connection",
    "remote": "the server reported an error whose code this client does not know",
    **{c.value: f"the wire protocol: {c.name.lower().replace('_', ' ')}" for c in ErrorCode},
}


def error_code(exc: BaseException) -> str:
    """The table's code for a failure."""
    from .models.config import ModelError

    code = getattr(exc, "code", None)
    code = getattr(code, "value", code)
    if code is None:
        kinds = ((spec.OptionError, "usage"), (tls.TLSConfigError, "tls_config"), (ModelError, "model"),
                 (ConnectionClosed, "connection_closed"))
        code = next((c for kind, c in kinds if isinstance(exc, kind)), "failed")
    if isinstance(exc, ProtocolError) and code in (ErrorCode.BAD_MAGIC.value, ErrorCode.BAD_VERSION.value):
        return "not_shardlm"
    return code if code in ERROR_CODES else "remote" if isinstance(exc, RemoteError) else "failed"


def _emit(obj: dict, as_json: bool, human: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(obj, default=str))
    else:
        click.echo(human if human is not None else json.dumps(obj, indent=2, default=str))


def _fail(message: str, code: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"error": message, "code": code}))
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(2 if code == "usage" else 1)


def _reports_errors(fn):
    """Turn known failures into a one-line message (or JSON) and exit status 1 (2: usage)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json = kwargs.get("as_json", False)
        try:
            return fn(*args, **kwargs)
        except (Failure, client_mod.ClientError, tls.TLSConfigError, RemoteError, ProtocolError,
                ConnectionClosed, ValueError, OSError, ModelError) as exc:
            code = error_code(exc)
            message = str(exc)
            if code == "not_shardlm":
                message = f"the server does not speak the shardlm protocol (is this the right port?): {exc}"
            _fail(message, code, as_json)

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
@click.option("--debug", is_flag=True, envvar="SHARDLM_DEBUG", show_envvar=True,
              help="Show the traceback of an unexpected error instead of one line.")
def cli(debug):
    """shardlm: private LLM inference between a client (holding the prompt) and an untrusted
    server (holding the hardware), over TLS.

    Start a server with `shardlm serve`, then `generate` or `chat` against it (`health` and
    `info` check it; `bench` compares protocols). `shardlm demo` does both on loopback.
    `shardlm dealer` is an optional third party dealing the clients' mask material; it and the
    server must not collude (a dealer that sees the server's view unmasks everything).
    Errors are one line (with --json: {"error", "code"}); exit status 1 when an operation
    fails, 2 for bad usage.
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


# -- serve and dealer --------------------------------------------------------------------------
def _server_cert(cert, key, subdir: str = "certs") -> tuple[str, str]:
    if cert and key:
        return cert, key
    if cert or key:
        raise Failure("--cert and --key go together", "usage")
    from .models.fetch import shardlm_home

    d = shardlm_home() / subdir
    if not (d / "server.crt").exists():
        tls.generate_server_cert(d)
    return str(d / "server.crt"), str(d / "server.key")


def listener_options(env: str, port: int, cert_home: str):
    """The options of a process that serves sessions (`serve`, `dealer`): address, TLS, limits.
    ``env``: the prefix of their environment variables; ``cert_home``: where the default
    self-signed certificate is kept under $SHARDLM_HOME."""
    opts = [
        click.option("--host", envvar=f"{env}HOST", default="127.0.0.1", show_default=True, show_envvar=True,
                     help="Address to bind; 0.0.0.0 to accept other hosts."),
        click.option("--port", envvar=f"{env}PORT", default=port, show_default=True, show_envvar=True,
                     help="TCP port (0 picks a free one)."),
        click.option("--cert", envvar=f"{env}CERT", show_envvar=True, type=click.Path(dir_okay=False),
                     help=f"TLS certificate (default: a self-signed one kept in $SHARDLM_HOME/{cert_home})."),
        click.option("--key", envvar=f"{env}KEY", show_envvar=True, type=click.Path(dir_okay=False),
                     help="Private key of --cert."),
        click.option("--client-ca", envvar=f"{env}CLIENT_CA", show_envvar=True, type=click.Path(dir_okay=False),
                     help="Require client certificates signed by this CA (mutual TLS)."),
        click.option("--max-sessions", envvar=f"{env}MAX_SESSIONS", default=16, show_default=True, show_envvar=True),
        click.option("--session-ttl", envvar=f"{env}SESSION_TTL_SECS", default=300.0, show_default=True,
                     show_envvar=True,
                     help="Seconds a session may live; v3-mpc and v3-ot sessions 20 times this (their tokens "
                          "take seconds to minutes)."),
        click.option("--handshake-timeout", envvar=f"{env}HANDSHAKE_TIMEOUT_SECS", default=10.0, show_default=True,
                     show_envvar=True, help="Seconds from connect to the first message."),
        click.option("--idle-timeout", envvar=f"{env}IDLE_TIMEOUT_SECS", default=300.0, show_default=True,
                     show_envvar=True,
                     help="Seconds a session may wait for the client (a frame trickled in counts as waiting)."),
        click.option("--send-timeout", envvar=f"{env}SEND_TIMEOUT_SECS", default=60.0, show_default=True,
                     show_envvar=True,
                     help="Seconds one reply may take to leave: a client that stops reading is cut off."),
        click.option("--compute-slots", envvar=f"{env}COMPUTE_SLOTS", default=1, show_default=True,
                     show_envvar=True, type=click.IntRange(1, 64),
                     help="Products run at once across all sessions, in worker threads."),
        click.option("--session-memory-mb", envvar=f"{env}SESSION_MEMORY_MB", default=1024, show_default=True,
                     show_envvar=True, type=click.IntRange(1), help="Working memory one request of a session may need."),
        click.option("--max-seq-len", envvar=f"{env}MAX_SEQ_LEN", default=8192, show_default=True, show_envvar=True),
        click.option("--max-frame-bytes", envvar=f"{env}MAX_FRAME_BYTES", default=frames.Limits.max_frame_bytes,
                     show_default=True, show_envvar=True),
        click.option("--device", envvar=f"{env}DEVICE", default="cpu", show_default=True, show_envvar=True,
                     help="torch device for the linear work (cpu, cuda, cuda:1)."),
        click.option("--threads", envvar=f"{env}THREADS", type=int, show_envvar=True,
                     help="torch CPU threads (default: torch's choice)."),
        click.option("-v", "--verbose", is_flag=True, help="Log each connection to stderr."),
    ]

    def decorate(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return decorate


def _server_config(kw: dict, cert_home: str, **extra) -> tuple[server_mod.ServerConfig, object, str]:
    """(config, TLS context, certificate fingerprint) from listener_options' values (taken out of ``kw``)."""
    logging.basicConfig(level=logging.INFO if kw.pop("verbose") else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    cert, key = _server_cert(kw.pop("cert"), kw.pop("key"), cert_home)
    ctx = tls.server_context(cert, key, kw.pop("client_ca"))
    threads = kw.pop("threads")
    if threads:
        torch_threads(threads)
    limits = frames.Limits(max_frame_bytes=kw.pop("max_frame_bytes"))
    return server_mod.ServerConfig(**kw, limits=limits, **extra), ctx, tls.fingerprint_of(cert)


def _serve_forever(server, fp: str, as_json: bool, event: dict, human: str = "") -> None:
    """Listen, print the listening event (the address and the fingerprint to pin), serve until
    interrupted; once the preloaded protocols are built, print the ready event."""
    host, port = server.config.host, server.config.port

    def ready(preloader):
        done = {n: s for n, s in preloader.state.items()}
        _emit({"event": "ready", "seconds": preloader.seconds, "protocols": done}, as_json,
              human=f"ready after {preloader.seconds:.1f} s" + "".join(
                  f"\n  {n}: {_preload_line(s)}" for n, s in done.items()))
        sys.stdout.flush()

    async def main():
        try:  # bound before any nursery, so a taken port is one OSError, not an exception group
            listeners = await server.listen()
        except OSError as exc:
            raise Failure(f"cannot listen on {host}:{port}: {exc.strerror or exc}", "listen") from None
        def listening(bound: int) -> None:  # before the preload starts: the ready line always comes second
            full = {"event": "listening", "host": host, "port": bound, "fingerprint": fp,
                    "protocols": sorted(server.offered), "mutual_tls": server.ssl_context.verify_mode != ssl.CERT_NONE, **event}
            _emit(full, as_json, human=f"shardlm {__version__}{' dealer' if full['role'] == 'dealer' else ''} listening on {host}:{bound}"
                                       f"\nTLS fingerprint: {fp}\nprotocols: {', '.join(full['protocols'])}" + human)
            sys.stdout.flush()

        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(server.serve, listeners, on_listening=listening, on_ready=ready))

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass


@cli.command()
@listener_options("SHARDLM_", 9090, "certs")
@click.option("--record-transcript", envvar="SHARDLM_RECORD_TRANSCRIPT", show_envvar=True,
              type=click.Path(file_okay=False), help="Record every received frame, per session, to this directory.")
@click.option("-m", "--model", "model_spec", envvar="SHARDLM_MODEL", show_envvar=True,
              help="Model to serve: 'smollm2' or a path (HF directory or .gguf). Without it only the "
                   "model-free protocols (echo, ot) are offered.")
@click.option("--cc-provider", type=click.Choice(["software", "nvidia"]), default="software", show_default=True,
              envvar="SHARDLM_CC_PROVIDER", show_envvar=True,
              help="v3-cc attestation provider. software: a simulated TEE (protects against network observers and "
                   "unattested servers, not against the server's operator); nvidia: GPU CC mode, refused where absent.")
@click.option("--cc-key", envvar="SHARDLM_CC_KEY", show_envvar=True, type=click.Path(dir_okay=False),
              help="Ed25519 seed file of the software provider (default: $SHARDLM_HOME/cc/software-ed25519.key).")
@click.option("--preload", envvar="SHARDLM_PRELOAD", show_envvar=True,
              help="Protocols whose ring matrices and kernels are built at start-up (while connections are "
                   "already accepted; health says loading until done): a comma list, 'all' or 'none'. "
                   "Default: v3 (what clients run by default; v2 shares its matrices, v3-2r's composed "
                   "ones add ~1.2x the model's weights, so it builds on its first session).")
@click.option("--no-cache", is_flag=True, envvar="SHARDLM_NO_CACHE", show_envvar=True,
              help="Do not read or write the ring-matrix cache ($SHARDLM_HOME/ring-cache).")
@click.option("--tp", type=click.IntRange(1, 64), default=1, show_default=True, envvar="SHARDLM_TP", show_envvar=True,
              help="Tensor parallelism: shard every v2/v3/v3-2r unit's weights by output rows across this many "
                   "ranks (torch.distributed: gloo on CPU, NCCL on CUDA). Rank 0 serves the sessions; on one host "
                   "it starts the other ranks itself; under torchrun (RANK/WORLD_SIZE set) each launched process is "
                   "one rank (README: several hosts). Other protocols run on rank 0 alone with full weights.")
@click.option("--tp-timeout", type=click.FloatRange(1.0), default=60.0, show_default=True,
              envvar="SHARDLM_TP_TIMEOUT_SECS", show_envvar=True,
              help="Seconds a tensor-parallel operation may take before the rank group counts as failed (then "
                   "every product is refused with an error until the server is restarted).")
@click.option("--batch-window-ms", envvar="SHARDLM_BATCH_WINDOW_MS", show_envvar=True, show_default=True,
              type=click.FloatRange(min=0), default=server_mod.DEFAULT_WINDOW * 1e3,
              help="Cross-session batching of the masked protocols' products (v2, v3, v3-2r): a product waits at "
                   "most this long for other sessions' rows of the same matrix, then runs once over all of them "
                   "(exact: each session's rows are bit for bit what it would get alone). It goes at once when "
                   "no other session could join, so a lone session does not wait. 0 turns batching off.")
@click.option("--batch-rows", envvar="SHARDLM_BATCH_ROWS", show_envvar=True, show_default=True,
              type=click.IntRange(min=1), default=server_mod.DEFAULT_MAX_ROWS,
              help="Rows in one batched product at most (a full batch goes at once).")
@_json_option
@_reports_errors
def serve(record_transcript, model_spec, cc_provider, cc_key, preload, no_cache, tp, tp_timeout, batch_window_ms,
          batch_rows, as_json, **listener):
    """Run a server until interrupted.

    Prints the address and the certificate fingerprint clients must pin (with --json, one JSON
    line when listening), builds the --preload protocols' ring matrices while it already
    accepts connections (`health` says loading, then ready), and prints a ready line (with
    --json, a {"event": "ready"} line) when they are built. A server never deals mask material
    (that is `shardlm dealer`, a different party).
    """
    from .models.fetch import shardlm_home
    from .party import preload as preload_mod

    if tp > 1 and not model_spec:
        raise Failure("--tp shards a model's weights: give --model", "usage")
    if tp > 1 and int(os.environ.get("RANK", "0")) != 0:  # a worker rank: no sessions, no TLS
        _tp_worker(model_spec, tp, tp_timeout, listener)
        return
    threads = listener.get("threads")
    cache = None if no_cache else str(shardlm_home() / "ring-cache")
    config, ctx, fp = _server_config(listener, "certs", record_dir=record_transcript, cc_provider=cc_provider,
                                     cc_key=cc_key, matrix_cache=cache, batch_window=batch_window_ms / 1e3,
                                     batch_rows=batch_rows)
    kernels = _kernel_check(config.device)
    model = load_model_for_cli(model_spec, config.device, tokenizer=False) if model_spec else None
    if model is not None and model.client_only:
        raise Failure(f"{model_spec} is an export-client directory (no linear weight matrices): a server needs the "
                      f"full model", "model")
    offered = registry.offered(model is not None)
    try:
        names = preload_mod.choose(preload, offered, DEFAULT_PRELOAD)
    except ValueError as exc:
        raise Failure(str(exc), "usage") from None
    coordinator = _tp_rank0(model, model_spec, tp, tp_timeout, config.device, threads) if tp > 1 else None
    try:
        _serve_model(config, ctx, fp, model, offered, names, coordinator, kernels, as_json)
    finally:
        if coordinator is not None:
            coordinator.close()


def _serve_model(config, ctx, fp, model, offered, names, coordinator, kernels, as_json) -> None:
    server = server_mod.Server(config, ctx, model, protocols=offered, preload=names, tp=coordinator,
                               kernels=kernels)
    cc = None
    if "v3-cc" in server.offered:  # its provider's key and measurement, printed for clients to pin
        from .protocols.cc import service as cc_service
        from .protocols.cc.provider import ProviderUnavailable

        try:
            cc = cc_service.server_cc(server).describe()
        except ProviderUnavailable as exc:  # e.g. --cc-provider nvidia without a GPU in CC mode
            raise Failure(str(exc), "cc_provider") from None
    event = {"role": "server", "model": model.name if model else None, "model_fingerprint": server.fingerprint,
             "kernels": {**kernels["kernels"], "self_check": "exact"}}
    if cc:
        event["cc"] = {k: cc[k] for k in ("provider", "simulated", "note", "key_fingerprint", "measurement")}
    if coordinator is not None:
        event["tp"] = {k: coordinator.describe()[k] for k in ("size", "backend", "worker_pids", "sharded_protocols")}
    _serve_forever(server, fp, as_json, event, "\n" + "\n".join(cc_service.describe_lines(cc)) if cc else "")


def _tp_device(device: str) -> str:
    """Under torchrun on a multi-GPU host each rank takes its own GPU (LOCAL_RANK)."""
    return f"cuda:{os.environ['LOCAL_RANK']}" if device == "cuda" and "LOCAL_RANK" in os.environ else device


def _tp_worker(model_spec: str, size: int, timeout: float, listener: dict) -> None:
    """A rank other than 0 (started by rank 0, or by torchrun): load the model, join the group,
    answer rank 0's operations until it stops (protocols/tp.run_worker)."""
    from .protocols import tp as tp_mod

    logging.basicConfig(level=logging.INFO if listener.get("verbose") else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    if listener.get("threads"):
        torch_threads(listener["threads"])
    _tp_check_world(size)
    device = _tp_device(listener["device"])
    model = load_model_for_cli(model_spec, device, tokenizer=False)
    try:
        group = tp_mod.Group(model, device, size, int(os.environ["RANK"]), timeout)
    except ValueError as exc:
        raise Failure(str(exc), "model") from None
    tp_mod.run_worker(group)


def _tp_check_world(size: int) -> None:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) != size:
        raise Failure(f"--tp {size} but the launcher started WORLD_SIZE={os.environ['WORLD_SIZE']} ranks", "usage")


def _tp_rank0(model, model_spec: str, size: int, timeout: float, device: str, threads):
    """Rank 0: start ranks 1..size-1 on this host (unless torchrun started them), join the group
    (waiting for their model loads; a rank that exits meanwhile is reported), check that every
    rank holds this model; returns the coordinator the masked handlers multiply through."""
    import threading

    from .protocols import tp as tp_mod

    _tp_check_world(size)
    workers, store = [], None
    if "RANK" not in os.environ:  # one host: the same command, once per rank, with torchrun's variables
        argv = [sys.executable, "-m", "shardlm.cli", "serve", "-m", model_spec, "--tp", str(size),
                "--tp-timeout", str(timeout), "--device", device, *(["--threads", str(threads)] if threads else [])]
        store, workers = tp_mod.spawn_workers(size, argv)
    made: list = []

    def join():
        try:
            made.append(tp_mod.Group(model, _tp_device(device), size, 0, timeout, store))
        except Exception as exc:  # reported by the waiting thread below
            made.append(exc)
    t = threading.Thread(target=join, name="tp-join", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)
        gone = [(r + 1, p.returncode) for r, p in enumerate(workers) if p.poll() is not None]
        if gone:
            for p in workers:
                p.kill()
            raise Failure("tensor-parallel rank " + ", ".join(f"{r} exited with status {c}" for r, c in gone)
                          + " before joining the group (its error is above)", "model")
    if isinstance(made[0], Exception):
        for p in workers:
            p.kill()
        raise Failure(f"tensor parallelism: {made[0]}", "model")
    return tp_mod.Coordinator(made[0], workers)


def _kernel_check(device: str) -> dict:
    """The device self-check (protocols/ring.self_check): a server whose exact products are not
    exact on this device would return wrong products to every client, so it refuses to start."""
    from .protocols import ring

    report = ring.self_check(device)
    if not report["exact"]:
        raise Failure(f"the exact ring product is not exact on {device} (kernels {report['kernels']}): "
                      + "; ".join(report["failures"]) + ". Refusing to serve; set SHARDLM_INT8_KERNEL=float64 "
                      "to use the float64 limbs for every product", "device")
    return report


# What `serve` preloads by default: v3 is generate's and chat's default protocol. Not 'all': v2
# shares v3's matrices, but v3-2r's composed ones add ~1.2x the model's weights (~7 bytes per
# weight each: protocols/ring.RingMatrix), so preloading protocols nobody asks for would still
# grow the server's memory; they build (or load from the cache) on their first session.
DEFAULT_PRELOAD = ("v3",)


def _preload_line(s: dict) -> str:
    if s.get("status") == "failed":
        return f"failed: {s.get('error')}"
    if not s.get("total"):
        return "nothing to build"
    shared = s["total"] - s.get("loaded", 0) - s.get("built", 0)
    how = (f"{s.get('loaded', 0)} loaded from cache, {s.get('built', 0)} built"
           + (f", {s['rejected']} invalid cache files rebuilt" if s.get("rejected") else "")) if s.get("cache") \
        else f"{s.get('built', 0)} built (no cache)"
    how += f", {shared} shared with a protocol built before" if shared > 0 else ""
    return f"{s['total']} units ready in {s.get('seconds', 0):.1f} s ({how})"


COLLUSION = ("The dealer and the server must not collude: the dealer knows every mask r it deals, so a dealer "
             "that also sees the server's view (x - r) unmasks everything, the prompt included. Run it as a "
             "different party from the server, with its own certificate.")


@cli.command(help=f"""Deal mask material for v2/v3/v3-2r clients (`--offline dealer`) until interrupted.

For each request it draws fresh masks r (CSPRNG) and returns their seeds with the exact products
W r, so a client runs the private protocols without the weight matrices or the model's FLOPs.
Every take is single-use (a replayed request is refused) and counted against the session's
capacity (--max-seq-len rows per unit). Prints the address and the certificate fingerprint
clients pin (with --json, one JSON line when listening).

{COLLUSION}
""")
@listener_options("SHARDLM_DEALER_", 9091, "dealer-certs")
@click.option("-m", "--model", "model_spec", envvar="SHARDLM_MODEL", show_envvar=True, required=True,
              help="The model the clients and their server use: 'smollm2' or a path (HF directory or .gguf).")
@_json_option
@_reports_errors
def dealer(model_spec, as_json, **listener):
    config, ctx, fp = _server_config(listener, "dealer-certs")
    model = load_model_for_cli(model_spec, config.device, tokenizer=False)
    if model.client_only:
        raise Failure(f"{model_spec} is an export-client directory (no linear weight matrices): a dealer computes "
                      f"W r and needs the full model", "model")
    server = server_mod.Server(config, ctx, model, protocols=registry.dealing())
    _serve_forever(server, fp, as_json, {"role": "dealer", "model": model.name, "model_fingerprint": server.fingerprint,
                                         "warning": COLLUSION}, f"\nwarning: {COLLUSION}")


def _parsed(parse, value, hint: str):
    """``parse(value)``, its ValueError (or a usage ClientError) shown as bad usage of ``hint``."""
    try:
        return parse(value)
    except (ValueError, client_mod.ClientError) as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


@cli.command("netsim-proxy")
@click.option("--listen", required=True, help="HOST:PORT to accept connections on (port 0 picks a free one).")
@click.option("--target", required=True, help="HOST:PORT to forward each connection to (e.g. a shardlm server).")
@click.option("--rtt", default="0ms", show_default=True,
              help="Round-trip time added: half on each direction (20ms, 0.1s).")
@click.option("--bw", help="Bandwidth of each direction (100mbit, 1gbit); unlimited if omitted.")
@click.option("--jitter", default="0ms", show_default=True,
              help="Each one-way delay varies uniformly by up to this much either way (never reordering).")
@click.option("--loss-reset", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Probability that a connection is reset (RST both ways) at a random point: chaos tests.")
@click.option("--reset-within", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Bytes: a doomed connection is reset after a log-uniform count in [1, this] (or at its close).")
@click.option("--seed", type=int, help="Seed of the jitter and the resets (default: a fresh one).")
@click.option("-v", "--verbose", is_flag=True, help="Report each connection on stderr when it ends.")
@_json_option
@_reports_errors
def netsim_proxy(listen, target, rtt, bw, jitter, loss_reset, reset_within, seed, verbose, as_json):
    """Forward TCP connections to --target through a simulated WAN, until interrupted.

    Each direction is delayed by rtt/2 and rate-limited to --bw independently, in order, so
    an unmodified client and server talk as over a slow link; TLS passes through untouched
    (the client's certificate pin still holds). Prints a listening line, and on exit
    (Ctrl-C, SIGTERM) the bytes each way and the mean delay applied.
    """
    import signal

    from .party import proxy as proxy_mod

    spec = netsim.NetSpec(rtt=_parsed(netsim.parse_duration, rtt, "--rtt"),
                          bandwidth=_parsed(netsim.parse_rate, bw, "--bw") if bw else float("inf"),
                          jitter=_parsed(netsim.parse_duration, jitter, "--jitter"))
    config = proxy_mod.ProxyConfig(
        listen=_parsed(lambda a: client_mod.parse_address(a, any_port=True), listen, "--listen"),
        target=_parsed(client_mod.parse_address, target, "--target"),
        spec=spec, loss_reset=loss_reset, reset_within=reset_within, seed=seed)

    def connection_ended(report: dict) -> None:
        if verbose:
            line = json.dumps(report) if as_json else (
                f"connection {report['number']} from {report['peer']} {report['ended']}: "
                f"up {report['up']['bytes']} B (mean delay {report['up']['mean_delay_ms']:.2f} ms), "
                f"down {report['down']['bytes']} B (mean delay {report['down']['mean_delay_ms']:.2f} ms)")
            click.echo(line, err=True)

    proxy = proxy_mod.Proxy(config, connection_ended)

    async def main():
        try:
            listeners = await proxy.listen()
        except OSError as exc:
            raise Failure(f"cannot listen on {listen}: {exc.strerror or exc}", "listen") from None
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(proxy.serve, listeners)
                host = config.listen[0]
                _emit({"event": "listening", "host": host, "port": port, **proxy.config.describe()}, as_json,
                      human=f"netsim-proxy listening on {host}:{port} -> {target} ({spec.describe()})")
                sys.stdout.flush()
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    report = proxy.report()
    up, down = report["up"], report["down"]
    _emit(report, as_json, human=f"{report['connections']} connections ({report['resets']} reset): "
                                 f"up {up['bytes']} B, mean delay {up['mean_delay_ms']:.2f} ms; "
                                 f"down {down['bytes']} B, mean delay {down['mean_delay_ms']:.2f} ms")


# -- health / info -----------------------------------------------------------------------------
@cli.command()
@client_options
@_json_option
@_reports_errors
def health(client_config, as_json):
    """Check that a server is up and reachable over authenticated TLS."""
    cfg = client_config()
    result = _run_client(cfg, lambda conn: conn.health())
    lines = [f"{cfg.server}: {result['status']} (up {result['uptime_secs']:.0f} s, "
             f"{result['active_sessions']} active sessions)"]
    if "loading" in result:
        p = result["loading"]
        lines.append(f"  loading: {p['done']}/{p['total'] if p['total'] is not None else '?'} units, "
                     f"{p['protocols_ready']}/{p['protocols']} protocols ready")
    if "tp" in result:
        lines.append(f"  tensor parallel: {result['tp']['size']} ranks, {result['tp']['status']}")
    for name, s in result.get("protocols", {}).items():
        if "matrices" in s:
            lines.append(f"  {name}: {s['status']}, matrices built {s['matrices']['built']}/{s['matrices']['total']}")
    _emit(result, as_json, human="\n".join(lines))


@cli.command()
@click.option("--attest", is_flag=True,
              help="Ask for a v3-cc attestation report signed over a fresh nonce and check it (against --cc-trust "
                   "when given; otherwise only against the key the server advertises).")
@click.option("--cc-trust", envvar="SHARDLM_CC_TRUST", show_envvar=True,
              help="Pinned v3-cc signing key: sha256:<fingerprint> or ed25519:<hex>, or a file holding one.")
@client_options
@_json_option
@_reports_errors
def info(attest, cc_trust, client_config, as_json):
    """Show the server's version, protocols, model, device and limits, and the v3-cc provider,
    its signing key and measurement (with --attest: a fresh signed report, checked)."""
    cfg = client_config()
    if attest:
        from .protocols.cc import attestation, service as cc_service

        pin = attestation.parse_trust(cc_trust) if cc_trust else None
        result = _run_client(cfg, lambda conn: cc_service.attested_info(conn.channel, pin))
    else:
        result = _run_client(cfg, lambda conn: conn.info())
    lines = [f"shardlm {result['version']} (protocol v{result['protocol_version']}) on {result['device']}",
             f"model: {result['model'] or 'none'} {result['model_fingerprint']}", "protocols:"]
    for name, p in result["protocols"].items():
        label = "no inference" if p["private"] is None else "private" if p["private"] else "NOT PRIVATE"
        lines.append(f"  {name:8s} {label}: {p['summary']}")
        if "matrices" in p:
            lines.append(f"           matrices built: {p['matrices']['built']}/{p['matrices']['total']}"
                         + (f" (preload: {p['preload']['status']})" if "preload" in p else ""))
        if p.get("memory", {}).get("bytes"):
            m = p["memory"]
            lines.append(f"           resident: {m['bytes'] / 2**20:.1f} MiB, {m['bytes_per_weight']} bytes per weight "
                         f"({m['bytes_per_model_weight']} per model weight; shared ones count in each protocol)")
    if "kernels" in result:
        k = result["kernels"]
        lines.append(f"kernels: decode {k['kernels']['decode']}, prefill {k['kernels']['prefill']} (above "
                     f"{k['kernels']['int8_max_rows']} rows); start-up self-check "
                     f"{'exact' if k['exact'] else 'FAILED'} on {k['products_checked']} worst-case products")
    lines.append("limits: " + ", ".join(f"{k}={v}" for k, v in result["limits"].items()))
    if "tp" in result:
        t = result["tp"]
        lines.append(f"tensor parallel: {t['size']} ranks ({t['backend']}), {t['status']}; sharded: "
                     f"{', '.join(t['sharded_protocols'])} (others on rank 0 alone)")
        for variant, ranks in t["shards"].items():
            for r in ranks:
                mats = [m for blocks in r["units"].values() for m in blocks]
                lines.append(f"  {variant} rank {r['rank']}: {len(r['units'])} units, {sum(m[0] for m in mats):,} "
                             f"output rows, {sum(m[2] for m in mats):,} resident bytes")
    cc = result["protocols"].get("v3-cc", {}).get("cc")
    if cc:
        from .protocols.cc import service as cc_service

        lines += cc_service.describe_lines(cc)
        if cc.get("verified"):
            lines.append(f"  attestation report over a fresh nonce verified: {', '.join(cc['verified']['checks'])}")
    _emit(result, as_json, human="\n".join(lines))


# -- models and generation ---------------------------------------------------------------------
def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def load_model_for_cli(spec: str, device: str = "cpu", *, tokenizer: bool = True):
    """Load ``smollm2`` (fetched on first use, with progress) or a path; errors name the problem.
    A client needs the model's tokenizer (``tokenizer``); a server does not."""
    from .models.config import ModelError
    from .models.load import load_model

    try:
        model = load_model(spec, device=device)
    except (ModelError, FileNotFoundError) as exc:
        raise Failure(f"cannot load model {spec!r}: {exc}", "model") from None
    if tokenizer and model.tokenizer is None:
        raise Failure(f"{model.name} has no tokenizer", "model")
    return model


def _sampling(temperature, top_k, top_p, seed):
    from .models.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p, seed=seed)


def _check_prompt(model, ids: list[int], max_tokens: int, what: str = "the prompt") -> None:
    """Refuse before any work a prompt that is empty or does not fit the model's context."""
    if not ids:
        raise click.BadParameter(f"{what} is empty", param_hint="--prompt")
    need, limit = len(ids) + max_tokens, model.config.max_positions
    if need > limit:
        raise click.UsageError(f"{what} ({len(ids)} tokens) + --max-tokens {max_tokens} = {need} positions exceeds "
                               f"{model.name}'s context of {limit}; shorten it or lower --max-tokens")


def _say_chunks(prompt_tokens: int, as_json: bool) -> None:
    from .party.generation import PREFILL_CHUNK, prefill_chunks

    if prompt_tokens > PREFILL_CHUNK and not as_json:
        click.echo(f"note: a {prompt_tokens}-token prompt is prefilled in {len(prefill_chunks(prompt_tokens))} "
                   f"chunks of {PREFILL_CHUNK} positions; each chunk reports progress and the time left", err=True)


def _warn_if_not_private(specs) -> None:
    """Once per command, before any session: what a non-private protocol exposes (stderr, so
    --json output stays one object; the object carries it too)."""
    for s in specs:
        if not s.private:
            click.echo(f"warning: --protocol {s.name} is {s.warning}", err=True)


def _progress_printer(enabled: bool):
    """``progress(text, last)`` for a run's long phases (offline material, prefill, ...)."""
    from .models.progress import ProgressLine

    return ProgressLine() if enabled else None


def _auto_chooser(model, options: dict):
    """``--protocol auto``: run_generation's ``choose(link)`` (protocols/auto)."""
    from .protocols import auto

    def choose(link: dict):
        choice, cands = auto.choose(model, link["rtt"], link["bandwidth"], lens=auto.draft_lens(options))
        return registry.get(choice.protocol), auto.options_for(choice, options), auto.report(choice, cands, link)
    return choose


def _generate_remote(cfg, model, spec, prompt_ids, max_tokens, sampling, *, stream: bool, options: dict,
                     pad_to_max: bool = False, auto: bool = False):
    from .party.run import run_generation
    from .protocols.preprocess import MaterialError

    decoder = model.tokenizer.stream() if stream else None
    progress = _progress_printer(stream)

    def on_token(t: int) -> None:
        progress.clear()
        click.echo(decoder.push(t), nl=False)
        sys.stdout.flush()

    async def main():
        with trio.fail_after(cfg.timeout * (max_tokens + 10)):
            return await run_generation(cfg, model, spec, prompt_ids, max_tokens, sampling,
                                        on_token=on_token if stream else None,
                                        progress=progress, options=options, pad_to_max=pad_to_max,
                                        choose=_auto_chooser(model, options) if auto else None)

    try:
        report = trio.run(main)
    except trio.TooSlowError:
        raise Failure(f"generation did not finish in time (--timeout {cfg.timeout:g} s per step)", "timeout") from None
    except MaterialError as exc:
        raise Failure(str(exc), "material") from None
    if stream:
        click.echo(decoder.flush())
    return report


# -- protocol options: one flag per option the protocols declare (protocols/registry) ----------
def _click_option(opt):
    if opt.choices:
        kind = click.Choice(list(opt.choices))
    elif opt.kind is int:
        kind = click.IntRange(None if opt.lo is None else int(opt.lo), None if opt.hi is None else int(opt.hi))
    elif opt.kind is float:
        kind = click.FloatRange(opt.lo, opt.hi)
    else:
        kind = opt.kind
    takers = ", ".join(spec.takers(registry.SPECS, opt.name))
    if opt.kind is bool:
        return click.option(opt.cli_flag, opt.name, is_flag=True, default=opt.default, envvar=opt.env,
                            show_envvar=opt.env is not None, help=f"{takers}: {opt.help}")
    return click.option(opt.cli_flag, opt.name, type=kind, default=opt.default, envvar=opt.env,
                        show_envvar=opt.env is not None, show_default=opt.default is not None,
                        help=f"{takers}: {opt.help}")


def protocol_options(*, exclude: tuple[str, ...] = ()):
    """Add a flag for every declared protocol option (but ``exclude``) and hand the command
    ``protocol_options``: the options given on the command line or in the environment, by name.
    Which of them the chosen protocol takes is checked by :func:`_options_for`."""
    declared = [o for o in registry.options() if o.name not in exclude]

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            ctx = click.get_current_context()
            given = {}
            for o in declared:
                value = kwargs.pop(o.name)
                source = ctx.get_parameter_source(o.name)
                if source in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT):
                    given[o.name] = (value, source == click.core.ParameterSource.COMMANDLINE)
            return fn(*args, protocol_options=given, **kwargs)

        for o in reversed(declared):
            wrapper = _click_option(o)(wrapper)
        return wrapper
    return decorate


def _options_for(specs, given: dict) -> list[dict]:
    """Per spec, the given options it declares. An option typed on the command line that none of
    ``specs`` takes is a usage error (exit 2) naming the protocols that do; one from the
    environment is ambient and applies only where it is declared."""
    names = {s.name for s in specs}
    for name, (_, typed) in given.items():
        if typed and not any(s.declared(name) for s in specs):
            opt = next(o for o in registry.options() if o.name == name)
            raise click.UsageError(f"{opt.cli_flag} is not an option of {', '.join(sorted(names))}; it applies to "
                                   f"{', '.join(spec.takers(registry.SPECS, name))}")
    return [{n: v for n, (v, _) in given.items() if s.declared(n)} for s in specs]


def _protocol_spec(name: str):
    """The spec of ``--protocol NAME``; for ``auto``, v3's (v3 and v3-2r take the same options,
    checked against it before connecting; the choice is made after measuring the link)."""
    try:
        return registry.generator("v3" if name == "auto" else name)
    except spec.OptionError as exc:
        raise click.BadParameter(str(exc), param_hint="--protocol") from None


def generation_options(*, exclude: tuple[str, ...] = ()):
    def decorate(fn):
        fn = protocol_options(exclude=exclude)(fn)
        opts = [
            click.option("-m", "--model", "model_spec", default="smollm2", show_default=True, envvar="SHARDLM_MODEL",
                         show_envvar=True, help="'smollm2' or a path; must be the same model the server holds."),
            click.option("--protocol", default="v3", show_default=True, envvar="SHARDLM_PROTOCOL", show_envvar=True,
                         help="plain (insecure baseline), v2, v3, v3-2r (v3 in 2 rounds per layer: for slow "
                              "links), v3-mpc, v3-ot, v3-cc, split (NOT private: layer split), or auto (v3 or "
                              "v3-2r and a draft length, chosen from the link's RTT and bandwidth measured before "
                              "the session; --json's 'auto' says what and why)."),
            click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(min=1),
                         help="Tokens to generate at most."),
            click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
                         help="0 is greedy."),
            click.option("--top-k", type=click.IntRange(min=0), help="Sample from the k most likely tokens."),
            click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), help="Nucleus sampling threshold."),
            click.option("--seed", type=int, help="Seed of the client's sampling RNG (not of any mask)."),
            click.option("--system", help="System message for the chat template."),
            click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template."),
            click.option("--threads", type=int, envvar="SHARDLM_THREADS", show_envvar=True, help="torch CPU threads."),
            click.option("--pad-to-max", is_flag=True,
                         help="After the stop token, run dummy decode steps up to --max-tokens, so the server "
                              "cannot tell where the completion ended (costs those steps; the number of forwards "
                              "then reveals --max-tokens instead). With --draft: dummy forwards of K+1 rows up to "
                              "max-tokens - 1 forwards, hiding how many tokens the drafts won."),
        ]
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return decorate


@cli.command()
@click.option("-p", "--prompt", required=True, help="The prompt (stays on this machine).")
@generation_options()
@click.option("--local", is_flag=True, help="Run the plaintext reference in this process; no server.")
@click.option("--timing", is_flag=True, help="Print timings, bytes and rounds to stderr.")
@client_options
@_json_option
@_reports_errors
def generate(prompt, model_spec, protocol, max_tokens, temperature, top_k, top_p, seed, system, raw, threads,
             pad_to_max, protocol_options, local, timing, client_config, as_json):
    """Generate a completion, streaming tokens as they come.

    With --protocol v2/v3/v3-2r the server only ever sees one-time-padded ring elements; `plain`
    is the insecure baseline. --json prints one object (text, token_ids, timing, bytes, rounds,
    offline_ms) instead of streaming.
    """
    from .party.run import run_local

    proto = _protocol_spec(protocol)
    [options] = _options_for([proto], protocol_options)
    if not prompt:
        raise click.BadParameter("the prompt is empty", param_hint="--prompt")
    if threads:
        torch_threads(threads)
    model = load_model_for_cli(model_spec)
    ids = model.tokenizer.encode_prompt(prompt, system, not raw)
    _check_prompt(model, ids, max_tokens)
    sampling = _sampling(temperature, top_k, top_p, seed)
    if not local:
        _warn_if_not_private([proto])
        _say_chunks(len(ids), as_json)
    if local:
        decoder = model.tokenizer.stream()
        result = run_local(model, ids, max_tokens, sampling,
                           on_token=None if as_json else lambda t: click.echo(decoder.push(t), nl=False))
        if as_json:
            _emit(result, True)
            return
        click.echo(decoder.flush())
        if timing:
            click.echo(f"local reference: {len(result['token_ids'])} tokens in {result['timing']['total_ms']:.0f} ms",
                       err=True)
        return
    report = _generate_remote(client_config(), model, proto, ids, max_tokens, sampling, stream=not as_json,
                              options=options, pad_to_max=pad_to_max, auto=protocol == "auto")
    out = report.as_dict(model.tokenizer)
    if as_json:
        _emit(out, True)
    elif timing or out["notes"]:
        click.echo(summary(out), err=True)


@cli.command()
@generation_options(exclude=("material",))
@client_options
@_json_option
@_reports_errors
def chat(model_spec, protocol, max_tokens, temperature, top_k, top_p, seed, system, raw, threads,
         pad_to_max, protocol_options, client_config, as_json):
    """Interactive chat; reads one user turn per line from stdin when it is not a terminal.

    Each turn is a fresh private session over the whole conversation so far (the client keeps
    the history; the server keeps nothing between turns). Empty line or EOF ends the chat.
    """
    proto = _protocol_spec(protocol)
    [options] = _options_for([proto], protocol_options)
    if threads:
        torch_threads(threads)
    model = load_model_for_cli(model_spec)
    cfg = client_config()
    sampling = _sampling(temperature, top_k, top_p, seed)
    _warn_if_not_private([proto])
    history = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    turns = []
    while True:
        if interactive:
            line = click.prompt("you", default="", show_default=False)
        else:
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        ids = model.tokenizer.encode_chat(history)
        if len(ids) + max_tokens > model.config.max_positions:
            raise Failure(f"the conversation ({len(ids)} tokens) + --max-tokens {max_tokens} exceeds {model.name}'s "
                          f"context of {model.config.max_positions}; start a new chat", "model")
        if not as_json:
            click.echo("assistant: ", nl=False)
        report = _generate_remote(cfg, model, proto, ids, max_tokens, sampling, stream=not as_json, options=options,
                                  pad_to_max=pad_to_max, auto=protocol == "auto")
        out = report.as_dict(model.tokenizer)
        if not as_json and len(turns) == 0:
            for note in out["notes"]:
                click.echo(f"note: {note}", err=True)
        history.append({"role": "assistant", "content": out["text"]})
        turns.append({"user": line, "assistant": out["text"], "timing": out["timing"],
                      "bytes_sent": out["bytes_sent"], "bytes_received": out["bytes_received"],
                      "rounds": out["rounds"], "offline_ms": out["offline_ms"], "notes": out["notes"],
                      "verify": out["verify"], **({"verification": out["verification"]} if out["verify"] else {}),
                      **({"auto": out["auto"]} if "auto" in out else {})})
    if as_json:
        doc = {"protocol": protocol, "private": proto.private, "turns": turns}
        if not proto.private:
            doc["warning"] = proto.warning
        _emit(doc, True)


@cli.command()
@click.option("-m", "--model", "model_spec", default="smollm2", show_default=True, envvar="SHARDLM_MODEL",
              show_envvar=True)
@click.option("--protocol", type=click.Choice([s.name for s in registry.SPECS if s.declared("material")]),
              default="v3", show_default=True)
@click.option("--tokens", type=click.IntRange(min=2), required=True,
              help="Positions the material covers: prompt tokens + tokens to generate.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Store directory (holds secret mask seeds: keep it on the client).")
@click.option("--threads", type=int, envvar="SHARDLM_THREADS", show_envvar=True)
@_click_option(registry.OFFLINE)
@_click_option(registry.DEALER)
@_click_option(registry.DEALER_FINGERPRINT)
@client_options
@_json_option
@_reports_errors
def preprocess(model_spec, protocol, tokens, out_dir, threads, offline_mode, dealer, dealer_fingerprint,
               client_config, as_json):
    """The offline phase, ahead of time: single-use mask material for one generation of up to
    --tokens positions. Pass it to `generate --material`; a second use is refused.

    --offline client (default) computes the products here with the model's weights; --offline he
    has the server at --server compute them on masks encrypted under a key made here (the
    server learns nothing of the masks); --offline dealer fetches them from a `shardlm dealer`
    (which must not collude with the server)."""
    if Path(out_dir, "meta.json").exists():
        raise Failure(f"{out_dir} already holds material; use a new directory", "exists")
    if threads:
        torch_threads(threads)
    model = load_model_for_cli(model_spec)
    proto = registry.get(protocol)
    t0 = time.perf_counter()
    progress = _progress_printer(not as_json)
    costs = {}
    if offline_mode == "client":
        store = proto.hook("deal")(proto, model, tokens, progress=progress)
    else:
        store, costs = trio.run(functools.partial(
            proto.hook("deal_remote"), proto, model, tokens, offline_mode=offline_mode, client_config=client_config(),
            dealer=dealer, dealer_fingerprint=dealer_fingerprint, progress=progress))
    store.save(out_dir)
    ms = (time.perf_counter() - t0) * 1e3
    size = sum(f.stat().st_size for f in Path(out_dir).iterdir())
    result = {"store": out_dir, "protocol": protocol, "tokens": tokens, "units": len(store.meta["units"]),
              "offline_ms": ms, "bytes": size, "model_fingerprint": model.fingerprint(),
              "offline": {"mode": offline_mode, **costs}}
    _emit(result, as_json, human=f"wrote {size / 1e6:.1f} MB of mask material for {tokens} positions "
                                 f"({protocol}) to {out_dir} in {ms:.0f} ms")


@cli.command()
@click.option("-m", "--model", "model_spec", default="smollm2", show_default=True, envvar="SHARDLM_MODEL",
              show_envvar=True)
@click.option("--protocol", "protocols", default="plain,v2,v3", show_default=True,
              help="Comma-separated protocols, measured one after another in this run. An entry may set "
                   "protocol options for itself: NAME:OPTION=VALUE[:...], e.g. "
                   "plain,v3,v3-mpc,v3-mpc:triples=ot.")
@click.option("-p", "--prompt", default="Hello, how are you?", show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(min=1), help="Instead of --prompt: a raw prompt of exactly N tokens.")
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(min=1),
              help="Tokens generated per run (EOS ignored).")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0))
@click.option("--output", type=click.Path(dir_okay=False), help="Write the results JSON here.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw prefill and decode bars to this PNG.")
@click.option("--threads", type=int, envvar="SHARDLM_THREADS", show_envvar=True)
@click.option("--clients", help="Load test instead: N concurrent sessions (a comma list, e.g. 1,2,4,8: one load "
                                "test each), each running --runs generations back to back (or for --duration) and "
                                "checking every output against the reference. The sessions are trio tasks in this "
                                "process sharing one model, so their client work shares this process's CPU.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help="With --clients: run each session for this many seconds instead of --runs generations.")
@click.option("--server-pid", type=int, help="With --clients: the server's process id on this machine, to read its "
                                             "CPU seconds per served decode token and its RSS over time (/proc).")
@protocol_options(exclude=("material",))
@client_options
@_json_option
@_reports_errors
def bench(model_spec, protocols, prompt, prompt_tokens, max_tokens, runs, warmup, output, plot, threads, clients,
          duration, server_pid, protocol_options, client_config, as_json):
    """Benchmark protocols side by side against a running server (seed JSON format, extended
    with decode tokens/s, bytes, rounds, offline time and the ratio to plain). With --clients, a
    load test: aggregate decode tokens/s, per-token latency p50/p99, the server's CPU per decode
    token and RSS, and every session's outcome."""
    from .party import bench as bench_mod

    try:
        entries = [registry.parse_entry(p.strip()) for p in protocols.split(",") if p.strip()]
    except spec.OptionError as exc:
        raise click.BadParameter(str(exc), param_hint="--protocol") from None
    given = _options_for([s for _, s, _ in entries], protocol_options)
    _warn_if_not_private({s.name: s for _, s, _ in entries}.values())
    if threads:
        torch_threads(threads)
    model = load_model_for_cli(model_spec)
    if prompt_tokens:
        base = model.tokenizer.encode(BENCH_TEXT)
        ids = (base * (prompt_tokens // len(base) + 1))[:prompt_tokens]
    else:
        ids = model.tokenizer.encode_prompt(prompt)
    _check_prompt(model, ids, max_tokens)
    cfg = client_config()
    say = None if as_json else (lambda msg: click.echo(msg, err=True))
    if clients:
        _load_tests(cfg, model, entries, given, ids, max_tokens, runs, duration, server_pid, clients, output,
                    as_json)
        return
    results = []
    for (label, proto, options), defaults in zip(entries, given):
        r = trio.run(bench_mod.bench_protocol, cfg, model, proto, ids, max_tokens, runs, warmup,
                     _sampling(0.0, None, None, None), say, {**defaults, **options})
        r["version"] = label
        results.append(r)
    bench_mod.add_ratios(results)
    doc = {"benchmarks": results}
    if output:
        Path(output).write_text(json.dumps(doc, indent=2))
    if plot:
        bench_mod.plot(results, plot)
    _emit(doc, as_json, human=bench_mod.table(results))


def _load_tests(cfg, model, entries, given, ids, max_tokens, runs, duration, server_pid, clients: str, output,
                as_json) -> None:
    from .party import loadtest

    try:
        counts = [int(c) for c in clients.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"{clients!r} is not a comma list of positive integers", param_hint="--clients")
    reports = []
    for (label, proto, options), defaults in zip(entries, given):
        for n in counts:
            r = trio.run(functools.partial(loadtest.load_test, cfg, model, proto, ids, max_tokens, n, runs=runs,
                                           duration=duration, server_pid=server_pid, options={**defaults, **options}))
            r["version"] = label
            reports.append(r)
    doc = {"load_tests": reports}
    if output:
        Path(output).write_text(json.dumps(doc, indent=2))
    _emit(doc, as_json, human=loadtest.table(reports))
    if not all(r["all_correct"] for r in reports):
        raise Failure("a session's output differed from the reference or failed (see its outcome)", "failed")


BENCH_TEXT = ("The history of cryptography begins with simple substitution ciphers and leads, through "
              "mechanical rotor machines and the theory of information, to public-key methods that let "
              "strangers agree on secrets over open channels. ")


# -- audit -------------------------------------------------------------------------------------
@cli.command()
@click.option("--transcript", required=True, type=click.Path(exists=True, file_okay=False),
              help="A recorded session directory, or a `serve --record-transcript` directory (newest session).")
@click.option("-m", "--model", "model_spec", default="smollm2", show_default=True, envvar="SHARDLM_MODEL",
              show_envvar=True, help="The public model the server holds.")
@click.option("-p", "--prompt", help="The true prompt, to report the fraction recovered.")
@click.option("--system", help="System message the prompt was sent with.")
@click.option("--raw", is_flag=True, help="The prompt was sent without the chat template.")
@click.option("--max-candidates", type=int, help="Candidate tokens tried per position at most (default: all).")
@click.option("--threads", type=int, envvar="SHARDLM_THREADS", show_envvar=True)
@_json_option
@_reports_errors
def audit(transcript, model_spec, prompt, system, raw, max_candidates, threads, as_json):
    """Play the server: recover the prompt tokens from its recorded view, with the public model only.

    Works on `split` (NOT private: recovers the prompt) and on v2/v3 (recovers nothing better
    than chance). Prints the recovered text and, with --prompt, recovered_fraction.
    """
    from .protocols.audit import audit as run_audit

    if threads:
        torch_threads(threads)
    model = load_model_for_cli(model_spec)
    truth = model.tokenizer.encode_prompt(prompt, system, not raw) if prompt is not None else None

    from .models.progress import ProgressLine

    line = ProgressLine()
    out = run_audit(model, transcript, truth, max_candidates=max_candidates,
                    progress=None if as_json else lambda done, total: line(f"audit: position {done}/{total}",
                                                                          last=done == total))
    out.pop("candidates_per_position", None)
    lines = [f"session {out['session']} ({out['protocol']}, "
             f"{'private' if out['private'] else 'NOT PRIVATE'}): observed {out['observed']}",
             f"recovered {out['tokens']} tokens ({out['exact_matches']} exact) in {out['seconds']:.1f} s:",
             out.get("recovered_text", str(out["recovered_ids"]))]
    if truth is not None:
        lines.append(f"recovered_fraction {out['recovered_fraction']:.3f} (chance {out['chance_fraction']:.3f})")
    _emit(out, as_json, human="\n".join(lines))


# -- demo --------------------------------------------------------------------------------------
@cli.command()
@click.option("-m", "--model", "model_spec", default="smollm2", show_default=True, envvar="SHARDLM_MODEL",
              show_envvar=True, help="Model for both parties.")
@click.option("--protocol", default="v3", show_default=True, help="Protocol to demonstrate.")
@click.option("-p", "--prompt", default="Hello, how are you?", show_default=True)
@click.option("--max-tokens", default=24, show_default=True, type=click.IntRange(min=1))
@_json_option
@_reports_errors
def demo(model_spec, protocol, prompt, max_tokens, as_json):
    """Fetch the default model if needed, start a server on loopback with a fresh pinned
    certificate, and generate a reply privately (v3 by default).

    The server records what it received to a transcript directory, printed at the end.
    """
    from .party import launch

    proto = _protocol_spec(protocol)
    _warn_if_not_private([proto])
    model = load_model_for_cli(model_spec)
    transcript = Path(tempfile.mkdtemp(prefix="shardlm-demo-transcript-"))
    if not as_json:
        click.echo(f"starting a server on 127.0.0.1 with {model.name} and a fresh pinned certificate...", err=True)
    with launch.server(["--model", model_spec, "--record-transcript", str(transcript), "--threads", "1"]) as srv:
        # the demo pins the v3-cc key its own server printed
        cc_fp = srv.event.get("cc", {}).get("key_fingerprint")
        options = {"cc_trust": cc_fp} if proto.declared("cc_trust") else {}
        report = _generate_remote(srv.client_config(timeout=300), model, proto, model.tokenizer.encode_prompt(prompt),
                                  max_tokens, _sampling(0.0, None, None, None), stream=not as_json, options=options)
    out = report.as_dict(model.tokenizer)
    out.update(prompt=prompt, transcript=str(transcript), server=srv.event)
    _emit(out, as_json, human=summary(out))


from .models.commands import models  # noqa: E402

cli.add_command(models)


@models.command("export-client")
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option("-m", "--model", "model_spec", default="smollm2", show_default=True, envvar="SHARDLM_MODEL",
              show_envvar=True, help="The full model ('smollm2' or a path) whose client part to write.")
@click.option("--no-embedding", is_flag=True,
              help="Leave out the token embedding table as well; the client then needs --embedding ot.")
@_json_option
@_reports_errors
def export_client(out_dir, model_spec, no_embedding, as_json):
    """Write to DIR (new or empty) the part of a model a private client needs when it does not
    make its own mask material: config, tokenizer, norm gains, biases, learned positions, the
    token embedding table, the public encodings it decodes v2/v3/v3-2r products with, and the
    full model's fingerprint. No linear weight matrix (a tied LM head is kept only as the
    embedding table).

    Only useful with --offline he or --offline dealer, where the server (under HE) or a dealer
    computes the W r the client needs: pass DIR as the client's -m. Whatever needs the weights
    on the client is refused: --offline client, --verify, v3-mpc, split, --local. A server
    needs the full model.
    """
    from .protocols.export import export_client as export

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Failure(f"{out_dir} already holds files; use a new or empty directory", "exists")
    model = load_model_for_cli(model_spec)
    result = export(model, out, embedding=not no_embedding, progress=_progress_printer(not as_json))
    result["model"] = model.name
    what = "no linear weight matrices" + ("" if result["embedding"] else ", no embedding table")
    _emit(result, as_json, human=f"wrote {result['bytes'] / 1e6:.1f} MB to {out_dir}: the client part of "
                                 f"{model.name} ({what})\nmodel fingerprint: {result['model_fingerprint']}")


def main():
    """Run the CLI. Bad usage (click's checks and ours) exits 2, as JSON with --json; an
    unexpected exception is one line (code "internal") unless --debug or SHARDLM_DEBUG=1."""
    argv = sys.argv[1:]
    as_json = "--json" in argv
    debug = "--debug" in argv or os.environ.get("SHARDLM_DEBUG", "") not in ("", "0")
    try:
        code = cli.main(args=argv, prog_name="shardlm", standalone_mode=False)
    except click.UsageError as exc:
        if not as_json:
            exc.show()
            sys.exit(2)
        _fail(exc.format_message(), "usage", True)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", "internal", as_json)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
