"""Protocol name -> what the server runs for a session of that protocol.

A protocol contributes a server-side session handler: an object with
``message_types`` (the MsgTypes it accepts after the handshake) and
``async handle(session, message)``. Session-level messages (PING, BYE) are handled by the
server itself for every protocol. Later protocols (plain, v2, v3, ...) register here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class ProtocolSpec:
    name: str
    private: bool
    summary: str
    # (server_session) -> handler; None for protocols with no messages of their own
    server_handler: Callable | None = None
    needs_model: bool = False


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


def offered(has_model: bool) -> dict[str, ProtocolSpec]:
    """The protocols a server can run: those needing a model only when it has one."""
    return {n: s for n, s in PROTOCOLS.items() if has_model or not s.needs_model}
