"""Our plan executor against transformers on tiny random models of every family (float32)."""
import pytest
import torch
from conftest import build_tiny

from shardlm.models.load import load_model
from shardlm.models.reference import Reference

CASES = {
    "llama": ("llama", {"tie_word_embeddings": False}),
    "llama-tied-biased": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "llama3-rope-scaling": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "qwen2": ("qwen2", {"rope_theta": 1000000.0, "tie_word_embeddings": False}),
    "mistral": ("mistral", {"sliding_window": 4096}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 4}),  # shorter than the test sequences
    "gpt2": ("gpt2", {}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    hf = build_tiny(family, d, seed=len(request.param), **overrides)
    return hf, load_model(str(d))


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def test_config_read(pair):
    hf, ours = pair
    c = ours.config
    assert c.vocab == 300 and c.n_layers == 2 and c.hidden == 64
    if c.family == "qwen2":
        assert c.qkv_bias and not c.o_bias and c.n_kv_heads == 2 and c.rope_theta == 1e6
    # Every bias transformers holds is in our weights: nothing silently dropped.
    n_biases = sum(1 for name, _ in hf.named_parameters() if name.endswith("bias"))
    assert sum(1 for k in ours.weights if k.endswith("bias")) >= n_biases


def test_prefill_and_decode_match_transformers(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (11,), generator=g).tolist()
    prompt, follow = ids[:7], ids[7:]
    full = hf_logits(hf, ids)

    ref = Reference(ours)
    cache = ref.new_cache(capacity=4)  # small on purpose: the cache must grow during the test
    ours_prefill = ref.prefill(prompt, cache, all_logits=True)
    assert ours_prefill.shape == (7, 300)
    torch.testing.assert_close(ours_prefill, full[:7], atol=1e-4, rtol=0)
    for i, tok in enumerate(follow):
        step = ref.decode(tok, cache)
        torch.testing.assert_close(step, full[7 + i], atol=1e-4, rtol=0)
    assert cache.length == len(ids)


def test_chunked_prefill_equals_one_prefill(pair):
    """Prefill in two chunks over the cache (a query block attending to earlier keys) agrees too."""
    _, ours = pair
    ids = list(range(3, 15))
    ref = Reference(ours)
    whole = ref.prefill(ids, ref.new_cache())
    cache = ref.new_cache()
    ref.prefill(ids[:5], cache)
    torch.testing.assert_close(ref.prefill(ids[5:], cache), whole, atol=1e-5, rtol=0)


def test_last_position_logits(pair):
    hf, ours = pair
    ids = [5, 9, 200, 17]
    ref = Reference(ours)
    torch.testing.assert_close(ref.prefill(ids, ref.new_cache()), hf_logits(hf, ids)[-1], atol=1e-4, rtol=0)


def test_tokenizer_and_chat_template_match_transformers(pair, tmp_path):
    from transformers import AutoTokenizer

    _, ours = pair
    theirs = AutoTokenizer.from_pretrained(str(ours.source))
    for text in ["hello world", "  spaced\tout\n", "héllo wörld ✓", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.tokenizer.encode(text) == theirs(text)["input_ids"]
        assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert ours.tokenizer.apply_chat_template(msgs) == theirs.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)
    # Stop ids: the config's eos_token_id (257 in build_tiny) and the tokenizer's eos_token.
    assert set(ours.eos_ids) == {257, theirs.convert_tokens_to_ids("<|im_end|>")}
