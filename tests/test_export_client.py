"""`shardlm models export-client`: a client-only model holds no linear weight matrix, yet runs
v2, v3 and v3-2r exactly from mask material made elsewhere (here: by the full model, ahead of
time), and whatever would need a weight matrix on the client is a clear ModelError."""
import json
import os
import subprocess
import sys

import pytest
import torch
import trio
from safetensors import safe_open

from conftest import build_tiny
from shardlm.models import client_dir
from shardlm.models.config import ModelError
from shardlm.models.load import load_model
from shardlm.models.nonlinear import layer_norm_term_names, layer_norm_terms
from shardlm.models.reference import generate as reference_generate
from shardlm.models.sampling import SamplingParams
from shardlm.party import launch
from shardlm.party.run import run_generation
from shardlm.protocols import masked, registry, units
from shardlm.protocols.export import export_client
from shardlm.protocols.preprocess import MaterialStore

from support import tls_server

GREEDY = SamplingParams()
FAMILIES = ["llama", "qwen2", "gpt2"]
PROMPT = [5, 77, 31, 200, 9, 14, 150]
NO_WEIGHTS = r"is an export-client directory: it holds no linear weight matrices; use --offline he or --offline dealer"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{family: (full model, its model dir, client-only model, its export dir)}; gpt2 is tied."""
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        build_tiny(fam, d / "model", seed=5)
        full = load_model(str(d / "model"))
        export_client(full, d / "client")
        out[fam] = (full, d / "model", load_model(str(d / "client")), d / "client")
    return out


def _keys(export_dir) -> set[str]:
    with safe_open(str(export_dir / client_dir.WEIGHTS), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_export_holds_no_linear_weight_and_loads_as_the_full_model(tiny, family, tmp_path):
    full, _, client, export_dir = tiny[family]
    linear = {op.weight for op in full.plan.linears}
    held = _keys(export_dir)
    # only a tied LM head may be there, as the embedding table the client looks tokens up in
    assert held & linear == ({"embed"} if full.config.tie_embeddings else set())
    assert held >= {"final_norm.weight", "layers.1.mlp_norm.weight"} and "embed" in held
    export_client(full, tmp_path / "bare", embedding=False)
    assert not _keys(tmp_path / "bare") & linear and "embed" not in _keys(tmp_path / "bare")
    # the encodings file holds row scales only (one vector per unit part)
    with safe_open(str(export_dir / client_dir.ENCODINGS), framework="pt") as f:
        assert all(f.get_slice(k).get_shape().__len__() == 1 for k in f.keys())
    assert client.client_only and not full.client_only
    assert client.fingerprint() == full.fingerprint() and client.config == full.config
    assert client.tokenizer.encode("hello world") == full.tokenizer.encode("hello world")
    for name in held:  # what it holds, it holds exactly
        if name in full.weights:
            assert torch.equal(client.weights[name], full.weights[name]), name
    terms = [comp for comp in full.plan.composites() if comp.norm.kind == "layer"]
    assert bool(terms) == (family == "gpt2")
    for comp in terms:  # LayerNorm models: the (W g, W beta) precomposed units finish with, as W gives them
        for op in comp.then:
            for want, name in zip(layer_norm_terms(op, comp.norm, full.weights), layer_norm_term_names(op)):
                assert torch.equal(client.weights[name], want), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["v2", "v3", "v3-2r"])
def test_encodings_are_the_full_models_bit_for_bit(tiny, family, variant):
    full, _, client, _ = tiny[family]
    want, got = units.encoding_for(full, variant), units.encoding_for(client, variant)
    assert list(got) == list(want)
    for unit in want:
        assert len(got[unit]) == len(want[unit])
        for (s1, l1), (s2, l2) in zip(want[unit], got[unit]):
            assert s1.dtype == s2.dtype and torch.equal(s1, s2) and l1 == l2


async def _generate(full, client, tmp_path, protocol, n, options):
    async with tls_server(tmp_path, model=full) as (server, cfg):
        return await run_generation(cfg, client, registry.get(protocol), PROMPT, n, GREEDY, ignore_eos=True,
                                    options=options)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("protocol", ["v2", "v3", "v3-2r"])
def test_a_client_only_model_generates_exactly_with_material_made_elsewhere(tiny, tmp_path, family, protocol):
    full, _, client, _ = tiny[family]
    n = 10
    masked.deal_for(full, protocol, len(PROMPT), n).save(tmp_path / "material")  # the dealer has the weights
    want = reference_generate(full, PROMPT, n, GREEDY, stop_ids=())
    rep = trio.run(_generate, full, client, tmp_path, protocol, n, {"material": str(tmp_path / "material")})
    assert rep.result.token_ids == want


def test_without_the_embedding_table_the_client_fetches_rows_by_ot(tiny, tmp_path):
    full, _, _, _ = tiny["llama"]
    export_client(full, tmp_path / "bare", embedding=False)
    bare = load_model(str(tmp_path / "bare"))
    with pytest.raises(ModelError, match=r"^embed: .* without the token embedding table .* --embedding ot"):
        bare.weights["embed"]
    masked.deal_for(full, "v3", len(PROMPT), 4).save(tmp_path / "material")
    rep = trio.run(_generate, full, bare, tmp_path, "v3", 4,
                   {"material": str(tmp_path / "material"), "embedding_source": "ot"})
    assert rep.result.token_ids == reference_generate(full, PROMPT, 4, GREEDY, stop_ids=())


def test_anything_computing_with_a_linear_weight_gets_a_model_error(tiny):
    full, _, client, _ = tiny["gpt2"]
    with pytest.raises(ModelError, match=r"^layers\.0\.q\.weight: .* " + NO_WEIGHTS):
        client.weights["layers.0.q.weight"]
    with pytest.raises(ModelError, match=NO_WEIGHTS):  # the client's own dealing (generate without --material)
        masked.deal_for(client, "v3", 3, 2)
    for name in ("v3", "v3-mpc"):  # `shardlm preprocess`
        spec = registry.get(name)
        with pytest.raises(ModelError, match=NO_WEIGHTS):
            spec.hook("deal")(spec, client, 4)
    with pytest.raises(ModelError, match=NO_WEIGHTS):  # --local, plain on the client, split's end blocks
        reference_generate(client, PROMPT, 2, GREEDY)
    with pytest.raises(KeyError):  # a name that is no tensor at all stays a KeyError
        client.weights["no.such.tensor"]


def test_verify_is_refused_before_the_material_is_claimed(tiny, tmp_path):
    full, _, client, _ = tiny["llama"]
    masked.deal_for(full, "v3", len(PROMPT), 4).save(tmp_path / "material")

    async def main():
        async with tls_server(tmp_path, model=full) as (_, cfg):
            with pytest.raises(ModelError, match=r"^--verify checks replies against U W, .* export-client directory"):
                await run_generation(cfg, client, registry.get("v3"), PROMPT, 4, GREEDY,
                                     options={"material": str(tmp_path / "material"), "verify": True})
    trio.run(main)
    MaterialStore.load(tmp_path / "material").close()  # still unclaimed and unused


def test_an_altered_or_foreign_export_is_refused(tiny, tmp_path):
    full, _, _, _ = tiny["qwen2"]
    export_client(full, tmp_path / "c")
    weights = tmp_path / "c" / client_dir.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="altered since the export"):
        load_model(str(tmp_path / "c"))
    with pytest.raises(FileExistsError):
        export_client(full, tmp_path / "c")


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "shardlm.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_export_client_writes_a_loadable_dir_and_refuses_a_non_empty_one(tiny, tmp_path):
    full, model_dir, _, _ = tiny["llama"]
    help_text = _cli("models", "export-client", "--help").stdout
    assert "--offline he" in help_text and "--no-embedding" in help_text
    proc = _cli("models", "export-client", str(tmp_path / "c"), "-m", str(model_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model_fingerprint"] == full.fingerprint() and out["bytes"] > 0
    assert out["bytes"] == sum(p.stat().st_size for p in (tmp_path / "c").iterdir())
    loaded = load_model(str(tmp_path / "c"))
    assert loaded.client_only and loaded.fingerprint() == full.fingerprint()
    human = _cli("models", "export-client", str(tmp_path / "d"), "-m", str(model_dir))
    assert human.returncode == 0 and full.fingerprint() in human.stdout and "MB" in human.stdout
    again = _cli("models", "export-client", str(tmp_path / "c"), "-m", str(model_dir), "--json")
    assert again.returncode == 1 and json.loads(again.stdout)["code"] == "exists"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(
        p.name for p in (tmp_path / "d").iterdir())  # the refused run wrote nothing
    served = _cli("serve", "-m", str(tmp_path / "c"), "--port", "0", "--json")
    assert served.returncode == 1 and "a server needs the full model" in json.loads(served.stdout)["error"]


@pytest.mark.slow
def test_smollm2_client_run_from_an_export_generates_between_processes(smollm2, tmp_path):
    """The CLI end to end: export, material made with the full model, a server process with the
    full model and a client process run from the export over pinned TLS."""
    torch.set_num_threads(1)
    c = tmp_path / "client"
    out = json.loads(_cli("models", "export-client", str(c), "-m", "smollm2", "--json").stdout)
    assert _keys(c) & {op.weight for op in smollm2.plan.linears} == {"embed"}  # tied: the head is the table
    # the embedding (49152 x 576 float32, 113 MB) is nearly all of it; 538 MB with the weight matrices
    assert out["bytes"] < 125e6 and out["model_fingerprint"] == smollm2.fingerprint()
    client = load_model(str(c))
    want, got = units.encoding_for(smollm2, "v3"), units.encoding_for(client, "v3")
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for u in want for a, b in zip(want[u], got[u]))
    prompt, n = "Hello, how are you?", 8
    ids = smollm2.tokenizer.encode_prompt(prompt)
    masked.deal_for(smollm2, "v3", len(ids), n).save(tmp_path / "material")
    with launch.server(["--model", "smollm2", "--threads", "1"]) as srv:
        run = _cli("generate", "-m", str(c), "-p", prompt, "--max-tokens", str(n), "--material",
                   str(tmp_path / "material"), "--server", srv.address, "--tls-fingerprint", srv.fingerprint,
                   "--threads", "1", "--json", timeout=600)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"] == reference_generate(smollm2, ids, n, GREEDY)
