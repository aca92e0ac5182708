"""What a new user meets (issue 23): warnings for non-private protocols, one-line errors with
codes from one table, bad usage refused before any work, progress fit for a log file, honest
accounting of preprocessed material, session logs, and a long prompt prefilled in chunks."""
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import build_tiny
from shardlm.cli import ERROR_CODES
from shardlm.models.load import load_model
from shardlm.models.reference import generate
from shardlm.models.sampling import SamplingParams
from shardlm.party import launch

SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


def shardlm(*args, stdin=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "shardlm.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def json_error(proc, code: str, status: int) -> dict:
    """The one-object JSON error of a failed --json command, with its code from the table."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    err = json.loads(proc.stdout)
    assert err["code"] == code and SNAKE.match(code) and code in ERROR_CODES, err
    assert "Traceback" not in proc.stderr
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama with a 512-position context (a prompt of two prefill chunks fits) and a
    server process for it at -v, its log in a file."""
    d = tmp_path_factory.mktemp("tiny")
    build_tiny("llama", d, seed=5, max_position_embeddings=512)
    log = d / "server.log"
    with open(log, "w") as err:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with launch.server(["--model", str(d), "--threads", "1", "-v", "--session-ttl", "1800"], env=env,
                           stderr=err) as srv:
            yield d, srv.client_args, log


# -- 1. non-private protocols say so, chat included -------------------------------------------
@pytest.mark.parametrize("how", ["flag", "env"])
def test_chat_warns_once_when_the_protocol_is_not_private(tiny, how):
    d, args, _ = tiny
    proto = ["--protocol", "plain"] if how == "flag" else []
    env = {"SHARDLM_PROTOCOL": "plain"} if how == "env" else None
    proc = shardlm("chat", *args, "-m", str(d), *proto, "--max-tokens", "2", stdin="Hi\nagain\n", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("NOT PRIVATE") == 1, proc.stderr
    out = json.loads(shardlm("chat", *args, "-m", str(d), *proto, "--max-tokens", "2", "--json", stdin="Hi\n",
                             env=env).stdout)
    assert out["private"] is False and out["warning"].startswith("NOT PRIVATE")
    private = json.loads(shardlm("chat", *args, "-m", str(d), "--protocol", "v3", "--max-tokens", "2", "--json",
                                 stdin="Hi\n").stdout)
    assert private["private"] is True and "warning" not in private


# -- 2, 3, 7. one-line errors, codes from one table, usage refused first --------------------------
@pytest.mark.parametrize("argv", [
    ["generate", "-p", "", "--raw", "--protocol", "v3"],
    ["generate", "-p", "hi", "--max-tokens", "0"],
    ["generate", "-p", "hi", "--max-tokens", "-3"],
    ["generate", "-p", "hi", "--protocol", "nosuch"],
    ["bench", "--max-tokens", "0"],
    ["bench", "--runs", "0"],
    ["bench", "--protocol", "plain,nosuch"],
])
def test_bad_usage_exits_2_with_a_json_error_before_any_work(tiny, argv):
    d, _, _ = tiny
    # an unreachable server: had any work started (a connection, an offline phase), the error
    # would be another one
    t0 = time.monotonic()
    proc = shardlm(*argv, "-s", "127.0.0.1:1", "--tls-fingerprint", "sha256:" + "0" * 64, "-m", str(d), "--json")
    json_error(proc, "usage", 2)
    assert "offline" not in proc.stderr and time.monotonic() - t0 < 60


def test_a_prompt_longer_than_the_context_is_refused_up_front(tiny):
    d, args, _ = tiny
    long = "word " * 700
    for extra in (["--local"], [*args, "--protocol", "v3"]):
        proc = shardlm("generate", *extra, "-m", str(d), "-p", long, "--raw", "--json")
        err = json_error(proc, "usage", 2)
        assert "exceeds" in err["error"] and "512" in err["error"]


def test_a_taken_port_is_one_line_not_an_exception_group(tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = shardlm("serve", "--port", str(port), "--json")
        err = json_error(proc, "listen", 1)
        assert "in use" in err["error"]
        human = shardlm("serve", "--port", str(port))
        assert human.returncode == 1 and human.stderr.count("\n") == 1 and human.stderr.startswith("error: ")


def test_pin_and_tls_errors_read_as_sentences(tiny):
    _, args, _ = tiny
    server = args[args.index("-s") + 1]
    err = json_error(shardlm("health", "-s", server, "--tls-fingerprint", "sha256:" + "0" * 64, "--json"),
                     "pin_mismatch", 1)
    assert "('" not in err["error"] and "does not match the pinned" in err["error"]
    # a peer that answers in plain HTTP, not TLS
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()

        def answer():
            conn, _ = s.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        threading.Thread(target=answer, daemon=True).start()
        proc = shardlm("health", "-s", f"127.0.0.1:{s.getsockname()[1]}", "--tls-fingerprint", "sha256:" + "0" * 64,
                       "--json")
    err = json_error(proc, "tls_failed", 1)
    assert "does not speak TLS" in err["error"]


def test_an_unexpected_error_is_one_line_unless_debug(tiny, monkeypatch, capsys):
    from shardlm import cli
    from shardlm.party import client

    def broken(cfg):
        raise RuntimeError("a bug")
    monkeypatch.setattr(client, "connect", broken)
    for argv, shown in ((["health", "-s", "127.0.0.1:9", "--json"], "json"), (["--debug", "health", "-s", "127.0.0.1:9"], "raise")):
        monkeypatch.setattr(sys, "argv", ["shardlm", *argv])
        if shown == "raise":
            with pytest.raises(RuntimeError, match="a bug"):
                cli.main()
            continue
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        assert exit_.value.code == 1
        err = json.loads(capsys.readouterr().out)
        assert err["code"] == "internal" and "RuntimeError: a bug" in err["error"] and "--debug" in err["error"]


def test_a_missing_transcript_file_is_a_failure_not_a_bug(tiny, tmp_path):
    d, _, _ = tiny
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "meta.json").write_text("{}")
    err = json_error(shardlm("audit", "--transcript", str(tmp_path / "x"), "-m", str(d), "--json"), "failed", 1)
    assert "frames.bin" in err["error"]


# -- 5, 6. progress in a log file, material accounting ---------------------------------------------
def test_progress_in_a_log_has_no_carriage_returns_and_material_runs_report_offline_0(tiny, tmp_path):
    d, args, _ = tiny
    proc = shardlm("generate", *args, "-m", str(d), "-p", "hello", "--max-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "offline: mask material 9/9 units" in proc.stderr
    store = tmp_path / "store"
    assert shardlm("preprocess", "-m", str(d), "--tokens", "40", "--out", str(store)).returncode == 0
    out = json.loads(shardlm("generate", *args, "-m", str(d), "-p", "hello", "--max-tokens", "3", "--material",
                             str(store), "--json").stdout)
    assert out["offline_ms"] == 0 and out["material_dealt_ms"] > 0


# -- 8. session logs, health and info -------------------------------------------------------------
def test_the_server_logs_each_session_and_health_does_not_count_itself(tiny):
    d, args, log = tiny
    assert shardlm("generate", *args, "-m", str(d), "-p", "hi", "--max-tokens", "2").returncode == 0
    net = shardlm("generate", *args, "-m", str(d), "-p", "hi", "--max-tokens", "2", "--net", "rtt=20ms")
    assert net.returncode == 0, net.stderr
    health = json.loads(shardlm("health", *args, "--json").stdout)
    assert health["active_sessions"] == 0 and health["connections"] == 1
    time.sleep(0.5)
    text = log.read_text()
    assert text.count("v3 session started") >= 2
    ended = [line for line in text.splitlines() if "v3 session ended" in line]
    assert len(ended) >= 2 and all("(bye)" in line and "bytes received" in line for line in ended), ended
    info = json.loads(shardlm("info", *args, "--json").stdout)
    assert info["protocols"]["echo"]["private"] is None and info["protocols"]["v3"]["private"] is True
    assert "no inference" in shardlm("info", *args).stdout
    assert "as protocols land" not in shardlm("--help").stdout


# -- 4. a long prompt runs in chunks ---------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["v3", "v3-2r", "plain"])
def test_a_prompt_of_several_chunks_equals_the_reference(tiny, protocol):
    d, args, _ = tiny
    prompt = "hello world, " * 60  # 480 tokens: two prefill chunks
    out = json.loads(shardlm("generate", *args, "-m", str(d), "-p", prompt, "--raw", "--protocol", protocol,
                             "--max-tokens", "6", "--json").stdout)
    model = load_model(str(d))
    ids = model.tokenizer.encode(prompt)
    assert out["prompt_tokens"] == len(ids) > 256
    assert out["token_ids"] == generate(model, ids, 6, SamplingParams())
    per_forward = {"v3": 4 * 2 + 1, "v3-2r": 2 * 2 + 2, "plain": 1}[protocol]
    assert out["prefill_rounds"] == 2 * per_forward


def test_a_long_prompts_material_is_dealt_chunk_by_chunk(tiny):
    """The offline phase deals the first chunk and the decode steps; the rest is dealt as the
    prefill reaches it, so the rows held at once follow the chunk, not the prompt."""
    import trio

    from shardlm.party.generation import PREFILL_CHUNK
    from shardlm.party.run import run_generation
    from shardlm.protocols import masked, registry

    d, args, _ = tiny
    model = load_model(str(d))
    ids = model.tokenizer.encode("hello world, " * 60)
    dealt = []
    real = masked.preprocess.deal

    def counting(units, rows, **kw):
        dealt.append(max(rows.values()))
        return real(units, rows, **kw)

    masked.preprocess.deal = counting
    try:
        cfg = launch.ClientConfig(server=args[1], fingerprint=args[3])
        rep = trio.run(lambda: run_generation(cfg, model, registry.get("v3"), ids, 4, SamplingParams()))
    finally:
        masked.preprocess.deal = real
    assert rep.result.token_ids == generate(model, ids, 4, SamplingParams())
    assert dealt == [PREFILL_CHUNK + 3, len(ids) - PREFILL_CHUNK], dealt
