"""The OT engine: base OT, IKNP extension, 1-of-N OT, private embedding-row retrieval.

Modules, bottom up:

- ``group``: ristretto255 (prime order) through rbcl's libsodium; point validation.
- ``base``: Chou–Orlandi "simplest OT", batched (128 at once for IKNP).
- ``prims``: fixed-key AES hashes (MMO/CCR and TCCR), AES-CTR column PRGs, the 128 x m bit
  transpose, CSPRNG helpers; all vectorised over chunks.
- ``iknp``: :class:`IknpSender` / :class:`IknpReceiver` (set up once, extend many times):
  random OT (streamed in chunks), correlated OT over Z_2^64, chosen-message OT.
- ``nofn``: 1-of-N OT from ceil(log2 N) random OTs with PRF masks (any N, not only 2^k).
- ``embedding``: ``retrieve_rows(channel, ids)`` / ``serve_rows(channel, table)``.
- ``service``: the ``ot`` server protocol (batches for benchmarks and tests, embedding
  retrieval); ``bench_ot``: its benchmark, ``python -m shardlm.protocols.ot.bench_ot``.

Assumptions, stated once: semi-honest parties; CDH in ristretto255 with the KDF as a random
oracle (base OT); AES-CTR as a PRG and fixed-key AES as an ideal permutation, which makes the
TCCR/MMO hashes correlation robust (IKNP). No malicious security yet (the KOS check has a
marked place in ``iknp``). Traffic: 16 bytes per random OT (receiver -> sender), +8 per
correlated Z_2^64 OT, +2L per chosen-message OT of L bytes, +N·L per 1-of-N OT; 128 base OTs
cost 4.2 kB once per direction and session.
"""

from .embedding import retrieve_rows, serve_rows
from .iknp import IknpReceiver, IknpSender

__all__ = ["IknpReceiver", "IknpSender", "retrieve_rows", "serve_rows"]
