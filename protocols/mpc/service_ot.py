"""v3-ot's implementation module (party/spec.py's contract): v3-mpc's session (service.py) with
:class:`approx_lut.LutEngine` on both sides, OT triples and the 'wide' ranges, which are not
options here: nothing may come from a dealer, and the tables' inputs are clipped by comparisons."""

from __future__ import annotations

from . import service
from .service import deal, matrices_built, preload, server_handler  # noqa: F401 (the contract)


def client(spec, channel, model, *, prompt_tokens: int, max_tokens: int, progress=None, session_id: str,
           material: str | None, triple_batch: int | None) -> service.MPCClient:
    return service.client(spec, channel, model, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                          progress=progress, session_id=session_id, material=material,
                          triple_batch=triple_batch, triples="ot", mpc_ranges="wide")
