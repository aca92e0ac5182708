"""Model configuration: one dataclass for every supported family, read from a Hugging Face
`config.json` (GGUF metadata is first translated into the same dict by models/gguf_source.py).

Families: llama (also SmolLM2, Llama 3), mistral and qwen2 share one decoder shape (RMSNorm,
RoPE, GQA, SwiGLU) and differ only in which linear ops carry biases and in defaults; gpt2 has
LayerNorm, GELU-tanh, learned positions and biases everywhere.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


class ModelError(Exception):
    """A model source cannot be used; the message names the problem (file, tensor, field)."""


LLAMA_LIKE = ("llama", "mistral", "qwen2")
FAMILIES = LLAMA_LIKE + ("gpt2",)


@dataclass(frozen=True)
class ModelConfig:
    family: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_positions: int
    norm_eps: float
    tie_embeddings: bool
    eos_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    rope_theta: float = 10000.0
    # Llama 3.1-style frequency scaling ("llama3"), or None for plain RoPE.
    rope_scaling: dict | None = field(default=None, hash=False)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    @property
    def norm(self) -> str:
        return "layer" if self.family == "gpt2" else "rms"

    @property
    def activation(self) -> str:
        return "gelu_tanh" if self.family == "gpt2" else "silu_gate"

    @property
    def uses_rope(self) -> bool:
        return self.family != "gpt2"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_ids"] = list(self.eos_ids)
        return d

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _need(cfg: dict, *keys, default=...):
    """The first of `keys` present in cfg; a ModelError naming them if none is and no default."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is ...:
        raise ModelError(f"config.json: missing field {' / '.join(keys)}")
    return default


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope(cfg: dict) -> tuple[float, dict | None]:
    # transformers >= 5 writes rope_parameters {rope_theta, rope_type, ...}; older files
    # write rope_theta and rope_scaling at the top level.
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in params]
        if missing:
            raise ModelError(f"config.json: llama3 rope scaling lacks {missing}")
        return theta, {"rope_type": "llama3", **{k: params[k] for k in keys}}
    raise ModelError(f"config.json: unsupported rope scaling type {kind!r} (supported: default, llama3)")


def config_from_hf(cfg: dict, extra_eos: tuple[int, ...] = ()) -> ModelConfig:
    """Translate a Hugging Face config.json dict; ModelError for anything we cannot run exactly."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        archs = cfg.get("architectures")
        raise ModelError(
            f"unsupported architecture: model_type={family!r} architectures={archs!r} "
            f"(supported: {', '.join(FAMILIES)})"
        )
    eos = tuple(dict.fromkeys(_ids(cfg.get("eos_token_id")) + tuple(extra_eos)))
    bos = cfg.get("bos_token_id")
    if family == "gpt2":
        return _gpt2_config(cfg, eos, bos)

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"config.json: unsupported hidden_act {act!r} for {family} (only silu)")
    hidden = int(_need(cfg, "hidden_size"))
    n_heads = int(_need(cfg, "num_attention_heads"))
    theta, scaling = _rope(cfg)
    attn_bias = bool(cfg.get("attention_bias", False))
    if family == "qwen2" and cfg.get("use_sliding_window"):
        raise ModelError("config.json: qwen2 use_sliding_window=true is not supported")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelError("config.json: partial_rotary_factor != 1 is not supported")
    return _checked(ModelConfig(
        family=family,
        n_layers=int(_need(cfg, "num_hidden_layers")),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=int(_need(cfg, "num_key_value_heads", default=n_heads)),
        head_dim=int(_need(cfg, "head_dim", default=hidden // n_heads)),
        ffn=int(_need(cfg, "intermediate_size")),
        vocab=int(_need(cfg, "vocab_size")),
        max_positions=int(_need(cfg, "max_position_embeddings", default=2048)),
        norm_eps=float(_need(cfg, "rms_norm_eps", default=1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_ids=eos,
        bos_id=bos if isinstance(bos, int) else None,
        rope_theta=theta,
        rope_scaling=scaling,
        # Qwen2 always biases q/k/v (never o); Llama's attention_bias covers q/k/v/o.
        qkv_bias=family == "qwen2" or attn_bias,
        o_bias=attn_bias and family != "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=cfg.get("sliding_window") if family == "mistral" else None,
    ))


def _gpt2_config(cfg: dict, eos: tuple[int, ...], bos) -> ModelConfig:
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ModelError(f"config.json: unsupported gpt2 activation_function {act!r} (only gelu_new)")
    for flag, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                     ("add_cross_attention", False)):
        if cfg.get(flag, ok) != ok:
            raise ModelError(f"config.json: gpt2 {flag}={cfg[flag]!r} is not supported")
    hidden = int(_need(cfg, "n_embd", "hidden_size"))
    n_heads = int(_need(cfg, "n_head", "num_attention_heads"))
    return _checked(ModelConfig(
        family="gpt2",
        n_layers=int(_need(cfg, "n_layer", "num_hidden_layers")),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=hidden // n_heads,
        ffn=int(_need(cfg, "n_inner", default=4 * hidden)),
        vocab=int(_need(cfg, "vocab_size")),
        max_positions=int(_need(cfg, "n_positions", "max_position_embeddings")),
        norm_eps=float(_need(cfg, "layer_norm_epsilon", default=1e-5)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        eos_ids=eos,
        bos_id=bos if isinstance(bos, int) else None,
        qkv_bias=True, o_bias=True, mlp_bias=True,
    ))


def _checked(c: ModelConfig) -> ModelConfig:
    for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "max_positions"):
        if getattr(c, name) <= 0:
            raise ModelError(f"config: {name} must be positive, got {getattr(c, name)}")
    if c.n_heads % c.n_kv_heads:
        raise ModelError(f"config: n_heads={c.n_heads} is not a multiple of n_kv_heads={c.n_kv_heads}")
    if c.uses_rope and c.head_dim % 2:
        raise ModelError(f"config: RoPE needs an even head_dim, got {c.head_dim}")
    return c


def read_config_json(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable JSON: {e}") from None
    extra: tuple[int, ...] = ()
    gen = directory / "generation_config.json"
    if gen.is_file():
        try:
            extra = _ids(json.loads(gen.read_text()).get("eos_token_id"))
        except ValueError:
            raise ModelError(f"{gen}: unreadable JSON") from None
    return config_from_hf(cfg, extra)
