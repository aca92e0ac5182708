"""netsim: latency and bandwidth in user space, and the channel's round counter."""
import math

import numpy as np
import pytest
import trio
import trio.testing

from shardlm.party.channel import Channel
from shardlm.party.client import connect
from shardlm.wire import netsim
from shardlm.wire.msgtypes import MsgType

from support import tls_server


def test_parse_netspec():
    assert netsim.parse_netspec("rtt=50ms,bw=100mbit") == netsim.NetSpec(0.05, 100e6)
    assert netsim.parse_netspec("rtt=0.2s") == netsim.NetSpec(0.2, math.inf)
    assert netsim.parse_netspec("bw=512kbit").bandwidth == 512e3
    for bad in ["rtt=fast", "bw=10", "loss=1%", "bw=0mbit"]:
        with pytest.raises(ValueError):
            netsim.parse_netspec(bad)


async def _ping_pong(client_ch: Channel, server_ch: Channel, rounds: int, payload):
    async def server():
        for _ in range(rounds):
            msg = await server_ch.expect(MsgType.PING)
            await server_ch.send(MsgType.PONG, msg.body)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        for _ in range(rounds):
            await client_ch.request(MsgType.PING, {"data": payload}, MsgType.PONG)


def test_ten_round_ping_pong_at_50ms_rtt_over_memory_streams():
    async def main():
        a, b = trio.testing.memory_stream_pair()
        async with netsim.simulate(a, netsim.parse_netspec("rtt=50ms")) as slow:
            client, server = Channel(slow), Channel(b)
            t0 = trio.current_time()
            with client.phase("pingpong"):
                await _ping_pong(client, server, 10, b"x")
            return trio.current_time() - t0, client.stats["pingpong"], server.totals()

    elapsed, cstats, sstats = trio.run(main)
    assert elapsed >= 0.5
    assert cstats.rounds == 10 and sstats.rounds == 10
    assert cstats.messages_sent == 10 and cstats.messages_received == 10
    assert cstats.bytes_sent == sstats.bytes_received > 0


def test_ten_round_ping_pong_at_50ms_rtt_over_real_tls(tmp_path):
    async def main():
        async with tls_server(tmp_path) as (server, cfg):
            cfg.net = netsim.parse_netspec("rtt=50ms,bw=100mbit")
            async with connect(cfg) as conn:
                await conn.open_session("echo")
                t0 = trio.current_time()
                with conn.channel.phase("pingpong") as st:
                    for _ in range(10):
                        await conn.ping(b"hello")
                return trio.current_time() - t0, st.rounds

    elapsed, rounds = trio.run(main)
    assert elapsed >= 0.5
    assert rounds == 10


def test_bandwidth_cap_slows_a_bulk_transfer():
    data = np.zeros(250_000, dtype=np.uint8)  # 2 Mbit

    async def main():
        a, b = trio.testing.memory_stream_pair()
        async with netsim.simulate(a, netsim.parse_netspec("bw=10mbit")) as slow:
            client, server = Channel(slow), Channel(b)
            t0 = trio.current_time()
            await _ping_pong(client, server, 1, data)  # 2 Mbit each way at 10 Mbit/s
            return trio.current_time() - t0

    assert trio.run(main) >= 0.4


def test_an_error_in_a_simulated_connection_comes_out_unwrapped(tmp_path):
    """With --net a lost server was reported as a traceback (an exception group from the link's
    pumps), not as `error: connection lost`: the block's own exception must come out."""
    from shardlm.wire.errors import ConnectionClosed

    async def main():
        a, b = trio.testing.memory_stream_pair()
        async with netsim.simulate(a, netsim.parse_netspec("rtt=10ms")) as slow:
            client = Channel(slow)
            await b.aclose()  # the peer is gone
            await client.recv()

    with pytest.raises(ConnectionClosed):
        trio.run(main)
