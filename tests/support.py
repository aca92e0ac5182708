"""Helpers shared by the runtime tests: an in-process TLS server on a real loopback socket."""
from __future__ import annotations

import collections
import contextlib
import dataclasses

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


def assert_uniform_below(arrays, bits: int) -> None:
    """uint64 values that should be uniform in [0, 2^bits): chi-square per whole byte, bit balance per bit."""
    import math

    import numpy as np

    u = np.concatenate([a.reshape(-1) for a in arrays])
    assert not (u >> np.uint64(bits)).any()
    by_pos = u.view(np.uint8).reshape(-1, 8)
    for pos in range(bits // 8):
        counts = np.bincount(by_pos[:, pos], minlength=256)
        chi2 = ((counts - u.size / 256) ** 2 / (u.size / 256)).sum()
        assert chi2 < 370, (pos, chi2)  # 255 dof: p < 1e-6 above 370
    balance = ((u[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).mean(axis=0)
    assert np.abs(balance - 0.5).max() < 6 * 0.5 / math.sqrt(u.size)


# -- mask reuse: every masked row the server received, hashed across sessions (DESIGN.md s6.4) --
# The payload fields, per message type a client sends in the masked protocols (v2 / v3 / v3-2r,
# with --embedding ot too), whose rows are one-time-padded and must never repeat: x - r rows of
# each linear unit, the IKNP receiver's u rows (G(k0) ^ G(k1) ^ choices), the base-OT point A.
MASKED_ROWS = {"MASKED_LINEAR": "m", "OT_EXT_U": "u", "OT_BASE_A": "A"}


@dataclasses.dataclass
class RowScan:
    sessions: int = 0
    partial: list = dataclasses.field(default_factory=list)  # sessions whose transcript was cut (a killed server)
    rows: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # per message type
    duplicates: list = dataclasses.field(default_factory=list)  # [[(session, frame n, type, unit, row), ...]]
    # row: the unit's row count in its session (for a linear unit, the mask pool's row)

    def describe(self, limit: int = 5) -> str:
        return "; ".join(" == ".join(f"{s}#{n} {t} {u} row {r}" for s, n, t, u, r in group)
                         for group in self.duplicates[:limit])


def scan_masked_rows(directory) -> RowScan:
    """Hash every masked row the server received in every session recorded under ``directory``
    (``serve --record-transcript``; transcripts cut by a kill are read up to their last complete
    frame) and return the scan, with every group of byte-identical rows in ``duplicates``.

    A row is keyed by its bytes alone (sha256), not by its unit: a repeat across units or
    sessions is reported as well as one within a unit. A uniformity test cannot see one
    repeated row in a hundred; the server can: two equal masked rows give it the difference of
    two plaintext activations, or the activation itself when the inputs were equal too."""
    import hashlib
    from pathlib import Path

    import numpy as np

    from shardlm.party.transcript import load_transcript

    scan = RowScan()
    seen: dict[bytes, list] = {}
    for d in sorted(p for p in Path(directory).iterdir() if (p / "frames.bin").is_file()):
        scan.sessions += 1
        try:
            _, msgs = load_transcript(d)
        except (ValueError, OSError):
            _, msgs = load_transcript(d, partial=True)
            scan.partial.append(d.name)
        sent = collections.Counter()
        for msg in msgs:
            field = MASKED_ROWS.get(msg.type.name)
            if field is None:
                continue
            value = msg.body.get(field)
            if isinstance(value, (bytes, bytearray)):
                value = np.frombuffer(bytes(value), dtype=np.uint8)
            arr = np.ascontiguousarray(value)
            rows = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)
            stream = (msg.type.name, msg.body.get("unit", ""))  # rows counted per unit through the session
            for row in rows:
                digest = hashlib.sha256(row.tobytes()).digest()
                seen.setdefault(digest, []).append((d.name, msg.n, *stream, sent[stream]))
                sent[stream] += 1
            scan.rows[msg.type.name] += len(rows)
    scan.duplicates = [where for where in seen.values() if len(where) > 1]
    return scan
