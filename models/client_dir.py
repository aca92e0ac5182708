"""An export-client directory: what a masked client (v2, v3, v3-2r) needs of a model when its
mask material comes from elsewhere (HE or a dealer), and no linear weight matrix.

Written by ``shardlm models export-client`` (protocols/export.py supplies the encodings, which
models/ cannot compute: they are the protocols' business), read by ``load_model``:

- ``client.json``: the marker, with the format version, the full model's name, config and
  fingerprint (the server compares it at the handshake), whether the embedding table is in, the
  integer row-L1 bound of every unit encoding, and a sha256 per file below (a directory
  assembled from two exports would claim a fingerprint its tensors do not have);
- ``weights.safetensors``, by canonical name: norm gains and biases, each linear op's bias,
  learned positions (gpt2), the token embedding table unless exported without it (a tied LM
  head is that table: the client uses it only to embed), and for LayerNorm models the
  ``(W g, W beta)`` vectors precomposed units finish with (nonlinear.layer_norm_terms);
- ``encodings.safetensors``: each variant's per-unit row scales, exactly as the full model
  computes them (protocols/units.encoding_for);
- the tokenizer, when the model has one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig, ModelError
from .nonlinear import layer_norm_term_names, layer_norm_terms
from .plan import Embed, Plan, build_plan
from .tokenizer import Tokenizer

FORMAT = "shardlm-client-export"
VERSION = 1
MARKER = "client.json"
WEIGHTS = "weights.safetensors"
ENCODINGS = "encodings.safetensors"

# unit encodings: {variant: {unit: [(row scales, integer row-L1 bound), ...]}}
Encodings = dict[str, dict[str, list[tuple[torch.Tensor, int]]]]


def no_linear_weights(what: str, source) -> ModelError:
    return ModelError(f"{what}: {source} is an export-client directory: it holds no linear weight matrices; "
                      f"use --offline he or --offline dealer")


class ClientWeights(dict):
    """A client-only model's tensors. Asking for a linear weight matrix, or for the embedding
    table of an export made without it, is a ModelError naming the tensor, not a KeyError."""

    def __init__(self, tensors: dict[str, torch.Tensor], source, linear: set[str], embedding: str | None):
        super().__init__(tensors)
        self.source, self.linear, self.embedding = source, frozenset(linear), embedding

    def __missing__(self, key):
        if key == self.embedding:
            raise ModelError(f"{key}: {self.source} was exported without the token embedding table "
                             f"(--no-embedding): run the client with --embedding ot")
        if key in self.linear:
            raise no_linear_weights(key, self.source)
        raise KeyError(key)


def client_shapes(plan: Plan, embedding: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor an export holds, with its shape: the plan's tensors but its linear weights
    (bar the embedding, tied or not, when ``embedding``), plus the LayerNorm terms."""
    embeds = {s.weight for s in plan.steps if isinstance(s, Embed)}
    linear = {op.weight for op in plan.linears}
    shapes = {name: shape for name, shape in plan.weight_shapes().items()
              if (name in embeds and embedding) or (name not in embeds and name not in linear)}
    for op, _norm in _layer_norm_ops(plan):
        for name in layer_norm_term_names(op):
            shapes[name] = (op.out_dim,)
    return shapes


def _layer_norm_ops(plan: Plan):
    """(op, norm) of every op a precomposed unit finishes after a LayerNorm (fused or not)."""
    seen = {}
    for fuse in (True, False):
        for comp in plan.composites(fuse):
            if comp.norm.kind == "layer":
                seen.update({op.name: (op, comp.norm) for op in comp.then})
    return list(seen.values())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def write(model, out_dir, encodings: Encodings, *, embedding: bool = True) -> dict:
    """Write ``model``'s client subset to ``out_dir`` (new or empty). The marker goes last, so
    an interrupted export is not taken for a directory. Returns what was written."""
    d = Path(out_dir)
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise FileExistsError(f"{d} already exists and is not an empty directory; use a new one")
    d.mkdir(parents=True, exist_ok=True)
    plan, w = model.plan, model.weights
    terms = {}
    for op, norm in _layer_norm_ops(plan):
        terms.update(zip(layer_norm_term_names(op), layer_norm_terms(op, norm, w)))
    tensors = {name: (terms[name] if name in terms else w[name]).detach().to("cpu").contiguous()
               for name in client_shapes(plan, embedding)}
    save_file(tensors, str(d / WEIGHTS))
    save_file({f"{variant}/{unit}/{i}": scales.detach().to("cpu").contiguous()
               for variant, units in encodings.items() for unit, parts in units.items()
               for i, (scales, _) in enumerate(parts)}, str(d / ENCODINGS))
    if model.tokenizer is not None:
        model.tokenizer.save(d)
    files = sorted(p.name for p in d.iterdir())
    meta = {
        "format": FORMAT, "version": VERSION, "model": model.name, "model_fingerprint": model.fingerprint(),
        "config": model.config.to_dict(), "embedding": embedding,
        "l1_bounds": {variant: {unit: [int(l1) for _, l1 in parts] for unit, parts in units.items()}
                      for variant, units in encodings.items()},
        "files": {name: _sha256(d / name) for name in files},
    }
    (d / MARKER).write_text(json.dumps(meta, indent=1))
    return {"dir": str(d), "bytes": sum(p.stat().st_size for p in d.iterdir()), "tensors": len(tensors),
            "embedding": embedding, "variants": sorted(encodings), "model_fingerprint": meta["model_fingerprint"]}


def is_client_dir(d: Path) -> bool:
    return (d / MARKER).is_file()


@dataclasses.dataclass
class ClientExport:
    name: str
    config: ModelConfig
    plan: Plan
    weights: ClientWeights
    tokenizer: Tokenizer | None
    fingerprint: str
    encodings: Encodings


def read(d: Path, device: str = "cpu") -> ClientExport:
    """Read and check an export: its format, every file against its digest, every tensor's
    name and shape against the config's plan."""
    try:
        meta = json.loads((d / MARKER).read_text())
        if meta.get("format") != FORMAT:
            raise ModelError(f"{d / MARKER}: not a {FORMAT} marker")
        if meta.get("version") != VERSION:
            raise ModelError(f"{d}: export-client format version {meta.get('version')}, this shardlm reads {VERSION}")
        for name, digest in meta["files"].items():
            if not (d / name).is_file() or _sha256(d / name) != digest:
                raise ModelError(f"{d / name}: missing or altered since the export (its sha256 differs); export again")
        config = ModelConfig(**{**meta["config"], "eos_ids": tuple(meta["config"]["eos_ids"])})
        fingerprint, embedding, bounds = meta["model_fingerprint"], bool(meta["embedding"]), meta["l1_bounds"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{d / MARKER}: malformed export-client marker ({type(e).__name__}: {e})") from None
    plan = build_plan(config)
    tensors = load_file(str(d / WEIGHTS))
    expected = client_shapes(plan, embedding)
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != expected:
        wrong = sorted(set(got.items()) ^ set(expected.items()))[:5]
        raise ModelError(f"{d / WEIGHTS}: tensors do not match the config's plan: {wrong}")
    scales = load_file(str(d / ENCODINGS))
    try:
        encodings = {variant: {unit: [(scales[f"{variant}/{unit}/{i}"], l1) for i, l1 in enumerate(l1s)]
                               for unit, l1s in units.items()} for variant, units in bounds.items()}
    except KeyError as e:
        raise ModelError(f"{d / ENCODINGS}: no row scales {e} named in {MARKER}") from None
    embeds = {s.weight for s in plan.steps if isinstance(s, Embed)}
    weights = ClientWeights({k: v.to(device) for k, v in tensors.items()}, d, {op.weight for op in plan.linears},
                            None if embedding else next(iter(embeds)))
    tok = Tokenizer.from_dir(d, config.eos_ids) if (d / "tokenizer.json").is_file() else None
    return ClientExport(meta.get("model", d.name), config, plan, weights, tok, fingerprint, encodings)
