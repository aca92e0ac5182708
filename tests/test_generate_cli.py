"""generate / preprocess / chat / bench as users run them: a server process and client processes."""
import json
import os
import subprocess
import sys

import pytest

from conftest import build_tiny
from shardlm.models.load import load_model
from shardlm.models.reference import generate
from shardlm.models.sampling import SamplingParams
from shardlm.party import launch

PROMPT = "Hello, how are you?"


def shardlm(*args, check=True, stdin=None, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "shardlm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, input=stdin, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _serve(model_arg):
    """A server process for `model_arg` (a context manager; its client_args reach it)."""
    return launch.server(["--model", model_arg, "--threads", "1",
                          # correctness tests, not timing: a slow or loaded machine must not
                          # end a 30-token SmolLM2 session at the default 300 s TTL
                          "--session-ttl", "1800"])


@pytest.fixture(scope="module")
def smollm2_server(smollm2):
    with _serve("smollm2") as srv:
        yield srv.client_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    build_tiny("llama", d, seed=5)
    with _serve(str(d)) as srv:
        yield d, srv.client_args


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["v3", "v2", "v3-2r"])
def test_smollm2_greedy_30_tokens_equal_the_reference_between_two_processes(smollm2, smollm2_server, protocol):
    out = json.loads(shardlm("generate", *smollm2_server, "-p", PROMPT, "--protocol", protocol,
                             "--max-tokens", "30", "--threads", "1", "--json").stdout)
    ids = smollm2.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    want = generate(smollm2, ids, 30, SamplingParams())
    assert out["token_ids"] == want
    assert out["text"] == smollm2.tokenizer.decode(want, skip_special_tokens=True)
    assert out["private"] is True and out["protocol"] == protocol
    per_token = {"v3": 4 * 30 + 1, "v2": 7 * 30 + 1, "v3-2r": 2 * 30 + 2}[protocol]
    assert out["phases"]["prefill"]["rounds"] == per_token
    for key in ("embedding_ms", "prefill_ms", "decode_ms", "total_ms"):
        assert out["timing"][key] >= 0
    assert out["offline_ms"] > 0 and out["bytes_sent"] > 0 and out["bytes_received"] > 0


def test_plain_is_labelled_insecure_and_streams_text(tiny):
    d, args = tiny
    proc = shardlm("generate", *args, "-m", str(d), "-p", "hello", "--protocol", "plain", "--max-tokens", "5")
    assert "NOT PRIVATE" in proc.stderr
    model = load_model(str(d))
    ids = model.tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    want = generate(model, ids, 5, SamplingParams())
    assert proc.stdout.rstrip("\n") == model.tokenizer.decode(want)


def test_preprocessed_material_is_used_once(tiny, tmp_path):
    d, args = tiny
    store = tmp_path / "store"
    pre = json.loads(shardlm("preprocess", "-m", str(d), "--tokens", "40", "--out", str(store), "--json").stdout)
    assert pre["units"] == 2 * 4 + 1 and pre["offline_ms"] > 0
    gen = ["generate", *args, "-m", str(d), "-p", "hello", "--max-tokens", "6", "--material", str(store), "--json"]
    first = json.loads(shardlm(*gen).stdout)
    model = load_model(str(d))
    ids = model.tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    assert first["token_ids"] == generate(model, ids, 6, SamplingParams())
    again = shardlm(*gen, check=False)
    assert again.returncode == 1
    err = json.loads(again.stdout)
    assert err["code"] == "material" and "already used" in err["error"] and "single-use" in err["error"]


def test_material_for_another_model_is_refused(tiny, tmp_path):
    d, args = tiny
    other = tmp_path / "other"
    build_tiny("llama", other, seed=6)
    shardlm("preprocess", "-m", str(other), "--tokens", "30", "--out", str(tmp_path / "s"))
    proc = shardlm("generate", *args, "-m", str(d), "-p", "hi", "--max-tokens", "3", "--material",
                   str(tmp_path / "s"), "--json", check=False)
    assert proc.returncode == 1 and "model_fingerprint" in json.loads(proc.stdout)["error"]


def test_client_and_server_with_different_models_refuse_at_the_handshake(tiny, tmp_path):
    d, args = tiny
    other = tmp_path / "other"
    build_tiny("llama", other, seed=7)
    proc = shardlm("generate", *args, "-m", str(other), "-p", "hi", "--max-tokens", "4", "--json", check=False)
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == "model_mismatch"


def test_chat_reads_a_script_of_turns_from_stdin(tiny):
    d, args = tiny
    out = json.loads(shardlm("chat", *args, "-m", str(d), "--max-tokens", "4", "--json",
                             stdin="hello\nand again\n").stdout)
    assert [t["user"] for t in out["turns"]] == ["hello", "and again"]
    model = load_model(str(d))
    history = [{"role": "user", "content": "hello"}]
    first = generate(model, model.tokenizer.encode_chat(history), 4, SamplingParams())
    assert out["turns"][0]["assistant"] == model.tokenizer.decode(first, skip_special_tokens=True)
    history += [{"role": "assistant", "content": out["turns"][0]["assistant"]},
                {"role": "user", "content": "and again"}]
    second = generate(model, model.tokenizer.encode_chat(history), 4, SamplingParams())
    assert out["turns"][1]["assistant"] == model.tokenizer.decode(second, skip_special_tokens=True)


def test_bench_writes_seed_format_with_ratios_and_a_plot(tiny, tmp_path):
    d, args = tiny
    out = tmp_path / "results.json"
    png = tmp_path / "results.png"
    shardlm("bench", *args, "-m", str(d), "--protocol", "plain,v2,v3", "--runs", "2", "--warmup", "0",
            "--max-tokens", "4", "--output", str(out), "--plot", str(png))
    doc = json.loads(out.read_text())
    by = {r["version"]: r for r in doc["benchmarks"]}
    assert set(by) == {"plain", "v2", "v3"}
    for name, r in by.items():
        res = r["results"]
        for key in ("embedding", "prefill", "total", "decode"):
            assert set(res[key]) == {"mean_ms", "std_ms", "min_ms", "max_ms", "p50_ms", "p95_ms", "p99_ms"}
        assert res["tokens_per_second"] > 0 and res["decode_tokens_per_second"] > 0
        assert r["config"]["runs"] == 2 and r["config"]["max_new_tokens"] == 4
        assert "ratio_to_plain" in res
    assert by["plain"]["results"]["ratio_to_plain"]["decode_tokens_per_second"] == pytest.approx(1.0)
    # rounds per decode token: plain 1, v3 4L+1, v2 7L+1 (L = 2)
    assert by["plain"]["results"]["per_decode_token"]["rounds"] == 1
    assert by["v3"]["results"]["per_decode_token"]["rounds"] == 9
    assert by["v2"]["results"]["per_decode_token"]["rounds"] == 15
    assert by["v3"]["results"]["offline_ms"] > 0 and by["plain"]["results"]["offline_ms"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_compares_settings_of_one_protocol_in_one_run(tiny, tmp_path):
    d, args = tiny
    out = tmp_path / "results.json"
    shardlm("bench", *args, "-m", str(d), "--protocol", "v3-mpc,v3-mpc:mpc-ranges=wide:triple-batch=4096",
            "--mpc-ranges", "narrow", "--runs", "1", "--warmup", "0", "--max-tokens", "2", "--output", str(out))
    by = {r["version"]: r for r in json.loads(out.read_text())["benchmarks"]}
    assert set(by) == {"v3-mpc", "v3-mpc:mpc-ranges=wide:triple-batch=4096"}
    narrow, wide = by["v3-mpc"], by["v3-mpc:mpc-ranges=wide:triple-batch=4096"]
    assert narrow["config"]["options"]["mpc_ranges"] == "narrow" and narrow["config"]["options"]["triple_batch"] is None
    assert wide["config"]["options"]["mpc_ranges"] == "wide" and wide["config"]["options"]["triple_batch"] == 4096
    assert "secure comparisons" in " ".join(wide["notes"]) and "comparisons" not in " ".join(narrow["notes"])
    # the comparisons (exact softmax max, sigmoid clipping, rsqrt start) cost rounds of AND gates
    fw = [r["protocol_stats"]["forwards"][-1] for r in (narrow, wide)]
    assert fw[0].get("triples_and", 0) == 0 < fw[1]["triples_and"]
    assert wide["results"]["per_decode_token"]["rounds"] != narrow["results"]["per_decode_token"]["rounds"]
    bad = shardlm("bench", *args, "-m", str(d), "--protocol", "v3-mpc:tripels=ot", check=False)
    assert bad.returncode == 2 and "OPTION one of" in bad.stderr
