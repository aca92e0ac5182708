"""The CLI as users run it: a server subprocess and client subprocesses over real TLS."""
import json
import os
import subprocess
import sys
import time

import pytest

from shardlm.party import launch


def shardlm(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "shardlm.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    cert = json.loads(shardlm("certs", "--out", str(d), "--json").stdout)
    with launch.server(["--max-seq-len", "4096"], cert_dir=d) as srv:
        yield srv.event, cert


def test_certs_prints_the_fingerprint_of_what_it_wrote(tmp_path):
    out = shardlm("certs", "--out", str(tmp_path)).stdout.splitlines()
    from shardlm.wire.tls import fingerprint_of
    assert out[-1] == fingerprint_of(tmp_path / "server.crt")
    again = shardlm("certs", "--out", str(tmp_path), "--json", check=False)
    assert again.returncode == 1 and json.loads(again.stdout)["code"] == "exists"


def test_health_and_info_from_a_client_process(server):
    event, cert = server
    addr = f"127.0.0.1:{event['port']}"
    health = json.loads(shardlm("health", "-s", addr, "--tls-fingerprint", cert["fingerprint"], "--json").stdout)
    assert health["status"] == "ready"
    # the same through environment variables, and the human output
    env = {"SHARDLM_SERVER": addr, "SHARDLM_TLS_FINGERPRINT": cert["fingerprint"]}
    info = json.loads(shardlm("info", "--json", env=env).stdout)
    assert info["limits"]["max_seq_len"] == 4096 and "echo" in info["protocols"]
    assert info["model_fingerprint"] == "none"
    human = shardlm("info", env=env).stdout
    assert "protocols:" in human and "echo" in human


def test_wrong_fingerprint_fails_with_a_json_error(server):
    event, _ = server
    proc = shardlm("health", "-s", f"127.0.0.1:{event['port']}", "--tls-fingerprint", "sha256:" + "00" * 32,
                   "--json", check=False)
    assert proc.returncode == 1
    err = json.loads(proc.stdout)
    assert "does not match the pinned" in err["error"]


def test_unreachable_server_and_bad_arguments_are_clear(tmp_path):
    proc = shardlm("health", "-s", "127.0.0.1:1", "--tls-fingerprint", "sha256:" + "00" * 32,
                   "--timeout", "2", check=False)
    assert proc.returncode == 1 and "cannot reach 127.0.0.1:1" in proc.stderr
    proc = shardlm("health", "-s", "127.0.0.1:9", "--net", "rtt=soon", check=False)
    assert proc.returncode == 2 and "rtt" in proc.stderr
    proc = shardlm("health", "-s", "127.0.0.1:9", check=False)
    assert proc.returncode == 1 and "--tls-fingerprint" in proc.stderr


def test_net_option_applies_latency(server):
    event, cert = server
    t0 = time.monotonic()
    out = shardlm("health", "-s", f"127.0.0.1:{event['port']}", "--tls-fingerprint", cert["fingerprint"],
                  "--net", "rtt=500ms", "--json")
    # at least the TLS 1.3 handshake's round trip plus the HEALTH request's
    assert time.monotonic() - t0 >= 1.0
    assert json.loads(out.stdout)["status"] == "ready"


def test_demo_generates_privately_and_matches_the_reference(smollm2):
    from shardlm.models.reference import generate
    from shardlm.models.sampling import SamplingParams

    out = json.loads(shardlm("demo", "--json", "--max-tokens", "8").stdout)
    assert out["protocol"] == "v3" and out["private"] is True
    prompt = smollm2.tokenizer.encode_chat([{"role": "user", "content": "Hello, how are you?"}])
    assert out["prompt_tokens"] == len(prompt)
    assert out["token_ids"] == generate(smollm2, prompt, 8, SamplingParams(), stop_ids=())
    assert out["text"] == smollm2.tokenizer.decode(out["token_ids"], skip_special_tokens=True)
    # 4L+1 = 121 rounds per forward: the prefill, then 7 decode steps
    assert out["phases"]["prefill"]["rounds"] == 121 and out["phases"]["decode"]["rounds"] == 121 * 7
    assert out["offline_ms"] > 0 and out["bytes_sent"] > 0 and out["transcript"]
