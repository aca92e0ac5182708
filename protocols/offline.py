"""Who computes ``W r``: the offline modes (DESIGN.md section 12), as sources of mask material.

- ``client``: the client itself, with its own copy of the weights (fast; trusts nobody; needs
  the weight matrices and the model's FLOPs).
- ``he``: the server, on the client's encrypted masks (protocols/he): trusts nobody, and the
  client holds no weight matrix; costs the server ~tens of times the plaintext product.
- ``dealer``: a third process the client trusts (``shardlm dealer``, protocols/dealer): fast,
  the client holds no weight matrix; **the dealer and the server must not collude** (a dealer
  that also saw the server's view would unmask every activation).

Every source returns the same thing, a protocols/preprocess.MaterialStore (per unit a mask seed
and the exact products), so the online phase does not know where its material came from.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import trio

from ..wire.msgtypes import MsgType
from . import preprocess
from .he import service as he
from .units import FIXED_POINT, blocks, matrices_for, units_for

MODES = ("client", "he", "dealer")
DEALER_NOTE = "the dealer and the server must not collude: a dealer that also sees the server's view unmasks everything"


def deal_locally(model, variant: str, rows: dict[str, int], progress=None) -> preprocess.MaterialStore:
    """The ``client`` mode: this process draws the masks and multiplies them by its own weights."""
    return preprocess.deal(matrices_for(model, variant), rows, model_fingerprint=model.fingerprint(),
                           variant=variant, fx=FIXED_POINT, progress=progress)


class ClientSource:
    mode = "client"

    def __init__(self, model, variant: str):
        self.model, self.variant = model, variant
        self.costs: dict = {}

    async def deal(self, rows: dict[str, int], progress=None) -> preprocess.MaterialStore:
        t0 = time.process_time()  # the process's: torch may multiply on several threads
        # in a worker thread: seconds of products must not stall this process's other sessions
        # (the load test runs many in one event loop; a stalled one misses the handshake timeout)
        store = await trio.to_thread.run_sync(deal_locally, self.model, self.variant, rows, progress)
        self.costs["client_cpu_s"] = self.costs.get("client_cpu_s", 0.0) + time.process_time() - t0
        return store


class HESource:
    """``he``: over the session's own channel; the server computes under the client's key."""

    mode = "he"

    def __init__(self, channel, model, variant: str):
        self.channel, self.model, self.variant = channel, model, variant
        self.units = units_for(model.plan, variant)
        self.encryptor = None  # the key is made on first use (set-up sends the parameters)
        self.server_cpu_s = 0.0

    @property
    def costs(self) -> dict:
        if self.encryptor is None:
            return {}
        c = self.encryptor.costs
        c.server_cpu_s = self.server_cpu_s
        return c.as_dict()

    async def _setup(self) -> None:
        self.encryptor = he.Encryptor()
        reply = await self.channel.request(MsgType.HE_SETUP, {"params": he.bfv.parameters()}, MsgType.HE_SETUP_OK)
        he.HE_SETUP_OK.check(reply)

    async def deal(self, rows: dict[str, int], progress=None) -> preprocess.MaterialStore:
        t0 = time.perf_counter()
        if self.encryptor is None:
            await self._setup()
        pools = {}
        for i, (name, n) in enumerate(rows.items()):
            unit = self.units[name]
            seed = preprocess.new_seed()
            r = preprocess.ring.mask_rows(seed, 0, n, unit.in_dim).numpy()
            wr = np.empty((n, unit.out_dim), np.int64)
            for b, (i0, ni, o0, no) in enumerate(blocks(unit)):
                step = he.rows_per_request(ni, no, n)
                for at in range(0, n, step):
                    part = r[at:at + step, i0:i0 + ni]
                    p, cts = self.encryptor.encrypt(part, no)
                    reply = await self.channel.request(
                        MsgType.HE_PRODUCT, {"unit": name, "block": b, "rows": part.shape[0], "cts": cts},
                        MsgType.HE_PRODUCT_OK)
                    body = he.HE_PRODUCT_OK.check(reply, cts=p.cts_down, ct_bytes=he.reply_bytes(p))
                    self.server_cpu_s += body["cpu_us"] / 1e6
                    wr[at:at + step, o0:o0 + no] = self.encryptor.decrypt(p, body["cts"])
            pools[name] = preprocess.Pool(seed, unit.in_dim, torch.from_numpy(wr), n)
            if progress is not None:
                progress(f"offline (he): mask products {i + 1}/{len(rows)} units", i + 1 == len(rows))
        meta = preprocess.material_meta({n: (self.units[n].in_dim, self.units[n].out_dim) for n in rows}, rows,
                                        model_fingerprint=self.model.fingerprint(), variant=self.variant,
                                        fx=FIXED_POINT, dealer_seconds=time.perf_counter() - t0, source="he",
                                        mask_shift=he.SHIFT)
        return preprocess.MaterialStore(meta, pools)


class DealerSource:
    """``dealer``: fetched from a ``shardlm dealer`` over TLS, pinned (protocols/dealer)."""

    mode = "dealer"

    def __init__(self, model, variant: str, address: str, fingerprint: str | None, server_fingerprint: str | None):
        self.model, self.variant = model, variant
        self.address, self.fingerprint, self.server_fingerprint = address, fingerprint, server_fingerprint
        self.costs: dict = {}

    async def deal(self, rows: dict[str, int], progress=None) -> preprocess.MaterialStore:
        from .dealer import fetch

        t0 = time.thread_time()
        store = await fetch(self.address, self.fingerprint, model_fingerprint=self.model.fingerprint(),
                            variant=self.variant, rows=rows, plan=self.model.plan, progress=progress,
                            server_fingerprint=self.server_fingerprint)
        self.costs["client_cpu_s"] = self.costs.get("client_cpu_s", 0.0) + time.thread_time() - t0
        self.costs["dealer_s"] = self.costs.get("dealer_s", 0.0) + store.meta["dealer_seconds"]
        for k in ("sent", "received"):  # the dealer connection's traffic (not on the session's channel)
            self.costs[f"bytes_{k}"] = self.costs.get(f"bytes_{k}", 0) + store.meta["dealer_bytes"][k]
        return store
