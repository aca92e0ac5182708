"""The server's ready state and its ring-matrix disk cache, with server and clients as processes."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import trio

from conftest import tiny_llama_dir
from shardlm.models.reference import generate
from shardlm.models.sampling import SamplingParams
from shardlm.party import launch
from shardlm.party.client import connect
from shardlm.party.preload import HOLD_ENV
from shardlm.protocols import matrix_cache
from shardlm.protocols.units import cache_names, units_for

PROMPT = "hello"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory, seed=11)


def _env(home, **extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "SHARDLM_HOME": str(home), **extra}


def _serve(d, home, preload="v3,v3-2r", **options):
    return launch.server(["--model", str(d), "--threads", "1", "--preload", preload], env=_env(home), **options)


def _health(srv) -> dict:
    async def ask():
        async with connect(srv.client_config(timeout=30)) as conn:
            return await conn.health()
    return trio.run(ask)


def _generate_cmd(srv, d, protocol, tokens=5):
    return [sys.executable, "-m", "shardlm.cli", "generate", *srv.client_args, "-m", str(d), "-p", PROMPT,
            "--protocol", protocol, "--max-tokens", str(tokens), "--threads", "1", "--json"]


def _assert_exact(srv, d, model, home, protocol, tokens=5):
    proc = subprocess.run(_generate_cmd(srv, d, protocol, tokens), capture_output=True, text=True, timeout=600,
                          env=_env(home))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = model.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    assert json.loads(proc.stdout)["token_ids"] == generate(model, ids, tokens, SamplingParams())


def _units(model, protocol) -> int:
    return len(units_for(model.plan, protocol))


def _leaves(model, protocol) -> int:
    """The ring matrices (cache files) a protocol's units are made of: a fused unit is its ops'."""
    return len({n for u in units_for(model.plan, protocol).values() for n in cache_names(u)})


@pytest.fixture(scope="module")
def warm_home(tiny, tmp_path_factory):
    """A $SHARDLM_HOME whose cache a first server filled (v3 and v3-2r); tests copy it."""
    d, model = tiny
    home = tmp_path_factory.mktemp("home")
    with _serve(d, home) as srv:
        h = _health(srv)
        ready = launch.next_event(srv)
    v3, v32r = h["protocols"]["v3"], h["protocols"]["v3-2r"]
    # a fresh server builds everything (v3-2r shares layer 0's q/k/v, each o and down and the head with v3)
    assert v3["built"] == _leaves(model, "v3") and v3["loaded"] == 0
    assert v32r["built"] > 0 and v32r["loaded"] == 0
    assert ready["event"] == "ready" and set(ready["protocols"]) == {"v3", "v3-2r"}
    files = sorted(home.glob("ring-cache/v*/*/*.safetensors"))
    assert len(files) == v3["built"] + v32r["built"]
    return home


def test_health_goes_from_loading_to_ready_and_reports_each_protocol(tiny, tmp_path):
    d, model = tiny
    hold = tmp_path / "go"
    env = _env(tmp_path / "home", **{HOLD_ENV: str(hold)})
    with launch.server(["--model", str(d), "--threads", "1", "--preload", "v3,v3-2r"], env=env,
                       wait_ready=False) as srv:
        h = _health(srv)
        assert h["status"] == "loading" and h["loading"]["done"] == 0 and h["loading"]["protocols_ready"] == 0
        assert h["protocols"]["v3"]["status"] == "loading" and h["protocols"]["v3-2r"]["status"] == "queued"
        assert h["protocols"]["v3"]["matrices"] == {"built": 0, "total": _units(model, "v3")}
        assert h["protocols"]["v2"]["status"] == "on first use"
        hold.touch()
        event = launch.next_event(srv, timeout=120)
        assert event["event"] == "ready" and event["protocols"]["v3-2r"]["status"] == "ready"
        h = _health(srv)
        assert h["status"] == "ready" and "loading" not in h
        for p in ("v3", "v3-2r"):
            assert h["protocols"][p]["matrices"] == {"built": _units(model, p), "total": _units(model, p)}
        # v2 was not preloaded, yet holds every matrix: its units are v3's fused units' own parts
        assert h["protocols"]["v2"]["matrices"] == {"built": _units(model, "v2"), "total": _units(model, "v2")}
        info = json.loads(subprocess.run([sys.executable, "-m", "shardlm.cli", "info", *srv.client_args, "--json"],
                                         capture_output=True, text=True, env=env, timeout=120).stdout)
        assert info["protocols"]["v3"]["matrices"]["built"] == _units(model, "v3")
        assert info["protocols"]["v3"]["preload"]["status"] == "ready"
        assert "matrices" not in info["protocols"]["plain"]


def test_a_restarted_server_loads_the_cache_and_stays_exact(tiny, warm_home, tmp_path):
    d, model = tiny
    home = tmp_path / "home"
    shutil.copytree(warm_home, home)
    with _serve(d, home) as srv:
        h = _health(srv)
        v3, v32r = h["protocols"]["v3"], h["protocols"]["v3-2r"]
        assert v3["loaded"] == _leaves(model, "v3") and v3["built"] == 0 and v3.get("rejected", 0) == 0
        assert v32r["loaded"] > 0 and v32r["built"] == 0
        for protocol in ("v3", "v3-2r"):
            _assert_exact(srv, d, model, home, protocol)


def test_a_corrupt_or_foreign_cache_file_is_rebuilt(tiny, warm_home, tmp_path):
    d, model = tiny
    home = tmp_path / "home"
    shutil.copytree(warm_home, home)
    cache = matrix_cache.MatrixCache(home / "ring-cache", model.fingerprint())
    ops = {op.name: op for u in units_for(model.plan, "v2").values() for op in u.ops}
    qkv, o = cache.path("op-layers.0.k"), cache.path("op-layers.0.o")  # k: a part of v3's fused qkv
    raw = bytearray(qkv.read_bytes())
    raw[-100] ^= 0x01  # one bit of the tensor data (it follows the header)
    qkv.write_bytes(bytes(raw))
    # a file claiming another model (same length: the header's size field stays right)
    raw = o.read_bytes()
    at = raw.index(b'"model_fingerprint":"sha256:') + len(b'"model_fingerprint":"sha256:')
    o.write_bytes(raw[:at] + (b"0" if raw[at:at + 1] != b"0" else b"1") + raw[at + 1:])
    with _serve(d, home, preload="v3") as srv:
        v3 = _health(srv)["protocols"]["v3"]
        assert v3["rejected"] == 2 and v3["built"] == 2 and v3["loaded"] == _leaves(model, "v3") - 2
        _assert_exact(srv, d, model, home, "v3")
    # the rebuilt matrices were written back whole: the cache is valid again
    for name, u in (("op-layers.0.k", ops["layers.0.k"]), ("op-layers.0.o", ops["layers.0.o"])):
        assert cache.load(name, [(u.out_dim, u.in_dim)]) is not None
    assert cache.stats["rejected"] == 0


def test_a_session_arriving_while_loading_waits_and_is_exact(tiny, tmp_path):
    d, model = tiny
    hold, home = tmp_path / "go", tmp_path / "home"
    env = _env(home, **{HOLD_ENV: str(hold)})
    with launch.server(["--model", str(d), "--threads", "1", "--preload", "v3"], env=env, wait_ready=False) as srv:
        client = subprocess.Popen(_generate_cmd(srv, d, "v3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=_env(home))
        try:
            deadline = time.monotonic() + 120
            while (h := _health(srv))["active_sessions"] == 0:  # the client's HELLO was accepted...
                assert client.poll() is None and time.monotonic() < deadline, client.stderr.read()[-2000:]
                time.sleep(0.1)
            time.sleep(1.0)
            # ...and its first product waits for the preload, which is held
            assert h["status"] == "loading" and client.poll() is None
            assert _health(srv)["protocols"]["v3"]["matrices"]["built"] == 0
            hold.touch()
            out, err = client.communicate(timeout=300)
        finally:
            client.kill()
        assert client.returncode == 0, err[-3000:]
        ids = model.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
        assert json.loads(out)["token_ids"] == generate(model, ids, 5, SamplingParams())
        # the preload built every unit: the waiting session built none of them itself
        v3 = _health(srv)["protocols"]["v3"]
        assert v3["built"] == _leaves(model, "v3") and v3["status"] == "ready"


def test_no_cache_writes_nothing_and_bad_preload_is_a_usage_error(tiny, tmp_path):
    d, model = tiny
    with launch.server(["--model", str(d), "--threads", "1", "--no-cache"], env=_env(tmp_path)) as srv:
        v3 = _health(srv)["protocols"]["v3"]
        assert v3["cache"] is False and v3["status"] == "ready"
    assert not (tmp_path / "ring-cache").exists()
    proc = subprocess.run([sys.executable, "-m", "shardlm.cli", "serve", "--model", str(d), "--preload", "v9",
                           "--port", "0", "--json"], capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert proc.returncode == 2 and json.loads(proc.stdout)["code"] == "usage" and "v9" in json.loads(proc.stdout)["error"]
