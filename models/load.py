"""Loading a model: `load_model("smollm2" | HF directory | file.gguf)` -> Model.

Every source is first read as Hugging Face names (a GGUF is translated by gguf_source.py), then
mapped onto the plan's canonical weight names (models/plan.py) and checked against the shapes
the plan needs, so a missing or misshapen tensor is reported by name before anything runs.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import client_dir
from .config import ModelConfig, ModelError, config_from_hf, read_config_json
from .fetch import KNOWN, fetch
from .plan import Plan, build_plan
from .tokenizer import Tokenizer


_DERIVED_LOCK = threading.RLock()


@dataclass
class Model:
    name: str
    config: ModelConfig
    weights: dict[str, torch.Tensor] = field(repr=False)  # canonical name -> float32, linear (out, in)
    tokenizer: Tokenizer | None  # None for a weights-only directory (a server needs no tokenizer)
    plan: Plan = field(repr=False)
    source: Path | None = None
    _fingerprint: str | None = field(default=None, repr=False)
    _derived: dict = field(default_factory=dict, repr=False)
    # An export-client directory (models/client_dir.py): no linear weight matrix, the full model's
    # fingerprint, and the public per-unit encodings of each masked variant, as stored there.
    client_only: bool = False
    stored_encodings: dict | None = field(default=None, repr=False)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        extra = self.tokenizer.eos_ids if self.tokenizer else ()
        return tuple(dict.fromkeys(self.config.eos_ids + extra))

    def derived(self, key, make):
        """A value computed from the weights (ring matrices, the reference's transposed copies),
        made once per process and kept with the weights it came from. ``key`` is a tuple whose
        first element names the module that owns the value. Servers build in worker threads,
        hence the lock (reentrant: one derived value may be made from another)."""
        with _DERIVED_LOCK:
            if key not in self._derived:
                self._derived[key] = make()
            return self._derived[key]

    def has_derived(self, key) -> bool:
        """Whether :meth:`derived` has made ``key`` (info's "built" counts; never waits)."""
        return key in self._derived

    def embedding_table(self):
        """The token embedding rows as a contiguous float32 numpy array (vocab, hidden): what the
        OT embedding retrieval (protocols/ot/embedding.py) serves."""
        return self.derived(("load", "embedding_np"),
                            lambda: self.weights["embed"].detach().to("cpu", torch.float32).contiguous().numpy())

    def fingerprint(self) -> str:
        """sha256 of the config and every weight (name, dtype, shape, bytes): equal iff same model."""
        if self._fingerprint is None:
            h = hashlib.sha256(b"shardlm-model-v1\0")
            h.update(self.config.canonical_json().encode())
            for name in sorted(self.weights):
                t = self.weights[name].detach().to("cpu").contiguous()
                h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
                h.update(t.view(torch.uint8).reshape(-1).numpy().data if t.numel() else b"")
            self._fingerprint = "sha256:" + h.hexdigest()
        return self._fingerprint


# --- Hugging Face names -> canonical names ---------------------------------------------------
_LLAMA_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    **{f"self_attn.{p}_proj.{kind}": f"{p}.{kind}" for p in "qkvo" for kind in ("weight", "bias")},
    **{f"mlp.{p}_proj.{kind}": f"{p}.{kind}" for p in ("gate", "up", "down") for kind in ("weight", "bias")},
}
_GPT2_LAYER = {"ln_1": "attn_norm", "ln_2": "mlp_norm", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"}
# Buffers some checkpoints carry that are not weights.
_IGNORED = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


def canonical_weights(c: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        if _IGNORED.fullmatch(name):
            continue
        if c.family == "gpt2":
            _gpt2_tensor(name.removeprefix("transformer."), t, out)
        else:
            out[_llama_name(name)] = t
    if c.tie_embeddings:
        out.pop("lm_head.weight", None)  # some tied checkpoints still store a copy
    return out


def _llama_name(name: str) -> str:
    top = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm.weight",
           "lm_head.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LLAMA_LAYER:
        return f"layers.{m.group(1)}.{_LLAMA_LAYER[m.group(2)]}"
    raise ModelError(f"unexpected tensor {name!r} for this architecture")


def _gpt2_tensor(name: str, t: torch.Tensor, out: dict) -> None:
    top = {"wte.weight": "embed", "wpe.weight": "pos_embed", "ln_f.weight": "final_norm.weight",
           "ln_f.bias": "final_norm.bias", "lm_head.weight": "lm_head.weight"}
    if name in top:
        out[top[name]] = t
        return
    m = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name)
    if not m:
        raise ModelError(f"unexpected tensor {name!r} for gpt2")
    layer, module, kind = m.groups()
    p = f"layers.{layer}"
    # GPT-2's Conv1D stores weights as (in, out): transpose to the (out, in) of a linear op.
    if module == "attn.c_attn":  # q, k and v side by side in one (in, 3*hidden) matrix
        parts = (t.t() if kind == "weight" else t).chunk(3, dim=0)
        for proj, part in zip("qkv", parts):
            out[f"{p}.{proj}.{kind}"] = part.contiguous()
    elif module in _GPT2_LAYER:
        is_linear = module not in ("ln_1", "ln_2")
        out[f"{p}.{_GPT2_LAYER[module]}.{kind}"] = t.t().contiguous() if is_linear and kind == "weight" else t
    else:
        raise ModelError(f"unexpected tensor {name!r} for gpt2")


def check_weights(plan: Plan, weights: dict[str, torch.Tensor], where: str) -> None:
    expected = plan.weight_shapes()
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelError(f"{where}: missing tensor(s) {', '.join(missing[:5])}{more}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ModelError(f"{where}: tensor {name} has shape {tuple(weights[name].shape)}, expected {shape}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ModelError(f"{where}: unexpected tensor(s) {', '.join(extra[:5])}")


def assemble(name: str, c: ModelConfig, hf: dict[str, torch.Tensor], tokenizer: Tokenizer | None,
             source: Path, device: str = "cpu") -> Model:
    plan = build_plan(c)
    weights = canonical_weights(c, hf)
    check_weights(plan, weights, str(source))
    weights = {k: v.to(device=device, dtype=torch.float32).contiguous() for k, v in weights.items()}
    if tokenizer is not None and tokenizer.vocab_size > c.vocab:
        raise ModelError(f"{source}: tokenizer has {tokenizer.vocab_size} tokens, the model only {c.vocab}")
    return Model(name, c, weights, tokenizer, plan, source)


# --- sources ---------------------------------------------------------------------------------
def _safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelError(f"{index}: not a safetensors index ({e})") from None
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise ModelError(f"{index}: names shard {f.name}, which is missing")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{d}: no *.safetensors weights")
    return files


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        raise ModelError(f"{path}: corrupt or truncated safetensors file: {e}") from None


def load_hf_dir(d: Path, device: str = "cpu", name: str | None = None) -> Model:
    c = read_config_json(d)
    hf: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(d):
        hf.update(read_safetensors(f))
    tok = Tokenizer.from_dir(d, c.eos_ids) if (d / "tokenizer.json").is_file() else None
    return assemble(name or d.name, c, hf, tok, d, device)


def load_gguf(path: Path, device: str = "cpu", progress: bool = False) -> Model:
    from .gguf_source import read_gguf

    cfg, hf, tok = read_gguf(path, progress)
    return assemble(path.stem, config_from_hf(cfg), hf, tok, path, device)


def load_client_dir(d: Path, device: str = "cpu") -> Model:
    """A client-only model (``client_only``): no linear weight, the full model's fingerprint."""
    e = client_dir.read(d, device)
    return Model(e.name, e.config, e.weights, e.tokenizer, e.plan, d, _fingerprint=e.fingerprint, client_only=True,
                 stored_encodings=e.encodings)


def load_model(spec: str, device: str = "cpu") -> Model:
    """`spec`: "smollm2" (fetched and converted on first use), an HF directory, a .gguf file, or
    an export-client directory (a client-only model: models/client_dir.py)."""
    if spec in KNOWN:
        return load_hf_dir(fetch(spec), device, name=spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if client_dir.is_client_dir(path):
            return load_client_dir(path, device)
        return load_hf_dir(path, device)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return load_gguf(path, device)
        raise ModelError(f"{path}: not a model (expected a Hugging Face directory or a .gguf file)")
    raise ModelError(f"no such model {spec!r}: not a known name ({', '.join(KNOWN)}) nor an existing path")
