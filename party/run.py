"""One private generation from the client's side: connect, handshake, offline phase, online phase.

Used by ``shardlm generate``, ``chat``, ``bench`` and ``demo``; returns everything they report
(text, ids, timings, bytes and rounds per phase, offline time).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from ..models.sampling import SamplingParams
from . import handshake
from .client import ClientConfig, connect
from .generation import GenerationResult, generate
from .spec import OptionError, ProtocolSpec
from .drafting import Drafting, session_rows
from .speculative import generate as speculative_generate


@dataclasses.dataclass
class RunReport:
    protocol: str
    private: bool
    session_id: str
    prompt_tokens: int
    result: GenerationResult
    offline_ms: float
    stats: dict  # phase -> PhaseStats.as_dict()
    notes: list = dataclasses.field(default_factory=list)  # what the protocol's guarantee rests on
    warning: str | None = None  # what a non-private protocol exposes
    protocol_stats: dict = dataclasses.field(default_factory=dict)  # a protocol's own counters (e.g. triples)
    verification: dict | None = None  # --verify: replies checked, setup_ms (within offline_ms), check_ms
    material_dealt_ms: float | None = None  # --material: the store's dealing time, ahead of this run
    offline: dict | None = None  # masked protocols: --offline mode and its costs (client/server CPU seconds, ...)
    auto: dict | None = None  # --protocol auto: the measured link, the choice and every candidate's prediction

    def as_dict(self, tokenizer=None) -> dict:
        r = self.result
        prefill, decode = self.stats.get("prefill", {}), self.stats.get("decode", {})
        out = {
            "protocol": self.protocol, "private": self.private, "session_id": self.session_id,
            "prompt_tokens": self.prompt_tokens, "token_ids": r.token_ids, "generated_tokens": len(r.token_ids),
            "stop_reason": r.stop_reason,
            "timing": {"embedding_ms": r.embedding_ms, "prefill_ms": r.prefill_ms, "decode_ms": r.decode_ms,
                       "total_ms": r.total_ms, "decode_tokens_per_s": r.decode_tokens_per_s},
            "offline_ms": self.offline_ms,
            "bytes_sent": sum(s["bytes_sent"] for s in self.stats.values()),
            "bytes_received": sum(s["bytes_received"] for s in self.stats.values()),
            "rounds": sum(s["rounds"] for s in self.stats.values()),
            "phases": self.stats,
            "per_decode_token": {
                k: (decode.get(k, 0) / r.decode_steps if r.decode_steps else None)
                for k in ("bytes_sent", "bytes_received", "rounds")
            },
            "prefill_rounds": prefill.get("rounds", 0),
            "notes": list(self.notes),
            "verify": self.verification is not None,
        }
        if self.verification is not None:
            out["verification"] = dict(self.verification)
        if r.drafting is not None:
            out["drafting"] = dict(r.drafting)
        if r.padded_steps:
            out["padding"] = {"steps": r.padded_steps, "ms": r.padding_ms}
        if self.protocol_stats:
            out["protocol_stats"] = self.protocol_stats
        if self.material_dealt_ms is not None:
            out["material_dealt_ms"] = self.material_dealt_ms
        if self.offline is not None:
            out["offline"] = dict(self.offline)
        if self.auto is not None:
            out["auto"] = dict(self.auto)
        if not self.private:
            out["warning"] = self.warning or "NOT PRIVATE"
        if tokenizer is not None:
            out["text"] = tokenizer.decode(r.token_ids, skip_special_tokens=True)
        return out


def summary(out: dict) -> str:
    """A report (:meth:`RunReport.as_dict`) as `generate --timing` and `demo` print it."""
    t = out["timing"]
    lines = [
        f"protocol {out['protocol']} ({'private' if out['private'] else out.get('warning') or 'NOT PRIVATE'}), "
        f"session {out['session_id']}",
        f"prompt {out['prompt_tokens']} tokens, generated {out['generated_tokens']} ({out['stop_reason']})",
        f"offline {out['offline_ms']:.0f} ms"
        + (f" (material dealt ahead of time in {out['material_dealt_ms']:.0f} ms)" if "material_dealt_ms" in out else "")
        + f" | prefill {t['prefill_ms']:.0f} ms | decode {t['decode_ms']:.0f} ms "
        f"({t['decode_tokens_per_s']:.2f} tok/s) | total {t['total_ms']:.0f} ms",
        f"bytes sent {out['bytes_sent']:,} received {out['bytes_received']:,} | rounds {out['rounds']} "
        f"(prefill {out['prefill_rounds']}, per decode token {out['per_decode_token']['rounds']})",
    ]
    if out.get("verification"):
        v = out["verification"]
        lines.append(f"verified {v['replies']} replies: checks {v['check_ms']:.0f} ms online, "
                     f"keys {v['setup_ms']:.0f} ms offline")
    if out.get("drafting"):
        d = out["drafting"]
        lines.append(f"drafts {d['draft']} K={d['draft_len']}: {d['decode_forwards']} decode forwards of "
                     f"{d['rows_per_forward']} rows, {d['tokens_per_forward'] or 0:.2f} tokens per forward")
    if out.get("padding"):
        lines.append(f"padding {out['padding']['steps']} dummy decode steps after the stop ({out['padding']['ms']:.0f} ms)")
    if out.get("auto"):
        lines.append(f"auto: {out['auto']['why']}")
    lines += [f"note: {n}" for n in out.get("notes", [])]
    if out.get("transcript"):
        lines.append(f"server transcript: {out['transcript']}")
    return "\n".join(lines)


def run_local(model, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
              on_token: Callable[[int], None] | None = None) -> dict:
    """``generate --local``: the plaintext reference in this process, no server; reported in the
    shape of :meth:`RunReport.as_dict` (no bytes, no rounds)."""
    from ..models.reference import generate as reference_generate

    t0 = time.perf_counter()
    out_ids = reference_generate(model, prompt_ids, max_tokens, sampling, on_token=on_token)
    ms = (time.perf_counter() - t0) * 1e3
    return {"protocol": "local", "private": True, "prompt_tokens": len(prompt_ids), "token_ids": out_ids,
            "text": model.tokenizer.decode(out_ids, skip_special_tokens=True),
            "timing": {"total_ms": ms}, "bytes_sent": 0, "bytes_received": 0, "rounds": 0, "offline_ms": 0.0}


# A phase that has run this long without a word gets a progress line, then one per interval.
QUIET_SECONDS = 2.0


def _phase_reporter(channel, progress: Callable[[str, bool], None]) -> Callable[[], None]:
    """A Channel.on_message hook: for a phase (setup, offline, prefill) that runs longer than
    QUIET_SECONDS, a line with its time, rounds and bytes so far (v3-mpc's prefill is thousands
    of rounds). Decoding is left alone: its tokens are the progress."""
    seen = {"phase": None, "since": 0.0, "said": 0.0}

    def on_message() -> None:
        now = time.monotonic()
        name = channel.phase_name
        if name != seen["phase"]:
            seen.update(phase=name, since=now, said=now)
        elif name not in ("decode", "padding") and now - seen["said"] >= QUIET_SECONDS:
            st = channel.stats.get(name)
            progress(f"{name}: {now - seen['since']:.0f} s, {st.rounds:,} rounds, "
                     f"{(st.bytes_sent + st.bytes_received) / 1e6:,.1f} MB so far", False)
            seen["said"] = now
    return on_message


async def run_generation(cfg: ClientConfig, model, spec: ProtocolSpec, prompt_ids: list[int], max_tokens: int,
                         sampling: SamplingParams, *, on_token: Callable[[int], None] | None = None,
                         progress: Callable | None = None, ignore_eos: bool = False,
                         options: dict | None = None, pad_to_max: bool = False,
                         choose: Callable[[dict], tuple] | None = None) -> RunReport:
    """``options``: the protocol's declared options (spec.options; any other is an OptionError,
    raised before connecting). ``pad_to_max``: hide where the completion stopped (generation.generate).
    ``choose(link) -> (spec, options, why)`` (``--protocol auto``): after connecting, the link is
    measured (Connection.probe_link, before HELLO) and ``choose`` picks the protocol and its options."""
    drafting = Drafting.from_options(spec.resolve_options(options))
    auto = None
    async with connect(cfg) as conn:
        if progress is not None:
            conn.channel.on_message = _phase_reporter(conn.channel, progress)
        if choose is not None:
            with conn.channel.phase("probe"):
                link = await conn.probe_link()
            spec, options, auto = choose(link)
            drafting = Drafting.from_options(spec.resolve_options(options))
        session = await conn.open_session(spec.name, model.fingerprint(), handshake.capacity_bucket(
            session_rows(len(prompt_ids), max_tokens, drafting)))
        channel = conn.channel
        with channel.phase("offline"):
            client = spec.client(channel, model, prompt_tokens=len(prompt_ids), max_tokens=max_tokens,
                                 session_id=session["session_id"], progress=progress, options=options)
            if hasattr(client, "setup"):  # a protocol's own set-up exchange (e.g. attestation)
                await client.setup()
        stops = () if ignore_eos else model.eos_ids
        # A protocol may bring its own decoding loop (e.g. Jacobi decoding); the default is
        # one forward per token.
        own_loop = getattr(client, "generate", None)
        if own_loop is not None and pad_to_max:
            raise OptionError(f"--pad-to-max: {spec.name} runs its own decoding loop, which does not pad")
        if own_loop is not None:
            result = await own_loop(prompt_ids, max_tokens, sampling, stops, on_token=on_token, channel=channel)
        elif drafting.on:  # several tokens per forward: party/speculative
            result = await speculative_generate(client, prompt_ids, max_tokens, sampling, stops, drafting,
                                                on_token=on_token, channel=channel, pad_to_max=pad_to_max,
                                                progress=progress)
        else:
            result = await generate(client, prompt_ids, max_tokens, sampling, stops, on_token=on_token,
                                    channel=channel, pad_to_max=pad_to_max, progress=progress)
        stats = {name: s.as_dict() for name, s in channel.stats.items() if name not in ("setup", "offline")
                 or s.messages_sent or s.messages_received}
    return RunReport(spec.name, spec.private, session["session_id"], len(prompt_ids), result, client.offline_ms, stats,
                     list(getattr(client, "notes", [])), warning=spec.warning,
                     protocol_stats=dict(getattr(client, "protocol_stats", {})),
                     verification=getattr(client, "verification", None),
                     material_dealt_ms=getattr(client, "material_dealt_ms", None),
                     offline=getattr(client, "offline", None), auto=auto)
