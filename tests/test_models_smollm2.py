"""The real default model, SmolLM2-135M-Instruct (fetched once into SHARDLM_HOME), against
transformers' own GGUF loading of the same file: tokenizer ids and greedy generation."""
import pytest
import torch

from shardlm.models.load import load_model
from shardlm.models.reference import Reference, complete, generate
from shardlm.models.sampling import SamplingParams

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]

STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "café, naïve, résumé, Ærø, señor",
    "Grüße aus Köln — über 3 Brücken",
    "日本語のテキストと中文混合",
    "한국어 문장입니다",
    "emoji 🎉🚀 and flags 🇫🇷 and a family 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<html><body class=\"x\">&amp;</body></html>",
    "1234567890",
    "pi is 3.14159, e is 2.71828 and 10^6 = 1000000",
    "phone: +1 (555) 123-4567",
    "tabs\tand\t\ttabs",
    "    four leading spaces",
    "trailing spaces    ",
    "line one\n\n\nline four\r\nwindows",
    "a  1 b   22 c\t3\n4",  # whitespace runs before digits: the digit-rule edge case
    "hello   42 and\n\n7",
    "   ",
    "",
    "Ünïcödé ∑∫√∞ ≠ ≤ ≥ ← →",
    "<|im_start|>user\nhi<|im_end|>",
    "don't won't it's we'll I'm they've",
    "ALL CAPS and MiXeD cAsE",
]


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def hf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                             dtype=torch.float32)
    return m.eval()


def test_config(smollm2):
    c = smollm2.config
    assert (c.family, c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn, c.vocab) == \
        ("llama", 30, 576, 9, 3, 64, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and 2 in smollm2.eos_ids
    assert smollm2.fingerprint().startswith("sha256:") and smollm2.fingerprint() == smollm2.fingerprint()


def test_tokenizer_matches_transformers_gguf(smollm2, hf_tokenizer):
    tok = smollm2.tokenizer
    chat_text = tok.apply_chat_template(CHAT)
    assert chat_text == hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    strings = STRINGS + [chat_text]
    assert len(strings) >= 20
    for s in strings:
        assert tok.encode(s) == hf_tokenizer(s)["input_ids"], s
        assert tok.decode(tok.encode(s)) == s


def test_digit_rule_follows_transformers(smollm2, hf_tokenizer):
    """Our documented choice (models/tokenizer.py): no individual-digit split before the byte-level
    regex, as transformers' GGUF tokenizer. With 2+ whitespace characters before a digit the regex
    gives the last one to the digit's piece, so the run is cut; llama.cpp (and the original SmolLM2
    tokenizer.json), splitting digits first, keep the run whole ("  " is one token)."""
    from tokenizers import pre_tokenizers

    tok = smollm2.tokenizer
    ours = {s: tok.backend.encode(s).tokens for s in ("a  1", "hello   42", "a\n\n1", "x 2024")}
    assert ours == {"a  1": ["a", "Ġ", "Ġ", "1"], "hello   42": ["hello", "ĠĠ", "Ġ", "4", "2"],
                    "a\n\n1": ["a", "Ċ", "Ċ", "1"], "x 2024": ["x", "Ġ", "2", "0", "2", "4"]}
    for s in ours:
        assert tok.encode(s) == hf_tokenizer(s)["input_ids"]
    # The llama.cpp rule, for contrast: it differs exactly on the whitespace-run cases.
    llama_cpp = type(tok.backend).from_str(tok.backend.to_str())
    llama_cpp.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert llama_cpp.encode("a  1").tokens == ["a", "ĠĠ", "1"]
    assert llama_cpp.encode("hello   42").tokens == ["hello", "ĠĠĠ", "4", "2"]
    assert llama_cpp.encode("x 2024").tokens == ours["x 2024"]


def test_greedy_generation_matches_transformers(smollm2, hf_model, hf_tokenizer):
    ids = smollm2.tokenizer.encode_chat(CHAT)
    ours = generate(smollm2, ids, 30, SamplingParams(temperature=0.0), stop_ids=())
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False,
                                   eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    assert len(ours) == 30
    assert ours == theirs, (smollm2.tokenizer.decode(ours), hf_tokenizer.decode(theirs))
    assert "Paris" in smollm2.tokenizer.decode(ours)


def test_logits_match_transformers(smollm2, hf_model):
    ids = smollm2.tokenizer.encode_chat(CHAT)
    ref = Reference(smollm2)
    ours = ref.prefill(ids, ref.new_cache(), all_logits=True)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)  # measured: 6e-5 of logits up to ~38


def test_gguf_direct_load_equals_converted(smollm2, smollm2_gguf):
    direct = load_model(str(smollm2_gguf))
    assert direct.config == smollm2.config
    assert direct.fingerprint() == smollm2.fingerprint()
    text = "Ünïcödé and code: x = [1, 2]"
    assert direct.tokenizer.encode(text) == smollm2.tokenizer.encode(text)
    assert direct.tokenizer.chat_template == smollm2.tokenizer.chat_template


def test_complete_streams_chat_text(smollm2):
    pieces = []
    text = complete(smollm2, "What is the capital of France? Answer in one sentence.", 30, on_text=pieces.append)
    assert text == "".join(pieces) and len(pieces) > 3
    assert text == smollm2.tokenizer.decode(generate(smollm2, smollm2.tokenizer.encode_chat(CHAT), 30))
    assert "Paris" in text


def test_conversion_from_cached_gguf(smollm2, smollm2_gguf, tmp_path, monkeypatch):
    """The GGUF -> safetensors conversion in a fresh home (the GGUF copied in, so no download):
    a crashed attempt's leftovers do not matter, the result is the same model, a rerun is a no-op."""
    import json
    import shutil
    import time

    from click.testing import CliRunner

    from shardlm.models import fetch
    from shardlm.models.commands import models

    home = tmp_path / "home"
    monkeypatch.setenv("SHARDLM_HOME", str(home))
    (home / "gguf").mkdir(parents=True)
    shutil.copy(smollm2_gguf, home / "gguf" / smollm2_gguf.name)
    (home / "models" / ".smollm2-crashed").mkdir(parents=True)  # an interrupted conversion
    result = CliRunner().invoke(models, ["fetch", "smollm2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # progress went to stderr, stdout is one JSON object
    assert out == {"ok": True, "name": "smollm2", "path": str(home / "models" / "smollm2")}
    assert "converting" in result.stderr
    assert load_model("smollm2").fingerprint() == smollm2.fingerprint()
    t0 = time.perf_counter()
    assert fetch.fetch_smollm2(progress=False) == home / "models" / "smollm2"
    assert time.perf_counter() - t0 < 1.0
    assert [m["name"] for m in fetch.list_cached()] == ["smollm2"]


def test_converted_directory_is_a_valid_hf_directory(smollm2, smollm2_dir):
    """transformers reads our conversion (config.json, fp32 safetensors, tokenizer files) as an
    ordinary HF model: same chat ids, same logits as our reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = smollm2.tokenizer.encode_chat(CHAT)
    assert hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False) == ids
    ref = Reference(smollm2)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ref.prefill(ids, ref.new_cache(), all_logits=True), theirs, atol=2e-4, rtol=0)
