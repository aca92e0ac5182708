"""``--protocol auto``: pick the private protocol (v3 or v3-2r) and the draft length for the link.

The client measures the link before it says which protocol it wants (party/client.probe_link:
small PINGs for the RTT, one echoed 256 KiB PING for the bandwidth; the server answers PING
before HELLO), then predicts the seconds per generated token of every candidate and opens the
session with the fastest. The prediction, per decode forward of K+1 rows (K drafts):

    t_forward = rounds * rtt + bytes(K) / bandwidth + compute(K)
    t_token   = t_forward / tokens_per_forward(K)

- ``rounds``: one per offload unit (v3: 4L+1, v3-2r: 2L+2), exact, from the model's plan.
- ``bytes(K)``: (K+1) rows of every unit's masked input (8 bytes per element) and reply (the
  unit's reply bits: 64, or the low bits when the model's units declare them), exact from the
  unit shapes; framing is ignored.
- ``compute(K)``: the server's products and the client's own work, proportional to the weights
  a forward streams: SECONDS_PER_WEIGHT per weight of v3's units (v3-2r's composed units stream
  more), times (1 + ROW_COST * K) for the extra rows. The constants were measured on these
  machines (README: SmolLM2 v3 5.07 tok/s and v3-2r 4.16 tok/s on an idle loopback; a decode
  forward of 5 rows took about as long as one of 1 row in the speculative-decoding benchmark, where
  decode is memory-bound). A faster server makes compute smaller, which
  favours more rounds saved (v3-2r) and more rows (longer drafts); the model is deliberately
  simple and its inputs and outputs are reported (``--json``: ``auto``), so a wrong choice shows.
- ``tokens_per_forward(K)``: with each draft accepted with probability ``a`` independently,
  (1 - a^(K+1)) / (1 - a). The acceptance is not known before generating. ACCEPTANCE is a fixed
  prior between what lookup drafts reached on SmolLM2 with K = 4 on a chat prompt (1.11 tokens
  per forward: a ~ 0.1) and on an edit prompt (3.55: a ~ 0.85); ``--draft`` / ``--draft-len``
  given by the user fix those choices instead.

What auto costs in privacy: nothing beyond the chosen protocol's own leak. The link probe carries
no prompt data, and the choice (which the server sees: the protocol name and K+1 rows per
forward) depends only on the link and the model, never on the prompt: estimating the acceptance
from the prompt's own repetitiveness would choose better, and would tell the server something
about the prompt.
"""

from __future__ import annotations

import dataclasses

from ..party.drafting import MAX_DRAFT_LEN
from .units import blocks, units_for

CANDIDATES = ("v3", "v3-2r")
DRAFT_LENS = (0, 1, 2, 4, 8)  # 0: no drafts
# Seconds of compute per weight a v3 decode forward streams (server products + client work),
# from SmolLM2 v3 at 5.07 tok/s on an idle loopback with 134 M weights in its units.
SECONDS_PER_WEIGHT = 1.47e-9
# v3-2r's composed units: measured 4.16 tok/s against v3's 5.07 on the same run (1.22x the time),
# less than the weight ratio (~1.9x): the client's share of the work does not grow.
V3_2R_COMPUTE = 1.22
ROW_COST = 0.05  # each extra row of a decode forward: +5% of a one-row forward (memory-bound products)
ACCEPTANCE = 0.5  # prior per-draft acceptance of lookup drafts (SmolLM2: ~0.1 on chat, ~0.85 on edits)
REPLY_BYTES = 8  # per product element when a unit declares nothing narrower


@dataclasses.dataclass(frozen=True)
class Choice:
    protocol: str
    draft_len: int  # 0: no drafts
    seconds_per_token: float
    rounds: int
    bytes_per_forward: int
    tokens_per_forward: float


def tokens_per_forward(k: int, acceptance: float) -> float:
    if k == 0:
        return 1.0
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def predict(model, protocol: str, k: int, rtt: float, bandwidth: float, acceptance: float = ACCEPTANCE,
            reply_bytes=None) -> Choice:
    """Seconds per generated token of ``protocol`` with ``k`` drafts on a link of ``rtt`` seconds
    and ``bandwidth`` bytes/s. ``reply_bytes(unit)``: bytes per reply element (default 8)."""
    units = units_for(model.plan, protocol)
    rows = k + 1
    size = (lambda u: REPLY_BYTES) if reply_bytes is None else reply_bytes
    nbytes = rows * sum(u.in_dim * 8 + u.out_dim * size(u) for u in units.values())
    v3_weights = sum(ni * no for u in units_for(model.plan, "v3").values() for _, ni, _, no in blocks(u))
    compute = SECONDS_PER_WEIGHT * v3_weights * (V3_2R_COMPUTE if protocol == "v3-2r" else 1.0) * (1 + ROW_COST * k)
    t_forward = len(units) * rtt + nbytes / bandwidth + compute
    per = tokens_per_forward(k, acceptance)
    return Choice(protocol, k, t_forward / per, len(units), nbytes, per)


def draft_lens(options: dict) -> tuple[int, ...]:
    """The draft lengths auto may choose from, given the user's own ``--draft`` / ``--draft-len``."""
    if options.get("draft") == "none":
        return (0,)
    if options.get("draft_len"):
        return (int(options["draft_len"]),)
    return DRAFT_LENS[1:] if options.get("draft") else DRAFT_LENS


def choose(model, rtt: float, bandwidth: float, *, lens: tuple[int, ...] = DRAFT_LENS,
           acceptance: float = ACCEPTANCE, reply_bytes=None) -> tuple[Choice, list[Choice]]:
    """The fastest candidate and all of them (fastest first)."""
    cands = [predict(model, p, min(k, MAX_DRAFT_LEN), rtt, bandwidth, acceptance, reply_bytes)
             for p in CANDIDATES for k in lens]
    cands.sort(key=lambda c: c.seconds_per_token)
    return cands[0], cands


def options_for(choice: Choice, options: dict) -> dict:
    """The chosen protocol's options: the user's, with the draft choice filled in (lookup drafts
    unless the user named a kind)."""
    out = dict(options)
    if choice.draft_len:
        out["draft"] = options.get("draft") or "lookup"
        out["draft_len"] = choice.draft_len
    else:
        out["draft"] = "none"
    return out


def report(choice: Choice, cands: list[Choice], link: dict) -> dict:
    """What ``--json`` says under ``auto``: the measured link, the choice and why (every candidate)."""
    def row(c: Choice) -> dict:
        return {"protocol": c.protocol, "draft_len": c.draft_len, "predicted_s_per_token": round(c.seconds_per_token, 4),
                "rounds_per_forward": c.rounds, "bytes_per_forward": c.bytes_per_forward,
                "tokens_per_forward": round(c.tokens_per_forward, 3)}
    return {"link": {"rtt_ms": round(link["rtt"] * 1e3, 3), "bandwidth_mbit": round(link["bandwidth"] * 8 / 1e6, 1),
                     "probe_ms": round(link["probe_seconds"] * 1e3, 1)},
            "chose": row(choice), "candidates": [row(c) for c in cands],
            "model": {"seconds_per_weight": SECONDS_PER_WEIGHT, "v3_2r_compute": V3_2R_COMPUTE, "row_cost": ROW_COST,
                      "acceptance_prior": ACCEPTANCE},
            "why": (f"{choice.protocol}" + (f" with {choice.draft_len} drafts" if choice.draft_len else " without drafts")
                    + f": predicted {choice.seconds_per_token:.3f} s per token at RTT {link['rtt'] * 1e3:.1f} ms and "
                      f"{link['bandwidth'] * 8 / 1e6:.0f} Mbit/s, the lowest of {len(cands)} candidates")}
