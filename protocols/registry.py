"""The catalogue of protocols: name -> :class:`~shardlm.party.spec.ProtocolSpec`.

Each entry declares what the runtime and the CLI need (privacy, summary, options) and names the
module that implements it; that module is imported only when a session of the protocol runs
(party/spec.py has the contract). The CLI builds its per-protocol options from the ``options``
here and rejects an option the chosen protocol does not declare.
"""

from __future__ import annotations

from ..party.drafting import DEFAULT_DRAFT_LEN, KINDS, MAX_DRAFT_LEN
from ..party.spec import Option, OptionError, ProtocolSpec
from .cc import SIMULATED_NOTE

# -- options, each declared once and shared by the protocols that take it ---------------------
MATERIAL = Option(
    "material", str, None, "Mask material made by `shardlm preprocess` (default: made now, reported as offline_ms).")
EMBEDDING = Option(
    "embedding_source", str, "local", choices=("local", "ot"), flag="--embedding",
    help="Look token embeddings up locally, or fetch the rows by 1-of-V oblivious transfer from the "
         "server (it learns nothing about which rows; costs the whole encrypted table per request: "
         "113 MB for SmolLM2).")
CC_TRUST = Option(
    "cc_trust", str, None, env="SHARDLM_CC_TRUST",
    help="The server's attestation signing key to trust, sha256:<fingerprint> (printed by `serve`) or "
         "ed25519:<hex>, or a file holding one. Without it v3-cc refuses to run.")
CC_WINDOW = Option(
    "cc_window", float, None, lo=1.0,
    help="Seconds an attestation report stays fresh (default 120).")
VERIFY = Option(
    "verify", bool, False,
    help="Check every product the server returns (Freivalds with 20 secret vectors per unit plus a range "
         "check: an altered reply passes with probability <= 2^-40) and abort the session at the first "
         "failure. Costs the client 20 (in + out) multiply-adds per row and unit.")
OFFLINE = Option(
    "offline_mode", str, "client", choices=("client", "he", "dealer"), flag="--offline", env="SHARDLM_OFFLINE",
    help="Who computes the mask products W r of the offline phase: 'client' (this process, with the weights), "
         "'he' (the server, on masks encrypted under the client's own BFV key: no weights on the client, "
         "trusts nobody, seconds of server CPU per token), or 'dealer' (a `shardlm dealer` process; the "
         "dealer and the server must not collude).")
DEALER = Option("dealer", str, None, env="SHARDLM_DEALER",
                help="--offline dealer: the dealer's HOST:PORT. It must not collude with the server.")
DEALER_FINGERPRINT = Option("dealer_fingerprint", str, None, env="SHARDLM_DEALER_FINGERPRINT",
                            help="--offline dealer: the dealer's certificate, sha256:<hex> (printed by `shardlm dealer`).")
DRAFT = Option(
    "draft", str, "none", choices=KINDS,
    help="Speculative decoding: draft K tokens and verify them in one forward of K+1 rows, committing 1..K+1 "
         "tokens per forward with output exactly as without drafts (greedy: the same tokens, up to float/"
         "fixed-point near-ties of batched rows; sampling: the same distribution). 'lookup': tokens that followed "
         "the context's last n-gram earlier in prompt + output (edits, quoting, code); 'jacobi': the previous "
         "forward's predictions. Fewer forwards (round trips) per token, K+1 times the rows (server work, "
         "bytes, mask material) per forward. LEAK: every forward carries K+1 rows, but the number of forwards "
         "tells the server how predictable the text was; --pad-to-max hides it (pads to max-tokens - 1 forwards).")
DRAFT_LEN = Option("draft_len", int, DEFAULT_DRAFT_LEN, lo=1, hi=MAX_DRAFT_LEN,
                   help=f"--draft: K, drafts per forward (rows per decode forward K+1; default {DEFAULT_DRAFT_LEN}).")
REPLY_BITS = Option(
    "reply_bits", str, "full", choices=("low", "full"), env="SHARDLM_REPLY_BITS",
    help="'low': ask the server for only the low bits of each product that the unit's public bound needs "
         "(59-60 of 64 on SmolLM2: ~8% fewer reply bytes, ~10 ms more CPU per decode step to pack and "
         "unpack; the activations keep ~5 fewer fractional bits, exact on the tests); 'full': all 64 bits "
         "(the default: on SmolLM2 low bits saved less on a 100 Mbit link than the packing cost).")
_MASKED_OPTIONS = (EMBEDDING, MATERIAL, VERIFY, OFFLINE, DEALER, DEALER_FINGERPRINT, DRAFT, DRAFT_LEN, REPLY_BITS)
SPLIT_LAYERS = Option("split_layers", int, 2, lo=1,
                      help="Blocks the client runs at each end (the server runs the rest). NOT private.")
JACOBI_BLOCK = Option("jacobi_block", int, 0, lo=0, hi=MAX_DRAFT_LEN + 1,
                      help="Older name: --jacobi-block B is --draft lookup --draft-len B-1 (0 or 1: none).")
JACOBI_ITERS = Option("jacobi_iters", int, None, lo=1,
                      help="--draft: Jacobi iterations before the carried guesses restart (default: never).")
TRIPLES = Option(
    "triples", str, "dealer", choices=("dealer", "ot"),
    help="Beaver triples from the client as trusted dealer (it could unmask; it owns the prompt), or made "
         "jointly by IKNP OT so nobody knows them (elementwise and matrix triples by Gilboa products, AND "
         "triples for the comparisons by random OT; slow).")
MPC_RANGES = Option(
    "mpc_ranges", str, "wide", choices=("wide", "narrow"),
    help="'wide' uses secure comparisons (exact softmax max, sigmoid clipping, rsqrt start; real models need "
         "it; AND triples from either --triples); 'narrow' skips them (accurate only for small models).")
TRIPLE_BATCH = Option(
    "triple_batch", int, None, lo=1, hi=1 << 22,
    help="Elementwise triples per pool, the first made before the prompt is used (default 2^21 with the "
         "dealer, 2^14 with ot: 128 correlated OTs each; with ot also the words of 64 AND bits per pool, "
         "128 random OTs each).")

_MASKED = "shardlm.protocols.masked"
# v3-mpc's and v3-ot's sessions live this many times the server's --session-ttl (SmolLM2: 5-250 s
# per token on loopback, ~55 s for v3-ot over 20 ms)
MPC_TTL_SCALE = 20.0
SPECS: tuple[ProtocolSpec, ...] = (
    ProtocolSpec("echo", private=True,  # carries no model data at all
                 summary="no inference: PING/PONG only, for connectivity, latency and throughput checks"),
    ProtocolSpec("ot", private=True, module="shardlm.protocols.ot.service",
                 summary="OT engine: IKNP batches (random / correlated / chosen) and private embedding-row retrieval"),
    ProtocolSpec("plain", private=False, needs_model=True, module="shardlm.protocols.plain", options=(DRAFT, DRAFT_LEN),
                 summary="INSECURE baseline: token ids in the clear, the server runs the whole model"),
    ProtocolSpec("v2", private=True, needs_model=True, module=_MASKED, options=_MASKED_OPTIONS,
                 summary="linear layers on the server over one-time-padded Z_2^64 inputs, one round per op "
                         "(7L+1/token); nonlinear layers and KV cache on the client"),
    ProtocolSpec("v3", private=True, needs_model=True, module=_MASKED, options=_MASKED_OPTIONS,
                 summary="as v2 with fused q/k/v and gate/up, batched prefill, resident weights (4L+1 rounds/token)"),
    ProtocolSpec("v3-2r", private=True, needs_model=True, module=_MASKED, options=_MASKED_OPTIONS,
                 summary="as v3 with each residual projection precomposed with the next norm and projection "
                         "(o with gate/up, down with the next q/k/v): 2L+2 rounds/token for ~1.9x the server's "
                         "weight traffic; pays off when round trips are slow"),
    ProtocolSpec("v3-mpc", private=True, needs_model=True, module="shardlm.protocols.mpc.service",
                 options=(TRIPLES, MPC_RANGES, TRIPLE_BATCH, MATERIAL), session_ttl_scale=MPC_TTL_SCALE,
                 summary="every activation additively shared over Z_2^64; linear layers on the server's share "
                         "with preprocessed masks, nonlinear layers by Beaver-triple MPC (--triples dealer|ot); "
                         "approximate"),
    ProtocolSpec("v3-ot", private=True, needs_model=True, module="shardlm.protocols.mpc.service_ot",
                 options=(TRIPLE_BATCH, MATERIAL), session_ttl_scale=MPC_TTL_SCALE,
                 summary="as v3-mpc with nothing from a dealer: exp, the softmax's 1/x start, sigmoid, GELU and "
                         "the norms' rsqrt by lookup tables over 1-of-N OT, comparisons by the millionaires' "
                         "protocol over 1-of-16 OT, products by OT triples; approximate"),
    ProtocolSpec("v3-cc", private=True, needs_model=True, module="shardlm.protocols.cc.service",
                 options=(CC_TRUST, CC_WINDOW),
                 summary="whole model inside an attested enclave boundary (signed report over the client's nonce; "
                         "X25519 + XChaCha20-Poly1305 channel), 1 round/token; with the software provider: "
                         + SIMULATED_NOTE),
    ProtocolSpec("dealer", private=True, needs_model=True, module="shardlm.protocols.dealer", dealer=True,
                 summary="mask material (seeds and exact W r) for v2/v3/v3-2r clients, from a third party: offered "
                         "only by `shardlm dealer`; the dealer and the server must not collude"),
    ProtocolSpec("split", private=False, needs_model=True, module="shardlm.protocols.split",
                 options=(SPLIT_LAYERS, DRAFT, DRAFT_LEN, JACOBI_BLOCK, JACOBI_ITERS),
                 summary="layer-split inference (client: embedding, first and last k blocks, head; server: the "
                         "middle blocks and their KV cache); the server sees hidden states, which invert to the "
                         "prompt (shardlm audit)"),
)
PROTOCOLS: dict[str, ProtocolSpec] = {s.name: s for s in SPECS}


def get(name: str) -> ProtocolSpec:
    """The spec of ``name``; an unknown name is an :class:`OptionError` listing the known ones."""
    spec = PROTOCOLS.get(name)
    if spec is None:
        raise OptionError(f"unknown protocol {name!r}; choose from {', '.join(generating())}")
    return spec


def generating() -> list[str]:
    """The protocols that generate text (the choices of `generate`, `chat`, `bench`)."""
    return [s.name for s in SPECS if s.runs_generation]


def generator(name: str) -> ProtocolSpec:
    """The spec of ``name`` if it generates text; otherwise an :class:`OptionError` (`dealer`,
    `echo` and `ot` are services, not ways to generate)."""
    spec = get(name)
    if not spec.runs_generation:
        raise OptionError(f"protocol {name!r} does not generate text; choose from {', '.join(generating())}")
    return spec


def offered(has_model: bool) -> dict[str, ProtocolSpec]:
    """The protocols a server (`serve`) can run: those needing a model only when it has one, and
    never the dealer's (whoever deals the masks must not be the one receiving x - r)."""
    return {s.name: s for s in SPECS if (has_model or not s.needs_model) and not s.dealer}


def dealing() -> dict[str, ProtocolSpec]:
    """What `shardlm dealer` offers: the dealer protocol alone."""
    return {s.name: s for s in SPECS if s.dealer}


def options() -> list:
    """Every declared option, once each, in catalogue order (the CLI adds one flag per option)."""
    seen: dict[str, Option] = {}
    for s in SPECS:
        for o in s.options:
            seen.setdefault(o.name, o)
    return list(seen.values())


def parse_entry(text: str) -> tuple[str, ProtocolSpec, dict]:
    """A `bench --protocol` entry ``NAME[:OPTION=VALUE...]`` (e.g. ``v3-mpc:triples=ot``) ->
    (label, spec, its options): one run can compare settings of a protocol side by side. OPTION is
    a declared option's name (``triples``, ``mpc_ranges``; dashes allowed), checked as the flag
    itself would be."""
    name, *pairs = text.split(":")
    spec = generator(name)
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        option = spec.declared(key.replace("-", "_"))
        if not eq or option is None:
            raise OptionError(f"{text!r}: expected NAME:OPTION=VALUE with OPTION one of "
                              f"{', '.join(o.name for o in spec.options) or '(none: ' + name + ' takes no options)'}")
        options[option.name] = option.convert(value)
    return text, spec, options
