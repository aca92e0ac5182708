"""``shardlm models export-client``: a model's client-only subset (models/client_dir.py) with the
public unit encodings of every masked variant, for a client whose mask material comes from HE
or a dealer and which therefore holds no linear weight matrix (issue 18, DESIGN.md s12).

The encodings live here rather than in models/: they are what protocols/units.py computes from
the weights (models/ may not import protocols), stored so the client decodes bit for bit as it
would with the full model.
"""

from __future__ import annotations

from ..models import client_dir
from .units import FUSED, encoding_for


def export_client(model, out_dir, *, embedding: bool = True, progress=None) -> dict:
    """Write the client subset of ``model`` to ``out_dir`` (new or empty); ``embedding=False``
    leaves the token embedding table out (for ``--embedding ot``). Returns what was written."""
    encodings = {}
    for i, variant in enumerate(FUSED):
        encodings[variant] = encoding_for(model, variant)
        if progress is not None:
            progress(f"export-client: unit encodings {i + 1}/{len(FUSED)} ({variant})", False)
    out = client_dir.write(model, out_dir, encodings, embedding=embedding)
    if progress is not None:
        progress(f"export-client: wrote {out['dir']}", True)
    return out
