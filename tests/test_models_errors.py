"""Bad model input gives a ModelError that names the problem; sharded checkpoints load."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import build_tiny
from safetensors.torch import load_file, save_file

from shardlm.models.config import ModelError
from shardlm.models.load import load_model
from shardlm.models.reference import Reference


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    build_tiny("llama", d)
    return d


@pytest.fixture
def copy(llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    return d


def rewrite(d, edit):
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def test_generating_past_the_models_positions_is_a_clear_error(llama_dir):
    """`generate` (here --local; the same holds against a server) past max_position_embeddings
    (64) ended in a ModelError traceback; it is bad usage, refused before any work (exit 2)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "shardlm.cli", "generate", "--local", "-m", str(llama_dir), "-p", "hi",
                           "--max-tokens", "70", "--threads", "1"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "+ --max-tokens 70 =" in proc.stderr and "exceeds" in proc.stderr.strip().splitlines()[-1]


def test_missing_tensor(copy):
    rewrite(copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ModelError, match=r"missing tensor.*layers\.1\.k\.weight"):
        load_model(str(copy))


def test_wrong_shape(copy):
    rewrite(copy, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)}))
    with pytest.raises(ModelError, match=r"layers\.0\.up\.weight has shape \(95, 64\), expected \(96, 64\)"):
        load_model(str(copy))


def test_unexpected_tensor(copy):
    rewrite(copy, lambda t: t.update({"model.layers.0.self_attn.rotary_alpha": torch.zeros(3)}))
    with pytest.raises(ModelError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.rotary_alpha'"):
        load_model(str(copy))


def test_unknown_architecture(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"unsupported architecture: model_type='mamba'"):
        load_model(str(copy))


def test_unsupported_activation(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["hidden_act"] = "relu"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="unsupported hidden_act 'relu'"):
        load_model(str(copy))


def test_truncated_safetensors(copy):
    f = copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"model\.safetensors: corrupt or truncated safetensors"):
        load_model(str(copy))


def test_missing_config_and_weights(copy, tmp_path):
    (copy / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(copy))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                                                   "num_attention_heads": 2, "intermediate_size": 8,
                                                   "vocab_size": 10}))
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights"):
        load_model(str(empty))


def test_no_such_model(tmp_path):
    with pytest.raises(ModelError, match="no such model 'nonexistent-model'"):
        load_model("nonexistent-model")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="not a model"):
        load_model(str(other))


def test_sharded_checkpoint_with_index(tmp_path):
    d = tmp_path / "sharded"
    hf = build_tiny("qwen2", d)
    shutil.rmtree(d)
    hf.save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 2
    ours = load_model(str(d))
    ref = Reference(ours)
    with torch.no_grad():
        expected = hf(torch.tensor([[1, 2, 3]])).logits[0, -1]
    torch.testing.assert_close(ref.prefill([1, 2, 3], ref.new_cache()), expected, atol=1e-4, rtol=0)
    # An index that names a shard which is not there.
    next(iter(sorted(d.glob("model-*.safetensors")))).unlink()
    with pytest.raises(ModelError, match=r"names shard model-.*\.safetensors, which is missing"):
        load_model(str(d))


# --- GGUF -------------------------------------------------------------------------------------
def write_gguf(path, arch="llama", tensors=None):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c"])
    for name, arr in (tensors or {"token_embd.weight": np.ones((3, 8), np.float32)}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_bad_magic(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ModelError, match=r"not a GGUF file \(magic b'NOPE'"):
        load_model(str(f))


def test_gguf_truncated(tmp_path):
    f = tmp_path / "t.gguf"
    write_gguf(f, tensors={"token_embd.weight": np.ones((3, 8), np.float32),
                           "output_norm.weight": np.ones(4096, np.float32)})
    data = f.read_bytes()
    f.write_bytes(data[:-4000])
    with pytest.raises(ModelError, match=r"corrupt GGUF file"):
        load_model(str(f))


def test_gguf_garbage_header(tmp_path):
    f = tmp_path / "g.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelError, match=r"corrupt GGUF file"):
        load_model(str(f))


def test_gguf_unknown_architecture(tmp_path):
    f = tmp_path / "m.gguf"
    write_gguf(f, arch="mamba")
    with pytest.raises(ModelError, match=r"unsupported architecture 'mamba' in GGUF"):
        load_model(str(f))


def test_gguf_missing_tensor(tmp_path):
    f = tmp_path / "l.gguf"
    write_gguf(f)  # only token_embd: every block tensor is missing
    with pytest.raises(ModelError, match=r"missing tensor\(s\) final_norm\.weight, layers\.0\.attn_norm\.weight"):
        load_model(str(f))


def test_unsupported_rope_scaling(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="unsupported rope scaling type 'yarn'"):
        load_model(str(copy))
