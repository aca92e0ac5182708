"""1-of-N OT from k = ceil(log2 N) random 1-of-2 OTs (Naor–Pinkas style, with PRF masks).

For one instance the sender holds N messages M_0..M_{N-1} of L bytes and gets k random OTs
(K_i^0, K_i^1) whose receiver choice bits are the bits c_i of the receiver's index c. The key of
message x is

    key_x = ⊕_{i<k} F(K_i^{x_i}, x),     F(K, x) = ccr_hash(K ⊕ x)

(F is single-key Even–Mansour on σ(K): a PRF when π is an ideal permutation), and the sender
sends E_x = M_x ⊕ G(key_x) for every x < N, G = prims.expand (or the key itself when L ≤ 16).
The receiver knows K_i^{c_i} for all i, hence key_c; for x ≠ c some bit x_i ≠ c_i, so key_x
contains F(K_i^{1-c_i}, x) under a key the receiver never saw and is pseudorandom, and the
masks of different x under the same unknown key are independent PRF outputs. The sender's view
is that of the k 1-of-2 OTs (IKNP: independent of c).

N need not be a power of two: only the first N keys are derived and only N ciphertexts are sent
(SmolLM2's V = 49152 costs 16 OTs and 49152 ciphertexts, not 65536).

Cost per instance: k·16 bytes of IKNP (receiver -> sender) plus N·L bytes (sender -> receiver),
i.e. linear in N·L: OT without homomorphic encryption cannot send less than every message once.
"""

from __future__ import annotations

import numpy as np

from ...party.channel import Channel
from ...wire.errors import ErrorCode, ProtocolError
from ...wire.msgtypes import MsgType
from . import prims
from .iknp import IknpReceiver, IknpSender, pad_bytes

# ciphertext rows per OT_NOFN_CT message (bounded memory and frames)
_ROWS_PER_MESSAGE = 1 << 16
_PAD_DOMAIN = 2


def bits_for(n: int) -> int:
    if n < 1:
        raise ValueError("1-of-N OT needs N >= 1")
    return max(1, (n - 1).bit_length())


def _index_bits(x: np.ndarray, k: int) -> np.ndarray:
    """(len(x), k) uint8, column i = bit i of x."""
    return ((x[:, None] >> np.arange(k, dtype=np.int64)[None, :]) & 1).astype(np.uint8)


def _keys(kpairs: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The sender's keys of indices xs for every instance: key_x = ⊕_i F(K_i^{x_i}, x).

    kpairs: (T, k, 2 [branch], 2 [words]) random-OT outputs; xs: (X,) int64 indices.
    Returns (T, X, 2) uint64. (The receiver computes the same sum for its own index only, from
    the keys it chose; see :func:`receive`.)
    """
    T, k = kpairs.shape[:2]
    bits = _index_bits(xs, k)
    xblock = np.zeros((len(xs), 2), dtype=np.uint64)
    xblock[:, 0] = xs.astype(np.uint64)
    out = np.zeros((T, len(xs), 2), dtype=np.uint64)
    for i in range(k):
        sel = kpairs[:, i][:, bits[:, i]]  # (T, X, 2)
        sel ^= xblock[None]
        out ^= prims.ccr_hash(sel.reshape(-1, 2)).reshape(T, len(xs), 2)
    return out


def _blocks(T: int, N: int, L: int):
    """The ciphertext messages of T instances of 1-of-N over L bytes, as (t0, t1, off, end):
    instances t0..t1-1, rows off..end-1 each. Up to ``_ROWS_PER_MESSAGE`` 16-byte rows per
    message: small N packs many instances into one message (one vectorised key derivation for
    all of them, not a Python step per instance), large N splits one instance's rows."""
    rows = max(1, _ROWS_PER_MESSAGE // max(1, -(-L // 16)))
    if N <= rows:
        per = rows // N
        for t0 in range(0, T, per):
            yield t0, min(T, t0 + per), 0, N
    else:
        for t in range(T):
            for off in range(0, N, rows):
                yield t, t + 1, off, min(N, off + rows)


async def send(ch: Channel, sender: IknpSender, messages, count: int | None = None) -> None:
    """Sender of ``count`` 1-of-N OTs.

    messages: (T, N, L) uint8, one list per instance; or (N, L) shared by all ``count``
    instances (no copy is made); or a function ``messages(t0, t1)`` returning the (t1 - t0, N, L)
    lists of instances t0..t1-1, called block by block in order (tables made on the fly, so T N L
    bytes never sit in memory at once), with ``count`` instances and its ``shape = (N, L)``
    attribute. The receiver learns exactly one row per instance.
    """
    if callable(messages):
        if count is None:
            raise ValueError("a message function needs count")
        make, (N, L), T = messages, messages.shape, count
    else:
        messages = np.asarray(messages, dtype=np.uint8)
        if messages.ndim == 2:
            if count is None:
                raise ValueError("a shared (N, L) message list needs count")
            N, L = messages.shape
            T = count
            make = lambda t0, t1: messages[None]  # noqa: E731 (broadcast over the block)
        elif messages.ndim == 3:
            T, N, L = messages.shape
            make = lambda t0, t1: messages[t0:t1]  # noqa: E731
        else:
            raise ValueError("messages must be (T, N, L) or (N, L) uint8")
    k = bits_for(N)
    m0, m1 = await sender.random(ch, T * k)
    kpairs = np.stack([m0, m1], axis=1).reshape(T, k, 2, 2)
    await ch.send(MsgType.OT_NOFN_CT, {"instances": T, "n": N, "nbytes": L})
    block, have = None, (-1, -1)
    for t0, t1, off, end in _blocks(T, N, L):
        if have != (t0, t1):
            block, have = np.asarray(make(t0, t1), dtype=np.uint8), (t0, t1)
            if block.shape[1:] != (N, L) or block.shape[0] not in (1, t1 - t0):
                raise ValueError(f"1-of-N: messages for instances {t0}..{t1} are {block.shape}, not ({t1 - t0}, {N}, {L})")
        xs = np.arange(off, end, dtype=np.int64)
        keys = _keys(kpairs[t0:t1], xs)  # (t1 - t0, end - off, 2)
        ct = pad_bytes(keys.reshape(-1, 2), L, _PAD_DOMAIN).reshape(t1 - t0, end - off, L) ^ block[:, off:end]
        await ch.send(MsgType.OT_NOFN_CT, {"ct": ct})


async def receive(ch: Channel, receiver: IknpReceiver, choices, n: int, nbytes: int) -> np.ndarray:
    """Receiver of len(choices) 1-of-n OTs; returns (T, nbytes) uint8, row t = M_t[choices[t]]."""
    c = np.asarray(choices, dtype=np.int64).reshape(-1)
    if c.size and (c.min() < 0 or c.max() >= n):
        raise ValueError(f"choices must lie in [0, {n})")
    T = c.size
    k = bits_for(n)
    bits = _index_bits(c, k)  # (T, k)
    mc = (await receiver.random(ch, bits.reshape(-1))).reshape(T, k, 2)
    head = (await ch.expect(MsgType.OT_NOFN_CT)).body
    if (head.get("instances"), head.get("n"), head.get("nbytes")) != (T, n, nbytes):
        raise ProtocolError(ErrorCode.MALFORMED, f"1-of-N: sender offers {head}, expected {T} x 1-of-{n} of {nbytes} bytes")
    # the receiver's key for its own index: F(K_i^{c_i}, c) for its chosen K only
    xblock = np.zeros((T, 2), dtype=np.uint64)
    xblock[:, 0] = c.astype(np.uint64)
    key = np.zeros((T, 2), dtype=np.uint64)
    for i in range(k):
        key ^= prims.ccr_hash(mc[:, i] ^ xblock)
    pads = pad_bytes(key, nbytes, _PAD_DOMAIN)
    out = np.empty((T, nbytes), dtype=np.uint8)
    for t0, t1, off, end in _blocks(T, n, nbytes):
        ct = (await ch.expect(MsgType.OT_NOFN_CT)).body.get("ct")
        want = (t1 - t0, end - off, nbytes)
        if not isinstance(ct, np.ndarray) or ct.dtype != np.uint8 or ct.shape != want:
            raise ProtocolError(ErrorCode.MALFORMED, f"1-of-N: expected a {want} uint8 ciphertext block")
        mine = np.nonzero((c[t0:t1] >= off) & (c[t0:t1] < end))[0]
        out[t0 + mine] = ct[mine, c[t0 + mine] - off] ^ pads[t0 + mine]
    return out
