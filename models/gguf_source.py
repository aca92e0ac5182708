"""Reading a GGUF file into the same shape as a Hugging Face directory: a config.json dict,
HF-named float32 tensors, and a tokenizer rebuilt from the metadata; and writing that shape out
as a directory (``save_hf_dir``), the once-only conversion models/fetch.py caches.

llama.cpp's converter permutes the rows of q and k for the llama architecture (its RoPE pairs
adjacent elements, HF's pairs the two halves); we undo it, or the logits are wrong.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .config import ModelError
from .progress import ProgressLine
from .tokenizer import Tokenizer

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_ARCHS = ("llama", "qwen2")


def hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ModelError(f"GGUF: unexpected tensor {name!r} (not part of a supported llama/qwen2 model)")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path: Path):
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelError(f"{path}: corrupt GGUF file: {type(e).__name__}: {e}") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelError(f"{path}: corrupt GGUF file: tensor {t.name!r} extends past the end of the file")
    return reader


def _metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise ModelError(f"GGUF: unreadable metadata field {key!r}: {e}") from None
    return meta


def read_gguf(path: Path, progress: bool = False):
    """(hf_config dict, {hf name: float32 tensor}, Tokenizer) from a GGUF file."""
    import gguf

    reader = _open(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise ModelError(f"{path}: unsupported architecture {arch!r} in GGUF (supported: {', '.join(_ARCHS)})")

    def need(key):
        full = f"{arch}.{key}"
        if full not in meta:
            raise ModelError(f"{path}: GGUF metadata lacks {full!r}")
        return meta[full]

    tokenizer = Tokenizer.from_gguf_fields(meta)
    n_heads = int(need("attention.head_count"))
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    hidden = int(need("embedding_length"))
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ModelError(f"{path}: GGUF rope frequency factors (rope_freqs) are not supported")
    cfg = {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": int(meta.get(f"{arch}.rope.dimension_count", hidden // n_heads)),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    tensors = {}
    total = len(reader.tensors)
    show = ProgressLine() if progress else None
    for i, t in enumerate(reader.tensors):
        name = hf_name(t.name)
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ModelError(f"{path}: cannot dequantize tensor {t.name!r} ({t.tensor_type.name}): {e}") from None
        w = np.array(w, dtype=np.float32)  # a copy: F32 tensors come back as read-only file views
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute(w, n_heads if "attn_q" in t.name else n_kv)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
        if show:
            show(f"  dequantizing tensors {i + 1}/{total}", last=i + 1 == total)
    if "model.embed_tokens.weight" not in tensors:
        raise ModelError(f"{path}: GGUF lacks the token embedding tensor token_embd.weight")
    # The embedding's rows, not the token list: a model's vocabulary may be padded past it.
    cfg["vocab_size"] = int(tensors["model.embed_tokens.weight"].shape[0])
    return cfg, tensors, tokenizer


def save_hf_dir(cfg: dict, hf: dict[str, torch.Tensor], tokenizer: Tokenizer, d: Path) -> None:
    """Write a Hugging Face style directory (fp32 safetensors): what a GGUF is converted to once."""
    d.mkdir(parents=True, exist_ok=True)
    if cfg.get("tie_word_embeddings"):
        hf = {k: v for k, v in hf.items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in hf.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id")}, indent=2))
    tokenizer.save(d)
