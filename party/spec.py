"""The protocol plug-in contract: what the runtime needs to know about a protocol, and nothing more.

A :class:`ProtocolSpec` is a light declaration (name, privacy, summary, declared options, the
module implementing it). The runtime (party/server, party/run, cli) works from specs alone and
never imports a protocol module by name: it is handed the specs (protocols/registry holds the
catalogue) and a spec imports its implementation on first use, so ``shardlm --help`` does not
load torch and every protocol.

An implementation module provides the functions of :class:`Implementation` (a module is a valid
implementation of a ``typing.Protocol``, as trio's stream ABCs are for classes). They receive the
spec first, so one module may implement several protocols (v2, v3 and v3-2r share one).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Protocol, runtime_checkable


class OptionError(ValueError):
    """A protocol option that the protocol does not declare, or a value it cannot take."""


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


@dataclasses.dataclass(frozen=True)
class Option:
    """One declared protocol option. ``kind`` is ``int``, ``float``, ``str`` or ``bool`` (an on/off
    CLI flag; ``NAME=true|false`` in a bench entry); ``choices`` restricts a ``str``, ``lo``/``hi``
    bound a number. The CLI flag is ``--NAME`` with dashes (``flag`` overrides it) and reads
    ``env`` when set."""

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    lo: float | None = None
    hi: float | None = None
    env: str | None = None
    flag: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def convert(self, value: Any) -> Any:
        """A value from the command line, the environment or a caller, checked; None keeps None."""
        if value is None:
            return None
        try:
            if self.kind is bool and not isinstance(value, bool):  # bool("false") would be True
                if str(value).lower() not in _BOOLS:
                    raise ValueError(value)
                v = _BOOLS[str(value).lower()]
            else:
                v = self.kind(value)
        except (TypeError, ValueError):
            raise OptionError(f"{self.cli_flag}: {value!r} is not a valid {self.kind.__name__}") from None
        if self.choices is not None and v not in self.choices:
            raise OptionError(f"{self.cli_flag}: {v!r} is not one of {', '.join(self.choices)}")
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            raise OptionError(f"{self.cli_flag}: {v!r} is outside [{self.lo}, {self.hi}]")
        return v


@runtime_checkable
class ServerHandler(Protocol):
    """Per session on the server: accepts ``message_types`` after the handshake; ``handle`` may
    reply and may run a multi-message sub-protocol on the session's channel. An optional
    ``close()`` runs when the session ends."""

    message_types: frozenset

    async def handle(self, message) -> None: ...


@runtime_checkable
class ProtocolClient(Protocol):
    """The client side of one session, driven by party/generation. Optional: ``async setup()``
    (before the prompt is used), ``async generate(prompt_ids, max_tokens, sampling, stop_ids,
    on_token=, channel=)`` (its own decoding loop), ``notes``, ``protocol_stats`` and
    ``verification`` (a dict when it checks the server's replies: protocols/verify); for
    ``--draft`` (party/speculative) ``async forward_rows(ids)`` (every row's logits) and
    ``rollback(length)`` (its KV cache back to ``length`` positions)."""

    offline_ms: float
    timings: dict

    def new_cache(self, capacity: int): ...

    async def forward(self, ids: list[int]): ...


@runtime_checkable
class Implementation(Protocol):
    """What a protocol's implementation module provides: ``server_handler``; for a protocol that
    generates text (``runs_generation``) also ``client(spec, channel, model, *, prompt_tokens,
    max_tokens, session_id, progress, **declared_options) -> ProtocolClient`` (``session_id``:
    HELLO_OK's, for protocols that bind to the session). Optional, by name:
    ``server_info(spec, server, request) -> dict`` (merged into the protocol's INFO entry),
    ``deal(spec, model, tokens, progress) -> store`` (mask material ahead of time, for
    ``shardlm preprocess``), ``preload(spec, server, progress) -> dict`` (build in a worker thread
    at start-up what sessions would build on first use, calling ``progress(done, total)``; its
    summary goes to health: party/preload.py) and ``matrices_built(spec, server) -> {"built",
    "total"}`` (how much of that this process holds, for info and health)."""

    def server_handler(self, spec: "ProtocolSpec", session) -> ServerHandler: ...


@dataclasses.dataclass(frozen=True)
class ProtocolSpec:
    name: str
    private: bool
    summary: str
    # the implementing module (shardlm.protocols....); None: no messages of its own (echo)
    module: str | None = None
    needs_model: bool = False
    options: tuple[Option, ...] = ()
    # offered only by `shardlm dealer`, never by `serve`, and generates nothing: a server that
    # dealt the masks would know r and could unmask every x - r it receives
    dealer: bool = False
    # the server's --session-ttl times this for the protocol's sessions (v3-mpc's and v3-ot's tokens
    # take seconds to a minute: a default 300 s TTL would end a 16-token generation)
    session_ttl_scale: float = 1.0

    @property
    def warning(self) -> str | None:
        """What a non-private protocol exposes, said wherever it runs."""
        return None if self.private else f"NOT PRIVATE: {self.summary}"

    def implementation(self) -> Implementation | None:
        if self.module is None:
            return None
        impl = importlib.import_module(self.module)
        if not isinstance(impl, Implementation):
            raise TypeError(f"{self.module} does not implement the protocol contract (party/spec.Implementation)")
        return impl

    def hook(self, name: str) -> Callable | None:
        """An optional function of the implementation (``server_info``, ``deal``), or None."""
        impl = self.implementation()
        return getattr(impl, name, None) if impl is not None else None

    @property
    def runs_generation(self) -> bool:
        return self.module is not None and self.needs_model and not self.dealer

    def server_handler(self, session) -> ServerHandler | None:
        impl = self.implementation()
        return impl.server_handler(self, session) if impl is not None else None

    def declared(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def resolve_options(self, given: dict | None) -> dict:
        """``given`` checked against the declared options, with the defaults filled in: an
        option this protocol does not declare is an error, never silently dropped."""
        given = dict(given or {})
        unknown = sorted(set(given) - {o.name for o in self.options})
        if unknown:
            raise OptionError(f"protocol {self.name} takes no option {', '.join(unknown)}"
                              + (f" (it takes: {', '.join(o.name for o in self.options)})" if self.options else ""))
        return {o.name: o.convert(given[o.name]) if o.name in given else o.default for o in self.options}

    def client(self, channel, model, *, prompt_tokens: int, max_tokens: int, session_id: str,
               progress: Callable | None = None, options: dict | None = None) -> ProtocolClient:
        impl = self.implementation()
        if impl is None or not self.runs_generation:
            raise OptionError(f"protocol {self.name} does not generate text")
        return impl.client(self, channel, model, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                           session_id=session_id, progress=progress, **self.resolve_options(options))


def takers(specs, option: str) -> list[str]:
    """The names of the protocols in ``specs`` that declare ``option``."""
    return [s.name for s in specs if s.declared(option) is not None]
