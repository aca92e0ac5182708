"""Helpers shared by the runtime tests: an in-process TLS server on a real loopback socket."""
from __future__ import annotations

import contextlib

import trio

from shardlm.party.client import ClientConfig
from shardlm.party.server import Server, ServerConfig
from shardlm.protocols import registry
from shardlm.wire import codec, frames, tls
from shardlm.wire.msgtypes import MsgType


@contextlib.asynccontextmanager
async def tls_server(tmp_path, client_ca=None, model=None, **config):
    """Yield (server, ClientConfig pinned to it) for a real TLS server on 127.0.0.1."""
    fp = tls.generate_server_cert(tmp_path / "certs")
    ctx = tls.server_context(tmp_path / "certs/server.crt", tmp_path / "certs/server.key", client_ca)
    server = Server(ServerConfig(host="127.0.0.1", port=0, **config), ctx, model,
                    protocols=registry.offered(model is not None))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        yield server, ClientConfig(server=f"127.0.0.1:{port}", fingerprint=fp, timeout=10)
        nursery.cancel_scope.cancel()


async def raw_tls(cfg: ClientConfig) -> trio.SSLStream:
    """A TLS stream to the server with no shardlm framing on top, for sending bad bytes."""
    host, port = cfg.server.rsplit(":", 1)
    tcp = await trio.open_tcp_stream(host, int(port))
    stream = trio.SSLStream(tcp, tls.client_context(fingerprint=cfg.fingerprint))
    await stream.do_handshake()
    return stream


async def read_until_close(stream: trio.abc.Stream, timeout: float = 10) -> list[tuple[int, dict]]:
    """Every frame the peer sends until it closes: [(type, body)]."""
    decoder = frames.FrameDecoder()
    out = []
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                return out
            decoder.feed(data)
            while (frame := decoder.next_frame()) is not None:
                out.append((frame.type, codec.decode_body(frame.payload)))


def frame_bytes(msg_type: int, body: dict, seq: int = 0) -> bytes:
    return frames.encode_frame(msg_type, seq, codec.encode_body(body))


def error_codes(received) -> list[str]:
    return [body["code"] for t, body in received if t == MsgType.ERROR]


def assert_uniform_ring(arrays) -> None:
    """Ring payloads (int64 arrays) look uniform: chi-square per byte position and bit balance."""
    import math

    import numpy as np

    ring_bytes = np.concatenate([a.reshape(-1) for a in arrays]).view(np.uint8)
    by_pos = ring_bytes.reshape(-1, 8)
    for pos in range(8):
        counts = np.bincount(by_pos[:, pos], minlength=256)
        expected = by_pos.shape[0] / 256
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 370, (pos, chi2)  # 255 dof: p < 1e-6 above 370
    bits = np.unpackbits(ring_bytes)
    assert abs(bits.mean() - 0.5) < 5 * 0.5 / math.sqrt(bits.size)
