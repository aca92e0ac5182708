"""Protocol name -> what the server runs for a session of that protocol.

A protocol module calls :func:`register` at import time with a :class:`ProtocolSpec` whose
``server_handler(session)`` builds the per-session handler: an object with

- ``message_types``: the set of MsgTypes it accepts after the handshake, and
- ``async handle(message)``: called by the server loop for each such message; it may reply and
  may also ``recv``/``send`` further messages on ``session.channel`` itself (multi-message
  sub-protocols such as OT extension run to completion inside one call).

Session-level messages (PING, BYE) are handled by the server for every protocol. Protocol
modules are listed in ``_MODULES`` and imported on first use, so importing the registry never
drags in torch or a protocol's dependencies by accident.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

# Modules that register protocols when imported.
_MODULES: list[str] = ["shardlm.protocols.plain", "shardlm.protocols.masked", "shardlm.protocols.ot.service",
                      "shardlm.protocols.cc.service",
                       "shardlm.protocols.split", "shardlm.protocols.mpc_service"]


@dataclasses.dataclass(frozen=True)
class ProtocolSpec:
    name: str
    private: bool
    summary: str
    # (server_session) -> handler; None for protocols with no messages of their own
    server_handler: Callable | None = None
    needs_model: bool = False
    # (channel, model, *, prompt_tokens, max_tokens, material, progress, **options) -> a client
    # with new_cache(n), async forward(ids) -> logits, timings, offline_ms (party/generation.py);
    # optionally async setup() (run before the prompt is used) and async generate(prompt_ids,
    # max_tokens, sampling, stop_ids, on_token=, channel=) -> GenerationResult (its own loop).
    client_factory: Callable | None = None
    # (server, info_request_body) -> dict merged into this protocol's entry of the server's INFO
    # reply (e.g. v3-cc's provider, key and, on request, a signed attestation report)
    server_info: Callable | None = None


PROTOCOLS: dict[str, ProtocolSpec] = {}


def register(spec: ProtocolSpec) -> ProtocolSpec:
    if spec.name in PROTOCOLS:
        raise ValueError(f"protocol {spec.name!r} registered twice")
    PROTOCOLS[spec.name] = spec
    return spec


register(ProtocolSpec(
    name="echo",
    private=True,  # carries no model data at all
    summary="no inference: PING/PONG only, for connectivity, latency and throughput checks",
))


def load_all() -> dict[str, ProtocolSpec]:
    for module in _MODULES:
        importlib.import_module(module)
    return PROTOCOLS


def offered(has_model: bool) -> dict[str, ProtocolSpec]:
    """The protocols a server can run: those needing a model only when it has one."""
    load_all()
    return {n: s for n, s in PROTOCOLS.items() if has_model or not s.needs_model}
