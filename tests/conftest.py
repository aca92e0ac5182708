"""Shared pytest configuration."""
import os

# Two parties often share this 2-core machine in tests: one torch thread each (DESIGN.md s10).
os.environ.setdefault("OMP_NUM_THREADS", "1")


# --- models: tiny random Hugging Face models and the real SmolLM2 --------------------------
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def write_tiny_tokenizer(d: Path) -> None:
    """A byte-level BPE over the 256 bytes plus a few merges and two ChatML specials (258+ ids)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from shardlm.models.tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True, normalized=False),
                            AddedToken("<|im_end|>", special=True, normalized=False)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML,
        "eos_token": "<|im_end|>", "bos_token": None}))


TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def build_tiny(family: str, d: Path, seed: int = 0, **overrides):
    """A transformers model with every parameter random (biases and norms too), saved to `d`."""
    import torch
    import transformers as tf

    classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
               "mistral": (tf.MistralConfig, tf.MistralForCausalLM), "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel)}
    cfg_cls, model_cls = classes[family]
    if family == "gpt2":
        kw = dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=257,
                  eos_token_id=257)
    else:
        kw = dict(TINY, eos_token_id=257, bos_token_id=256)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:  # norm scales around 1
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    write_tiny_tokenizer(d)
    return model


def tiny_llama_dir(tmp_path_factory, seed: int):
    """(directory, loaded model) of a tiny llama built for a module's fixture (servers started as
    processes need the directory, the in-process side the model)."""
    from shardlm.models.load import load_model

    d = tmp_path_factory.mktemp("tiny-llama")
    build_tiny("llama", d, seed=seed)
    return d, load_model(str(d))


def load_tiny_models(tmp_path_factory, families, seed: int, overrides=None) -> dict:
    """{family: loaded tiny model} for a module's fixture; ``overrides`` maps a family to its
    build_tiny overrides."""
    from shardlm.models.load import load_model

    out = {}
    for fam in families:
        d = tmp_path_factory.mktemp(fam)
        build_tiny(fam, d, seed=seed, **(overrides or {}).get(fam, {}))
        out[fam] = load_model(str(d))
    return out


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2 directory, fetched once into SHARDLM_HOME (cached across runs)."""
    from shardlm.models.fetch import fetch_smollm2

    return fetch_smollm2(progress=True)


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir):
    from shardlm.models.fetch import smollm2_gguf

    return smollm2_gguf(progress=True)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from shardlm.models.load import load_model

    return load_model("smollm2")


@pytest.fixture(scope="module")
def lut_engine():
    """v3-ot's engine (protocols/mpc/approx_lut.py) with both parties' OT in memory, on one torch
    thread; one per test module (its OT pools and counters are that module's)."""
    import torch

    from shardlm.protocols.mpc import beaver_ot
    from shardlm.protocols.mpc.approx_lut import LutEngine

    torch.set_num_threads(1)
    return LutEngine(beaver_ot.OTProvider(batch=1 << 12, prefill_and=True))
