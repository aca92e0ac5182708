"""Tokenizer: a `tokenizers.Tokenizer` plus the model's chat template (jinja2) and EOS ids.

Sources: a Hugging Face directory (tokenizer.json, tokenizer_config.json, chat_template.jinja),
or GGUF metadata (`from_gguf_fields`), rebuilt as byte-level BPE the way transformers' GGUF
converter rebuilds it.

Digit rule (SmolLM2, GGUF pre-tokenizer "smollm"): llama.cpp, like the original SmolLM2
tokenizer.json, splits digits one by one (`Digits(individual_digits=True)`) before the
byte-level regex; transformers' GGUF converter does not. The two disagree only when two or more
whitespace characters precede a digit: for "a  1" the GPT-2 regex gives the pieces "a", " ", " 1",
hence tokens "a", " ", " ", "1" (there is no " 1" token); splitting digits first gives "a", "  ",
"1" (one token for the run). We deliberately match transformers' GGUF tokenizer, the oracle our
tests compare against, and pin both behaviours in tests/test_models_smollm2.py. Runs of digits
come out one digit per token either way (the vocabulary has no multi-digit tokens).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from .config import ModelError

# Split regexes of the GGUF pre-tokenizer types whose merges were learned on another split than
# GPT-2's (published in those models' tokenizer.json files).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes (the alphabet of byte-level BPE vocabularies)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, backend: Backend, chat_template: str | None = None, eos_ids=(),
                 bos_token: str | None = None, eos_token: str | None = None):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        eos = list(eos_ids)
        if eos_token is not None and backend.token_to_id(eos_token) is not None:
            eos.append(backend.token_to_id(eos_token))
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ModelError("this model has no chat template")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the chat-formatted prompt. The template writes any BOS itself, so no extra one."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def encode_prompt(self, prompt: str, system: str | None = None, chat: bool = True) -> list[int]:
        """A user prompt as the model expects it: in the chat template (with an optional system
        message) when there is one and ``chat`` is set, else the raw text."""
        if chat and self.chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return self.encode_chat(messages)
        return self.encode(prompt)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    # --- sources -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: Path, eos_ids=()) -> "Tokenizer":
        path = directory / "tokenizer.json"
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:
            raise ModelError(f"{path}: cannot read tokenizer: {e}") from None
        cfg: dict = {}
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text())
            except ValueError as e:
                raise ModelError(f"{cfg_path}: unreadable JSON: {e}") from None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        jinja = directory / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()
        return cls(backend, template, eos_ids, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))

    @classmethod
    def from_gguf_fields(cls, meta: dict) -> "Tokenizer":
        """Rebuild from GGUF `tokenizer.ggml.*` metadata (decoded to Python values)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        # Tokens written outside the byte alphabet are respelled byte by byte, as transformers does.
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        backend = Backend(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))
        split = _SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        # Control tokens (type 3) stay whole and are special; user-defined ones (type 4) stay whole.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 4])
        bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        bos = tokens[bos_id] if bos_id is not None else None
        if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
        eos = tokens[eos_id] if eos_id is not None else None
        return cls(backend, meta.get("tokenizer.chat_template"), [eos_id] if eos_id is not None else [], bos, eos)

    def save(self, directory: Path) -> None:
        self.backend.save(str(directory / "tokenizer.json"))
        cfg = {"bos_token": self.bos_token, "eos_token": self.eos_token, "chat_template": self.chat_template,
               "tokenizer_class": "PreTrainedTokenizerFast"}
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def _compile_template(source: str):
    # Same environment as transformers' chat templates: sandboxed, trim/lstrip blocks, loop controls.
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ModelError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class StreamDecoder:
    """Incremental detokenisation: `push(id)` returns the new text, holding back a partial
    UTF-8 character (byte-level tokens may split one) until it is complete. Decodes only a
    short window (from the previous emission point), so a long stream stays linear."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: decoding from here gives stable leading text
        self.read = 0  # ids up to here are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """At the end of the stream: whatever is held back, incomplete characters and all."""
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
