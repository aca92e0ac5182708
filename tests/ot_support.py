"""Helpers for the OT tests: run two parties over an in-memory stream pair (optionally through
netsim) and record what each party receives."""
from __future__ import annotations

import trio
import trio.testing

from shardlm.party.channel import Channel
from shardlm.wire import netsim


class RecordingChannel(Channel):
    """A Channel that keeps every message it receives: the party's view."""

    def __init__(self, stream, **kw):
        super().__init__(stream, **kw)
        self.view = []

    async def recv(self):
        msg = await super().recv()
        self.view.append(msg)
        return msg


def run_pair(party_a, party_b, net: str | None = None, record: bool = False, lockstep: bool = False):
    """Run ``party_a(channel)`` and ``party_b(channel)`` concurrently; return (result_a,
    result_b, channel_a, channel_b). ``net`` simulates a link on a's side; ``lockstep`` uses
    streams without any buffer (every send waits for the peer to read: deadlocks show)."""
    out = {}

    async def main():
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        sa, sb = pair()
        spec = netsim.parse_netspec(net) if net else None
        async with netsim.simulate(sa, spec) as sa2:
            kind = RecordingChannel if record else Channel
            ca, cb = kind(sa2), kind(sb)
            out["ca"], out["cb"] = ca, cb

            async def a():
                out["a"] = await party_a(ca)

            async def b():
                out["b"] = await party_b(cb)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(a)
                nursery.start_soon(b)

    trio.run(main)
    return out["a"], out["b"], out["ca"], out["cb"]


def run_ext(on_sender, on_receiver, **kw):
    """run_pair for two parties that first set up IKNP: ``on_sender(channel, IknpSender)`` and
    ``on_receiver(channel, IknpReceiver)`` return awaitables."""
    from shardlm.protocols.ot.iknp import IknpReceiver, IknpSender

    async def a(ch):
        return await on_sender(ch, await IknpSender.setup(ch))

    async def b(ch):
        return await on_receiver(ch, await IknpReceiver.setup(ch))

    return run_pair(a, b, **kw)
