"""GGUF loading on tiny models: a transformers model written as a llama.cpp-style GGUF (q/k rows
permuted for llama, biases for qwen2), read back by us, must give transformers' logits."""
import json

import numpy as np
import pytest
import torch
from conftest import CHATML, build_tiny

from shardlm.models.load import load_model
from shardlm.models.reference import Reference

_BLOCK = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight", "self_attn.o_proj.weight": "attn_output.weight",
          **{f"self_attn.{p}_proj.{k}": f"attn_{p}.{k}" for p in "qkv" for k in ("weight", "bias")}}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (interleaved RoPE pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_from_hf(hf, arch: str, path, tokenizer_json) -> None:
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    vocab = json.loads(tokenizer_json.read_text())
    tokens = sorted(vocab["model"]["vocab"], key=vocab["model"]["vocab"].get)
    specials = [t["content"] for t in vocab["added_tokens"]]
    tokens += specials + [f"<unused{i}>" for i in range(c.vocab_size - len(tokens) - len(specials))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["model"]["merges"]])
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHATML)
    for name, t in hf.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:  # llama.cpp stores a tied head once, as token_embd
                continue
            gname = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{layer}.{_BLOCK[rest]}"
            if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                heads = c.num_attention_heads if "q_proj" in rest else c.num_key_value_heads
                a = llama_cpp_permute(a, heads)
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family,overrides", [("llama", {"tie_word_embeddings": False}),
                                              ("llama", {"tie_word_embeddings": True}),
                                              ("qwen2", {"tie_word_embeddings": False})])
def test_gguf_matches_transformers(tmp_path, family, overrides):
    hf = build_tiny(family, tmp_path / "hf", seed=11, **overrides)
    path = tmp_path / "tiny.gguf"
    write_gguf_from_hf(hf, family, path, tmp_path / "hf" / "tokenizer.json")
    ours = load_model(str(path))
    assert ours.config.family == family and ours.config.tie_embeddings == overrides["tie_word_embeddings"]
    assert ours.config.qkv_bias == (family == "qwen2")
    ids = [1, 50, 7, 299, 120, 3]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    ref = Reference(ours)
    torch.testing.assert_close(ref.prefill(ids, ref.new_cache(), all_logits=True), expected, atol=1e-4, rtol=0)
    # The rebuilt tokenizer agrees with the directory's tokenizer.json and keeps the chat template.
    direct = load_model(str(tmp_path / "hf"))
    for text in ["hello world", "<|im_start|>user\nhé 12<|im_end|>", "  tabs\t\t"]:
        assert ours.tokenizer.encode(text) == direct.tokenizer.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.tokenizer.apply_chat_template(msgs) == direct.tokenizer.apply_chat_template(msgs)
    assert ours.tokenizer.eos_ids == (direct.tokenizer.backend.token_to_id("<|im_end|>"),)
