"""`--offline dealer`: a third process deals the clients' mask material (DESIGN.md s2, s12).

`shardlm dealer -m MODEL` holds the model. For each request it draws fresh mask seeds from the
OS CSPRNG and returns them with the exact products ``W r``; the client then runs v2/v3/v3-2r
against the server with that material and needs no weight matrix to make it.

Trust: the dealer knows every mask ``r`` it deals. **The dealer and the server must not
collude**: a dealer that also sees the server's view (``x - r``) unmasks every activation, and
so the prompt. Hence `serve` never offers this protocol (registry.offered), a process offering
it offers nothing else (party/server), and :func:`fetch` refuses a dealer whose certificate is
the server's (a same-key check only: two certificates of one operator look like two parties).

Wire (after HELLO for protocol ``dealer``; a session may make several takes)::

    DEAL_REQ  {take: 16 random bytes, model_fingerprint, variant, rows: {unit: n}}
    DEAL_PART {unit, seed: 32 bytes, start, wr: int64 (k, out)}  rows start..start+k of a unit's W r
    DEAL_OK   {take, rows: {unit: n}, dealer_seconds}             the take is complete

Parts come unit by unit in the request's order, each unit's rows in order, at most PART_BYTES of
products per frame (far below any frame limit; the dealer holds one slice at a time, and a
session's TTL cancels between slices). A take is single use: the dealer remembers every take id
it has seen (for the process's life: a restarted dealer forgets them) and refuses a repeat with
``replay`` before computing anything, so a replayed request never returns material. Rows are
charged per unit against the session's capacity (its HELLO's max_seq_len, at most the dealer's
--max-seq-len), as the server charges the products they will meet.
"""

from __future__ import annotations

import secrets
import time

import numpy as np
import torch

from ..party.client import ClientConfig, ClientError, connect
from ..wire import tls
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.msgtypes import MsgType
from ..wire.schema import Bytes, Dict, Float, Int, Schema, Str, Tensor
from . import preprocess, ring
from .units import FIXED_POINT, FUSED, matrices_for, units_for

VARIANTS = tuple(FUSED)  # the masked protocols: v2, v3, v3-2r
TAKE_BYTES = 16
PART_BYTES = 4 << 20

DEAL_REQ = Schema("DEAL_REQ", take=Bytes(TAKE_BYTES), model_fingerprint=Str(), variant=Str(choices=VARIANTS),
                  rows=Dict(Str(), Int(1), lo=1))
DEAL_PART = Schema("DEAL_PART", unit=Str(choices="units"), seed=Bytes(ring.MaskPRG.SEED_BYTES), start=Int(0),
                   wr=Tensor("int64", ("rows", "out_dim")))
DEAL_OK = Schema("DEAL_OK", take=Bytes(TAKE_BYTES), rows=Dict(Str(), Int(1)), dealer_seconds=Float(0.0))


# -- dealer --------------------------------------------------------------------------------------
def _timed(fn, *args):
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


class DealerHandler:
    """Per session on the dealer: answers DEAL_REQ with DEAL_PARTs and a DEAL_OK."""

    message_types = frozenset({MsgType.DEAL_REQ})

    def __init__(self, session):
        self.session = session
        self.takes: set[bytes] = session.server.protocol_state("dealer", set)  # every take this process saw

    async def handle(self, msg) -> None:
        server, channel = self.session.server, self.session.channel
        req = DEAL_REQ.check(msg.body)
        if req["model_fingerprint"] != server.fingerprint:
            raise ProtocolError(ErrorCode.MODEL_MISMATCH, f"material asked for model {req['model_fingerprint']}; "
                                                          f"this dealer holds {server.fingerprint}")
        variant, rows = req["variant"], req["rows"]
        unknown = sorted(set(rows) - set(units_for(server.model.plan, variant)))
        if unknown:
            raise ProtocolError(ErrorCode.MALFORMED, f"DEAL_REQ 'rows' names units {unknown} that {server.model.name}'s "
                                                     f"{variant} does not have")
        if req["take"] in self.takes:
            raise ProtocolError(ErrorCode.REPLAY, f"take {req['take'].hex()} was made before; material is single-use: "
                                                  "ask again with a fresh take")
        for name, n in rows.items():
            self.session.charge(f"{name} mask rows", n)
        self.takes.add(req["take"])  # spent from here on, whatever happens next
        matrices = await server.compute(matrices_for, server.model, variant)  # built once per process
        seconds = 0.0
        for name, n in rows.items():
            W, seed = matrices[name], preprocess.new_seed()
            step = max(1, PART_BYTES // (8 * max(W.in_dim, W.out_dim)))
            self.session.check_memory(min(step, n) * (W.in_dim + 2 * W.out_dim) * 8, f"a slice of {name}'s material")
            for start in range(0, n, step):
                wr, s = await server.compute(_timed, preprocess.products, W, seed, start, min(step, n - start))
                seconds += s
                await channel.send(MsgType.DEAL_PART, {"unit": name, "seed": seed, "start": start, "wr": wr.numpy()})
        await channel.send(MsgType.DEAL_OK, {"take": req["take"], "rows": rows, "dealer_seconds": seconds})


def server_handler(spec, session) -> DealerHandler:
    return DealerHandler(session)


# -- client --------------------------------------------------------------------------------------
class DealerError(ClientError):
    """The dealer cannot be used: it is the server itself, or its reply is not what was asked."""

    def __init__(self, message: str):
        super().__init__(message, "dealer")


def _refuse_server(dealer_fp: str | None, server_fp: str | None) -> None:
    if dealer_fp and server_fp and tls.normalize_fingerprint(dealer_fp) == tls.normalize_fingerprint(server_fp):
        raise DealerError(f"the dealer's certificate {tls.normalize_fingerprint(dealer_fp)} is the server's: a "
                          "server that dealt the masks could unmask everything it receives; the dealer and the "
                          "server must be different, non-colluding parties")


async def fetch(address: str, fingerprint: str | None, *, model_fingerprint: str, variant: str,
                rows: dict[str, int], plan, progress=None, server_fingerprint: str | None = None,
                timeout: float = 300.0) -> preprocess.MaterialStore:
    """Single-use material from the dealer at ``address`` (TLS pinned to ``fingerprint``): per unit
    of ``plan``'s ``variant``, ``rows[unit]`` masks and their products, as an in-memory store.

    ``plan`` (the model's, models/plan: no weights needed) gives each unit's shape, which every
    part is checked against; the products themselves cannot be checked without the weights.
    ``server_fingerprint``: the server's certificate, which the dealer's must not be.
    ``timeout``: seconds to connect, and at most between two parts of the reply."""
    if variant not in VARIANTS:
        raise ValueError(f"the dealer deals for {', '.join(VARIANTS)}, not {variant!r}")
    units = units_for(plan, variant)
    rows = {str(n): int(k) for n, k in rows.items()}
    unknown = sorted(set(rows) - set(units))
    if unknown or not rows or min(rows.values()) < 1:
        raise ValueError(f"rows must map units of {variant} to positive counts; unknown: {unknown}")
    _refuse_server(fingerprint, server_fingerprint)
    take = secrets.token_bytes(TAKE_BYTES)
    async with connect(ClientConfig(server=address, fingerprint=fingerprint, timeout=timeout)) as conn:
        dealer_fp = tls.peer_fingerprint(conn.channel.stream)  # the pinned one
        await conn.open_session("dealer", model_fingerprint, max(rows.values()))
        conn.channel.recv_timeout = timeout
        await conn.channel.send(MsgType.DEAL_REQ, {"take": take, "model_fingerprint": model_fingerprint,
                                                   "variant": variant, "rows": rows})
        seeds: dict[str, bytes] = {}
        wr = {n: np.empty((k, units[n].out_dim), np.int64) for n, k in rows.items()}
        filled = dict.fromkeys(rows, 0)
        while (msg := await conn.channel.expect(MsgType.DEAL_PART, MsgType.DEAL_OK)).type == MsgType.DEAL_PART:
            part = DEAL_PART.check(msg.body, units=rows, out_dim=lambda f: units[f["unit"]].out_dim,
                                   rows=lambda f: (1, rows[f["unit"]] - f["start"]))
            name, start, k = part["unit"], part["start"], part["wr"].shape[0]
            if start != filled[name] or seeds.setdefault(name, part["seed"]) != part["seed"]:
                raise ProtocolError(ErrorCode.MALFORMED, f"DEAL_PART of {name} at row {start}: expected row "
                                                         f"{filled[name]} under the unit's one seed")
            wr[name][start:start + k] = part["wr"]
            filled[name] += k
            if progress is not None and filled[name] == rows[name]:
                done = sum(filled[n] == rows[n] for n in rows)
                progress(f"offline: mask material from the dealer {done}/{len(rows)} units", done == len(rows))
        ok = DEAL_OK.check(msg.body)
        if ok["take"] != take or ok["rows"] != rows or filled != rows:
            raise ProtocolError(ErrorCode.MALFORMED, f"DEAL_OK closes a take other than the one asked: {filled} "
                                                     f"rows received, {rows} asked")
        traffic = conn.channel.totals()
    pools = {n: preprocess.Pool(seeds[n], units[n].in_dim, torch.from_numpy(wr[n]), k) for n, k in rows.items()}
    meta = preprocess.material_meta({n: (units[n].in_dim, units[n].out_dim) for n in rows}, rows,
                                    model_fingerprint=model_fingerprint, variant=variant, fx=FIXED_POINT,
                                    dealer_seconds=ok["dealer_seconds"], source="dealer", dealer=address,
                                    dealer_fingerprint=dealer_fp,
                                    dealer_bytes={"sent": traffic.bytes_sent, "received": traffic.bytes_received})
    return preprocess.MaterialStore(meta, pools)
