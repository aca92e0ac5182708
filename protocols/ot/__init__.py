"""The OT engine: base OT (Chou–Orlandi over ristretto255), IKNP extension (random, correlated
over Z_2^64, chosen-message), 1-of-N OT, and private embedding-row retrieval.

Assumptions, stated once: semi-honest parties; CDH in ristretto255 with the KDF as a random
oracle (base OT); AES-CTR as a PRG and fixed-key AES as an ideal permutation, which makes the
TCCR/MMO hashes correlation robust (IKNP). See each module's docstring.
"""

from .iknp import IknpReceiver, IknpSender

__all__ = ["IknpReceiver", "IknpSender"]
