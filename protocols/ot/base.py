"""Base OT: Chou–Orlandi "simplest OT" over ristretto255, batched.

One message each way for any number of OTs (the issue's 128 for IKNP):

    sender                                   receiver (choice bits c_i)
    a <- Z_L, A = aG        --- A --->       check A
                                             b_i <- Z_L, B_i = b_i G + c_i A
    check every B_i         <--- B ---
    k_i^0 = KDF(i, A, B_i, a B_i)            k_i^{c_i} = KDF(i, A, B_i, b_i A)
    k_i^1 = KDF(i, A, B_i, a (B_i - A))

KDF is BLAKE2b-128 with a personalisation string over the whole transcript of OT i (its index,
A, B_i and the shared point), so keys of different OTs, sessions and roles never collide.

Security (semi-honest, random-oracle model): the receiver's B_i is uniform whatever c_i is, so
the sender learns nothing about c; under the computational Diffie–Hellman assumption in
ristretto255 (a prime-order group), k_i^{1-c_i} = KDF(.., a(B_i - (c_i)A) ..) for the other
branch needs the DH value of A and b_i G ± A, so it is pseudorandom to the receiver. Both sides
reject malformed encodings and the identity element (group.decode_point); ristretto255 has no
other small-order elements. The known weakness of the original paper's *UC* claim (a malicious
receiver may delay its choice) does not matter for the semi-honest use here; a malicious-secure
variant would follow Hauck–Loss or Masny–Rindal.

The outputs are *random* OTs: the sender gets pairs of 16-byte keys, the receiver the keys it
chose. IKNP uses them as seeds of its column PRGs.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ...party.channel import Channel
from ...wire.errors import ErrorCode, ProtocolError
from ...wire.msgtypes import MsgType
from . import group

_PERSON = b"shardlm-co-ot-v1"  # 16 bytes max for BLAKE2b personalisation


def _kdf(i: int, A: bytes, B: bytes, shared: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16, person=_PERSON)
    h.update(i.to_bytes(8, "little"))
    h.update(A)
    h.update(B)
    h.update(shared)
    return h.digest()


async def send(ch: Channel, n: int) -> list[tuple[bytes, bytes]]:
    """Run n base OTs as the sender; return [(k_i^0, k_i^1)] (16-byte keys)."""
    a = group.random_scalar()
    A = group.base_mul(a)
    await ch.send(MsgType.OT_BASE_A, {"A": A, "n": n})
    body = (await ch.expect(MsgType.OT_BASE_B)).body
    Bs = body.get("B")
    if not isinstance(Bs, np.ndarray) or Bs.dtype != np.uint8 or Bs.shape != (n, group.POINT_BYTES):
        raise ProtocolError(ErrorCode.MALFORMED, f"base OT: expected {n} x {group.POINT_BYTES} bytes of B")
    aA = group.mul(a, A)
    keys = []
    for i in range(n):
        B = group.decode_point(Bs[i].tobytes(), f"base OT {i}: receiver's B")
        aB = group.mul(a, B)
        keys.append((_kdf(i, A, B, aB), _kdf(i, A, B, group.sub(aB, aA))))
    return keys


async def receive(ch: Channel, choices) -> list[bytes]:
    """Run len(choices) base OTs as the receiver; return [k_i^{c_i}]."""
    choices = [int(c) for c in choices]
    if any(c not in (0, 1) for c in choices):
        raise ValueError("choice bits must be 0 or 1")
    body = (await ch.expect(MsgType.OT_BASE_A)).body
    if body.get("n") != len(choices):
        raise ProtocolError(ErrorCode.MALFORMED, f"base OT: sender runs {body.get('n')} OTs, receiver {len(choices)}")
    A = group.decode_point(body.get("A"), "base OT: sender's A")
    Bs = np.empty((len(choices), group.POINT_BYTES), dtype=np.uint8)
    scalars = []
    for i, c in enumerate(choices):
        b = group.random_scalar()
        B = group.base_mul(b)
        if c:
            B = group.add(B, A)
        Bs[i] = np.frombuffer(B, dtype=np.uint8)
        scalars.append(b)
    await ch.send(MsgType.OT_BASE_B, {"B": Bs})
    return [_kdf(i, A, Bs[i].tobytes(), group.mul(b, A)) for i, b in enumerate(scalars)]
