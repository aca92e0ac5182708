"""OT protocols over the in-memory channel (mostly through netsim): correctness for random
choices, edge sizes, chunking, and rejection of bad group elements in the base OT."""
import numpy as np
import pytest

from shardlm.protocols.ot import base, embedding, group, iknp, nofn, prims
from shardlm.protocols.ot.iknp import IknpReceiver, IknpSender
from shardlm.wire.errors import ProtocolError
from shardlm.wire.msgtypes import MsgType

from ot_support import run_ext, run_pair

NET = "rtt=10ms,bw=1gbit"


def _choices(n):
    return prims.random_bits(n)


def test_base_ot_gives_the_chosen_keys_only():
    c = _choices(128)

    async def sender(ch):
        return await base.send(ch, 128)

    async def receiver(ch):
        return await base.receive(ch, c)

    pairs, got, _, _ = run_pair(sender, receiver, net=NET)
    assert all(len(k0) == 16 and len(k1) == 16 and k0 != k1 for k0, k1 in pairs)
    assert got == [pair[ci] for pair, ci in zip(pairs, c)]
    assert all(g != pair[1 - ci] for g, pair, ci in zip(got, pairs, c))


@pytest.mark.parametrize("n", [1, 127, 1000, iknp.CHUNK + 300])
def test_random_ot(n):
    c = _choices(n)

    (m0, m1), mc, cs, cr = run_ext(lambda ch, s: s.random(ch, n),
                                   lambda ch, r: r.random(ch, c), net=NET)
    assert m0.shape == m1.shape == mc.shape == (n, 2)
    assert np.array_equal(mc, np.where(c[:, None].astype(bool), m1, m0))
    assert (m0 != m1).any(axis=1).all()
    # 16 bytes per OT (rounded up to 128 OTs per chunk) plus a few header bytes per chunk
    chunks = -(-n // iknp.CHUNK)
    ext_bytes = cr.totals().bytes_sent - cr.stats["ot-base"].bytes_sent
    assert 16 * n <= ext_bytes <= 16 * (n + 128 * chunks) + 200 * chunks
    # random OT: after the base OTs nothing flows from sender to receiver
    assert cs.totals().bytes_sent - cs.stats["ot-base"].bytes_sent == 0


def test_extension_is_reusable_and_indices_advance():
    c1, c2 = _choices(500), _choices(700)

    async def sender(ch):
        s = await IknpSender.setup(ch)
        return [await s.random(ch, 500), await s.random(ch, 700), s.count]

    async def receiver(ch):
        r = await IknpReceiver.setup(ch)
        return [await r.random(ch, c1), await r.random(ch, c2), r.count]

    (a, b, ns), (x, y, nr), _, _ = run_pair(sender, receiver)
    assert ns == nr == 1200
    assert np.array_equal(x, np.where(c1[:, None].astype(bool), a[1], a[0]))
    assert np.array_equal(y, np.where(c2[:, None].astype(bool), b[1], b[0]))
    assert not np.isin(a[0][:, 0], b[0][:, 0]).any()  # fresh outputs, not a replay


@pytest.mark.parametrize("k", [1, 3])
def test_correlated_ot_over_z2_64(k):
    n = 3000
    c = _choices(n)
    rng = np.random.default_rng(3)
    delta = rng.integers(0, 2**64, (n,) if k == 1 else (n, k), dtype=np.uint64, endpoint=False)
    delta[:4] = [0, 1, 2**63, 2**64 - 1] if k == 1 else np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64)[:, None]

    x, y, _, _ = run_ext(lambda ch, s: s.correlated(ch, delta),
                         lambda ch, r: r.correlated(ch, c, k=k), net=NET)
    cc = c.astype(np.uint64) if k == 1 else c.astype(np.uint64)[:, None]
    assert y.dtype == np.uint64 and y.shape == delta.shape
    assert np.array_equal(y, x + cc * delta)  # wraps mod 2^64
    # Gilboa shares: (-x) + y = c·Δ
    assert np.array_equal((-x) + y, cc * delta)


@pytest.mark.parametrize("L", [1, 16, 100])
def test_chosen_message_ot(L):
    n = 2000
    c = _choices(n)
    msg0 = prims.random_bytes(n * L).reshape(n, L)
    msg1 = prims.random_bytes(n * L).reshape(n, L)

    _, got, _, cr = run_ext(lambda ch, s: s.chosen(ch, msg0, msg1),
                            lambda ch, r: r.chosen(ch, c, L), net=NET)
    assert np.array_equal(got, np.where(c[:, None].astype(bool), msg1, msg0))
    ext = cr.totals()
    assert ext.bytes_received >= 2 * n * L  # both ciphertexts travel


@pytest.mark.parametrize("kind", ["correlated", "chosen"])
def test_pipelined_corrections_cannot_deadlock_without_buffers(kind):
    n = 2 * iknp.CHUNK + 77  # several chunks, each answered while the next u is in flight
    c = _choices(n)
    msgs = prims.random_bytes(2 * n * 24).reshape(2, n, 24)
    delta = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    if kind == "correlated":
        x, y, _, _ = run_ext(lambda ch, s: s.correlated(ch, delta),
                             lambda ch, r: r.correlated(ch, c), lockstep=True)
        assert np.array_equal(y, x + c.astype(np.uint64) * delta)
    else:
        _, got, _, _ = run_ext(lambda ch, s: s.chosen(ch, msgs[0], msgs[1]),
                               lambda ch, r: r.chosen(ch, c, 24), lockstep=True)
        assert np.array_equal(got, np.where(c[:, None].astype(bool), msgs[1], msgs[0]))


@pytest.mark.parametrize("N,L", [(1, 4), (2, 16), (5, 3), (256, 16), (1000, 40), (4097, 8)])
def test_one_of_n(N, L):
    T = 6
    msgs = prims.random_bytes(T * N * L).reshape(T, N, L)
    ch_idx = np.random.default_rng(N).integers(0, N, T)
    ch_idx[0] = N - 1

    _, got, _, _ = run_ext(lambda ch, s: nofn.send(ch, s, msgs),
                           lambda ch, r: nofn.receive(ch, r, ch_idx, N, L), net=NET)
    assert np.array_equal(got, msgs[np.arange(T), ch_idx])


def test_one_of_n_with_a_shared_message_list():
    N, L, T = 300, 24, 10
    msgs = prims.random_bytes(N * L).reshape(N, L)
    idx = np.random.default_rng(1).integers(0, N, T)

    _, got, _, _ = run_ext(lambda ch, s: nofn.send(ch, s, msgs, count=T),
                           lambda ch, r: nofn.receive(ch, r, idx, N, L))
    assert np.array_equal(got, msgs[idx])


def test_embedding_retrieval_random_table_and_its_cost():
    V, d = 3000, 96
    table = np.random.default_rng(5).standard_normal((V, d)).astype(np.float32)
    ids = np.array([0, V - 1, 17, 17, 2048, 999])

    async def server(ch):
        s = await embedding.serve_rows(ch, table)
        # a second request reuses the extension (no new base OTs)
        await embedding.serve_rows(ch, table, sender=s)

    async def client(ch):
        rows, r = await embedding.retrieve_rows(ch, ids, return_receiver=True)
        before = ch.totals()
        rows2 = await embedding.retrieve_rows(ch, ids[:2], receiver=r)
        after = ch.totals()
        return rows, rows2, after.bytes_received - before.bytes_received, after.bytes_sent - before.bytes_sent

    _, (rows, rows2, down, up), _, cc = run_pair(server, client, net=NET)
    assert rows.dtype == np.float32 and np.array_equal(rows, table[ids])
    assert np.array_equal(rows2, table[ids[:2]])
    # the traffic is what cost_bytes says, plus framing: table + V·16 per token down, IKNP up
    cost = embedding.cost_bytes(V, d, 2)
    assert cost["table"] + cost["keys"] <= down <= cost["table"] + cost["keys"] + 4096
    assert cost["iknp"] <= up <= cost["iknp"] + 512
    assert cc.stats["ot-base"].bytes_received > 128 * 32  # one set of base OTs, 128 points


def test_cost_formula_for_smollm2():
    c = embedding.cost_bytes(49152, 576, 1)
    assert c["table"] == 49152 * 576 * 4 == 113_246_208
    assert c["keys"] == 49152 * 16
    assert c["iknp"] == 128 * 16  # 16 OTs, padded to one 128-OT column block


# -- malformed group elements in the protocol -----------------------------------------------------
def test_receiver_rejects_identity_from_the_sender():
    async def evil_sender(ch):
        await ch.send(MsgType.OT_BASE_A, {"A": bytes(32), "n": 4})

    async def receiver(ch):
        with pytest.raises(group.InvalidPoint, match="identity"):
            await base.receive(ch, [0, 1, 0, 1])
        return True

    assert run_pair(evil_sender, receiver)[1]


@pytest.mark.parametrize("bad", ["identity", "noncanonical", "garbage_shape"])
def test_sender_rejects_bad_points_from_the_receiver(bad):
    async def sender(ch):
        with pytest.raises(ProtocolError) as info:
            await base.send(ch, 4)
        return str(info.value)

    async def evil_receiver(ch):
        await ch.expect(MsgType.OT_BASE_A)
        Bs = np.stack([np.frombuffer(group.base_mul(group.random_scalar()), np.uint8) for _ in range(4)])
        if bad == "identity":
            Bs[2] = 0
        elif bad == "noncanonical":
            Bs[1] = np.frombuffer((2**255 - 19).to_bytes(32, "little"), np.uint8)
        else:
            Bs = Bs[:3]
        await ch.send(MsgType.OT_BASE_B, {"B": Bs})

    msg = run_pair(sender, evil_receiver)[0]
    want = {"identity": "base OT 2: receiver's B is the identity", "noncanonical": "base OT 1",
            "garbage_shape": "expected 4 x 32"}[bad]
    assert want in msg


def test_extension_sender_rejects_a_malformed_u_matrix():
    async def sender(ch):
        s = await IknpSender.setup(ch)
        with pytest.raises(ProtocolError, match="OT_EXT_U"):
            await s.random(ch, 256)
        return True

    async def evil_receiver(ch):
        await IknpReceiver.setup(ch)
        await ch.send(MsgType.OT_EXT_U, {"u": np.zeros((128, 31), np.uint8)})

    assert run_pair(sender, evil_receiver)[0]


def test_iknp_matches_its_definition_written_out_per_row():
    """Given fixed base-OT keys, Δ and choices, the wire matrix u and every output equal the
    IKNP definition computed here row by row with single-block AES (no shared code)."""
    import os

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    n = 300
    mp = 384  # padded to a multiple of 128
    pairs = [(os.urandom(16), os.urandom(16)) for _ in range(128)]
    delta_bits = prims.random_bits(128)
    r = _choices(n)

    def stream(key, nbytes):
        return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(nbytes))

    def bit(data, j):
        return (data[j // 8] >> (j % 8)) & 1

    key = prims.FIXED_KEY

    def aes(block_int):
        out = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(block_int.to_bytes(16, "little"))
        return int.from_bytes(out, "little")

    def tccr(j, x):
        px = aes(x)
        return aes(px ^ j) ^ px

    t_cols = [stream(k0, mp // 8) for k0, _ in pairs]
    g1_cols = [stream(k1, mp // 8) for _, k1 in pairs]
    rr = list(r) + [0] * (mp - n)
    u_want = np.array([[sum((bit(t_cols[i], 8 * b + l) ^ bit(g1_cols[i], 8 * b + l) ^ rr[8 * b + l]) << l
                            for l in range(8)) for b in range(mp // 8)] for i in range(128)], dtype=np.uint8)
    delta = sum(int(delta_bits[i]) << i for i in range(128))
    t_rows = [sum(bit(t_cols[i], j) << i for i in range(128)) for j in range(n)]

    async def sender(ch):
        s = IknpSender(delta_bits, [pair[b] for pair, b in zip(pairs, delta_bits)])
        return await s.random(ch, n)

    async def receiver(ch):
        return await IknpReceiver(pairs).random(ch, r)

    (m0, m1), mc, cs, _ = run_pair(sender, receiver, record=True)
    assert np.array_equal(cs.view[0].body["u"], u_want)

    def as_int(block):
        return int.from_bytes(block.tobytes(), "little")

    for j in range(n):
        q = t_rows[j] ^ (delta if r[j] else 0)
        assert as_int(m0[j]) == tccr(j, q)
        assert as_int(m1[j]) == tccr(j, q ^ delta)
        assert as_int(mc[j]) == tccr(j, t_rows[j])


def test_base_ot_keys_match_the_chou_orlandi_definition(monkeypatch):
    """With the scalars fixed, the keys equal BLAKE2b-128(i ‖ A ‖ B_i ‖ shared) with the shared
    points of the definition: k^0 from a·B_i, k^1 from a·(B_i − A), the receiver's from b_i·A."""
    import hashlib

    import rbcl

    L = group.ORDER
    a = 1234567 * 10**30 % L
    bs = [(99991 * (i + 7) ** 5) % L for i in range(4)]
    scalars = iter([a, *bs])
    monkeypatch.setattr(group, "random_scalar", lambda: group.scalar_from_int(next(scalars)))
    c = [0, 1, 1, 0]

    async def sender(ch):
        return await base.send(ch, 4)

    async def receiver(ch):
        return await base.receive(ch, c)

    pairs, got, _, _ = run_pair(sender, receiver)

    def mul_base(k):
        return rbcl.crypto_scalarmult_ristretto255_base(group.scalar_from_int(k))

    def kdf(i, A, B, shared):
        h = hashlib.blake2b(digest_size=16, person=b"shardlm-co-ot-v1")
        h.update(i.to_bytes(8, "little") + A + B + shared)
        return h.digest()

    A = mul_base(a)
    for i, (b, ci) in enumerate(zip(bs, c)):
        B = mul_base((b + ci * a) % L)  # b·G + c·A
        k0 = kdf(i, A, B, mul_base(a * (b + ci * a) % L))
        k1 = kdf(i, A, B, mul_base(a * (b + ci * a - a) % L))
        assert pairs[i] == (k0, k1)
        assert got[i] == kdf(i, A, B, mul_base(b * a % L)) == (k0, k1)[ci]


def test_embedding_retrieval_at_smollm2_size():
    """V = 49152 (not a power of two: 16 OTs per token, 49152 ciphertexts, no padding rows),
    d = 576, float32: rows come back bit-exact, including both ends and the 2^15 boundary."""
    V, d = 49152, 576
    table = np.random.default_rng(0).standard_normal((V, d), dtype=np.float32)
    table[7, :3] = [np.nan, -0.0, np.inf]  # any bit pattern survives
    ids = np.array([0, V - 1, 32767, 32768, 7, 40000, 7])

    async def server(ch):
        await embedding.serve_rows(ch, table)

    async def client(ch):
        return await embedding.retrieve_rows(ch, ids)

    _, rows, _, cc = run_pair(server, client)
    assert rows.view(np.uint32).tobytes() == table[ids].view(np.uint32).tobytes()
    cost = embedding.cost_bytes(V, d, len(ids))
    down = cc.stats["emb-table"].bytes_received + cc.stats["emb-keys"].bytes_received
    assert cost["table"] + cost["keys"] <= down <= cost["table"] + cost["keys"] + 8192


@pytest.mark.parametrize("kind", ["random", "correlated", "chosen", "nofn"])
def test_empty_batches(kind):
    none = np.zeros(0, np.uint8)
    ops = {
        "random": (lambda ch, s: s.random(ch, 0), lambda ch, r: r.random(ch, none)),
        "correlated": (lambda ch, s: s.correlated(ch, np.zeros(0, np.uint64)), lambda ch, r: r.correlated(ch, none)),
        "chosen": (lambda ch, s: s.chosen(ch, np.zeros((0, 4), np.uint8), np.zeros((0, 4), np.uint8)),
                   lambda ch, r: r.chosen(ch, none, 4)),
        "nofn": (lambda ch, s: nofn.send(ch, s, np.zeros((0, 10, 4), np.uint8)),
                 lambda ch, r: nofn.receive(ch, r, np.zeros(0, np.int64), 10, 4)),
    }
    _, got, _, _ = run_ext(*ops[kind])
    assert len(got) == 0
