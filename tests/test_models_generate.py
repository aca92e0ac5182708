"""Sampling, streaming generation, the plan's structure, the cache and the `models` commands."""
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny

from shardlm.models import fetch
from shardlm.models.commands import models
from shardlm.models.config import ModelError
from shardlm.models.load import load_model
from shardlm.models.plan import Activation, Attention, Linear, Norm
from shardlm.models.reference import Reference, complete, generate
from shardlm.models.sampling import SamplingParams, sample


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    build_tiny("llama", d, seed=3)
    return load_model(str(d))


# --- sampling ---------------------------------------------------------------------------------
def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample(logits, SamplingParams()) == 1


def test_top_k_one_and_tiny_top_p_are_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(100, generator=g)
    best = int(logits.argmax())
    for params in (SamplingParams(temperature=5.0, top_k=1), SamplingParams(temperature=5.0, top_p=1e-6)):
        assert {sample(logits, params, params.generator()) for _ in range(20)} == {best}


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(1)
    assert {sample(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(300)} == {0, 1}
    # top_p=0.7: 0.5 alone is short of 0.7, 0.5+0.3 reaches it: tokens 0 and 1 only.
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), g) for _ in range(300)} == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    params = SamplingParams(temperature=1.0, seed=7)
    g = params.generator()
    counts = torch.bincount(torch.tensor([sample(probs.log(), params, g) for _ in range(3000)]), minlength=3)
    assert torch.allclose(counts / 3000, probs, atol=0.03)


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.3, top_k=50, top_p=0.9, seed=123)
    runs = [[sample(logits, params, g) for _ in range(30)] for g in (params.generator(), params.generator())]
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


def test_bad_sampling_params():
    for kw in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


# --- generation -------------------------------------------------------------------------------
def test_generate_streams_and_matches_step_by_step(tiny):
    streamed = []
    out = generate(tiny, [5, 6, 7], 12, SamplingParams(), on_token=streamed.append, stop_ids=())
    assert out == streamed and len(out) == 12
    # The same tokens, recomputed without a KV cache (full forward each step).
    ref, seq = Reference(tiny), [5, 6, 7]
    for tok in out:
        assert int(ref.prefill(seq, ref.new_cache()).argmax()) == tok
        seq.append(tok)


def test_generate_stops_at_eos(tiny):
    free = generate(tiny, [5, 6, 7], 12, stop_ids=())
    stop = free[4]
    out = generate(tiny, [5, 6, 7], 12, stop_ids=[stop])
    assert out == free[: free.index(stop)]  # the stop token is neither returned nor streamed
    assert generate(tiny, [5], 0) == []


def test_generate_seeded_sampling_reproducible(tiny):
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    a, b = generate(tiny, [1, 2], 15, p, stop_ids=()), generate(tiny, [1, 2], 15, p, stop_ids=())
    assert a == b
    assert a != generate(tiny, [1, 2], 15, SamplingParams(temperature=1.0, top_p=0.95, seed=43), stop_ids=())


def test_complete_raw_and_chat(tiny):
    tok = tiny.tokenizer
    raw = complete(tiny, "hello", 6, chat=False)
    assert raw == tok.decode(generate(tiny, tok.encode("hello"), 6))
    chat = complete(tiny, "hello", 6, system="Be brief.")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert chat == tok.decode(generate(tiny, tok.encode_chat(msgs), 6))


def test_max_positions_enforced(tiny):
    ref = Reference(tiny)
    with pytest.raises(ModelError, match="exceeds the model's maximum 64"):
        ref.prefill(list(range(65)), ref.new_cache())


def test_stream_decoder_holds_partial_characters(tiny):
    tok = tiny.tokenizer
    ids = tok.encode("é🎉 ok")
    assert len(ids) > 3  # bytes: the emoji spans several tokens
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == "é🎉 ok" and all("\ufffd" not in p for p in pieces)
    # A stream cut inside a character: held back until flush, then given as decode() gives it.
    cut = tok.stream()
    emoji = tok.encode("🎉")
    assert [cut.push(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert cut.flush() == tok.decode(emoji[:-1]) and cut.flush() == ""


# --- the plan -----------------------------------------------------------------------------------
def test_plan_structure(tiny):
    plan, c = tiny.plan, tiny.config
    linears = plan.linears
    assert len(linears) == 7 * c.n_layers + 1
    assert sorted(plan.fuse_groups()) == sorted([f"layers.{i}.{g}" for i in range(c.n_layers) for g in ("qkv", "gate_up")])
    for op in linears:  # every linear op agrees with the weight it names
        assert tuple(tiny.weights[op.weight].shape) == (op.out_dim, op.in_dim)
        if op.bias:
            assert tuple(tiny.weights[op.bias].shape) == (op.out_dim,)
    assert isinstance(plan.steps[plan.head_start], Norm) and plan.steps[-1].name == "lm_head"
    kinds = [type(s).__name__ for s in plan.steps[1:14]]
    assert kinds == ["Norm", "Linear", "Linear", "Linear", "Attention", "Linear", "Add", "Norm",
                     "Linear", "Linear", "Activation", "Linear", "Add"]
    attn = [s for s in plan.steps if isinstance(s, Attention)]
    assert [a.layer for a in attn] == list(range(c.n_layers)) and all(a.rope for a in attn)
    assert set(plan.weight_shapes()) == set(tiny.weights)


def test_gpt2_plan_has_biases_and_gelu(tmp_path):
    build_tiny("gpt2", tmp_path)
    m = load_model(str(tmp_path))
    assert all(op.bias for op in m.plan.linears if op.name != "lm_head")
    assert {s.kind for s in m.plan.steps if isinstance(s, Activation)} == {"gelu_tanh"}
    assert {s.kind for s in m.plan.steps if isinstance(s, Norm)} == {"layer"}
    assert m.plan.steps[-1].weight == "embed"  # tied head reads the embedding matrix
    assert not any(s.rope for s in m.plan.steps if isinstance(s, Attention))


def test_linear_ops_are_all_the_weight_products(tiny):
    """An executor that runs the linear ops its own way (as a server would), from the (out, in)
    weights of the contract, reproduces the reference: the plan's linear ops are every product."""
    ref = Reference(tiny)
    expected = ref.prefill([3, 4, 5], ref.new_cache(), all_logits=True)
    calls = []

    class ServerStyle(Reference):
        def linear(self, step, x):
            calls.append(step.name)
            w = tiny.weights[step.weight]
            return x @ w.T + (tiny.weights[step.bias] if step.bias else 0)

    got = ServerStyle(tiny).prefill([3, 4, 5], ref.new_cache(), all_logits=True)
    assert calls == [op.name for op in tiny.plan.linears]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_fingerprint_stable_and_sensitive(tiny, tmp_path):
    fp = tiny.fingerprint()
    assert fp.startswith("sha256:") and len(fp) == 71
    again = load_model(str(tiny.source))
    assert again.fingerprint() == fp
    again.weights["layers.0.q.weight"][0, 0] += 1e-3
    again._fingerprint = None
    assert again.fingerprint() != fp


# --- cache and commands -----------------------------------------------------------------------
def test_home_and_list(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDLM_HOME", str(tmp_path / "home"))
    assert fetch.shardlm_home() == tmp_path / "home"
    assert fetch.list_cached() == []
    done = tmp_path / "home" / "models" / "smollm2"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    partial = tmp_path / "home" / "models" / ".smollm2-abc"  # an interrupted conversion
    partial.mkdir()
    assert fetch.list_cached() == []  # no marker yet: not complete
    (done / fetch.MARKER).write_text(json.dumps({"package": "p"}))
    (listed,) = fetch.list_cached()
    assert listed["name"] == "smollm2" and listed["bytes"] > 0

    result = CliRunner().invoke(models, ["list", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["home"] == str(tmp_path / "home") and [m["name"] for m in data["models"]] == ["smollm2"]
    # fetch is a no-op on a complete cache entry and prints the path.
    result = CliRunner().invoke(models, ["fetch", "smollm2", "--json"])
    assert result.exit_code == 0 and json.loads(result.output) == {"ok": True, "name": "smollm2", "path": str(done)}
    bad = CliRunner().invoke(models, ["fetch", "gpt5", "--json"])
    assert bad.exit_code == 1 and json.loads(bad.stdout) == {
        "ok": False, "name": "gpt5", "error": "unknown model 'gpt5' (known: smollm2)"}


def test_default_home(monkeypatch, tmp_path):
    monkeypatch.delenv("SHARDLM_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fetch.shardlm_home() == tmp_path / "shardlm"
