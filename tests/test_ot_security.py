"""Security sanity of the OT engine, over what each party actually receives.

- the OT sender's view has the same structure for different choice vectors and its bulk bytes
  are statistically uniform (chi-square on byte values, per-bit balance) even for the most
  structured choices;
- the receiver cannot open what it did not choose: decrypting the other ciphertexts with the
  key it holds gives bytes indistinguishable from random (the messages are all zero, so any
  leak would show as structure).
"""
import numpy as np
import pytest

from shardlm.protocols.ot import embedding, nofn, prims
from shardlm.protocols.ot.iknp import IknpReceiver, IknpSender
from shardlm.wire.msgtypes import MsgType

from ot_support import run_ext, run_pair

# chi-square with 255 degrees of freedom: mean 255, sd 22.6; 400 is p < 1e-10
CHI2_LIMIT = 400


def chi_square_bytes(data: np.ndarray) -> float:
    counts = np.bincount(np.asarray(data, dtype=np.uint8).reshape(-1), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def assert_uniform(data: np.ndarray, what: str) -> None:
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    assert data.size >= 50_000, what
    chi2 = chi_square_bytes(data)
    assert chi2 < CHI2_LIMIT, f"{what}: chi-square {chi2:.0f} over byte values"
    bits = np.unpackbits(data[: data.size // 8 * 8].reshape(-1, 8), axis=1)  # per bit position
    frac = bits.mean(axis=0)
    assert np.all(np.abs(frac - 0.5) < 6 * 0.5 / np.sqrt(bits.shape[0])), f"{what}: bit balance {frac}"


def _structure(view):
    """Message types, byte counts and (dtype, shape) of every tensor: what must not depend on
    the receiver's choices."""
    out = []
    for msg in view:
        fields = {k: (v.dtype.str, v.shape) if isinstance(v, np.ndarray) else type(v).__name__
                  for k, v in sorted(msg.body.items())}
        out.append((msg.type, msg.nbytes, tuple(fields.items())))
    return out


def _sender_view(kind: str, choices: np.ndarray):
    n = choices.size

    async def sender(ch):
        s = await IknpSender.setup(ch)
        if kind == "random":
            await s.random(ch, n)
        elif kind == "correlated":
            await s.correlated(ch, np.full(n, 12345, dtype=np.uint64))
        else:
            await s.chosen(ch, np.zeros((n, 8), np.uint8), np.ones((n, 8), np.uint8))

    async def receiver(ch):
        r = await IknpReceiver.setup(ch)
        if kind == "random":
            return await r.random(ch, choices)
        if kind == "correlated":
            return await r.correlated(ch, choices)
        return await r.chosen(ch, choices, 8)

    _, _, cs, _ = run_pair(sender, receiver, record=True)
    return cs.view


@pytest.mark.parametrize("kind", ["random", "correlated", "chosen"])
def test_sender_view_has_the_same_structure_and_is_uniform_whatever_the_choices(kind):
    n = 40_000
    patterns = {
        "zeros": np.zeros(n, np.uint8),
        "ones": np.ones(n, np.uint8),
        "alternating": (np.arange(n) % 2).astype(np.uint8),
        "random": prims.random_bits(n),
    }
    views = {name: _sender_view(kind, c) for name, c in patterns.items()}
    structures = {name: _structure(v) for name, v in views.items()}
    assert len({tuple(s) for s in structures.values()}) == 1, "the sender's view depends on the choices"
    kinds = [m.type for m in views["zeros"]]
    assert kinds[0] == MsgType.OT_BASE_A and set(kinds[1:]) == {MsgType.OT_EXT_U}
    for name, view in views.items():
        u = np.concatenate([m.body["u"].reshape(-1) for m in view if m.type == MsgType.OT_EXT_U])
        assert_uniform(u, f"u matrices for {name} choices")
    # and two runs with the same choices do not repeat bytes (fresh base OTs and PRG seeds)
    again = _sender_view(kind, patterns["zeros"])
    assert not np.array_equal(again[1].body["u"], views["zeros"][1].body["u"])


def test_a_wrong_key_opens_nothing_in_chosen_message_ot():
    n, L = 20_000, 16
    c = prims.random_bits(n)
    zeros = np.zeros((n, L), np.uint8)

    _, got, _, cr = run_ext(lambda ch, s: s.chosen(ch, zeros, zeros),
                            lambda ch, r: r.chosen(ch, c, L), record=True)
    assert not got.any()  # the chosen (all-zero) messages arrive
    corr = [m.body for m in cr.view if m.type == MsgType.OT_EXT_CORR]
    e0 = np.concatenate([b["e0"] for b in corr])
    e1 = np.concatenate([b["e1"] for b in corr])
    sel = c.astype(bool)[:, None]
    chosen_ct, other_ct = np.where(sel, e1, e0), np.where(sel, e0, e1)
    my_pad = chosen_ct ^ got  # the key material the receiver holds
    opened = other_ct ^ my_pad  # its best guess at the unchosen (all-zero) messages
    assert_uniform(opened, "unchosen messages under the receiver's key")
    assert (opened == 0).all(axis=1).sum() == 0


def test_correlated_ot_corrections_are_uniform_for_a_constant_delta():
    n = 20_000
    c = prims.random_bits(n)
    delta = np.full(n, 0x0123456789ABCDEF, dtype=np.uint64)

    x, y, _, cr = run_ext(lambda ch, s: s.correlated(ch, delta),
                          lambda ch, r: r.correlated(ch, c), record=True)
    d = np.concatenate([m.body["d"] for m in cr.view if m.type == MsgType.OT_EXT_CORR])
    # what the receiver sees of Δ where it chose 0 is padded by the other message
    assert_uniform(d[c == 0].view(np.uint8), "corrections where c = 0")
    assert np.array_equal(y[c == 0], x[c == 0])


def test_one_of_n_receiver_cannot_open_other_messages():
    N, L, T = 4096, 16, 4
    msgs = np.zeros((T, N, L), np.uint8)
    idx = np.array([0, 1, 2345, N - 1])

    _, got, cs, cr = run_ext(lambda ch, s: nofn.send(ch, s, msgs),
                             lambda ch, r: nofn.receive(ch, r, idx, N, L), record=True)
    assert not got.any()
    cts = np.concatenate([m.body["ct"] for m in cr.view if m.type == MsgType.OT_NOFN_CT and "ct" in m.body])
    cts = cts.reshape(T, N, L)
    for t in range(T):
        pad = cts[t, idx[t]] ^ got[t]
        others = np.delete(cts[t], idx[t], axis=0) ^ pad
        assert_uniform(others, f"instance {t}: other messages under the receiver's key")
        # and the keys of different indices are unrelated (no two pads coincide)
        assert len({row.tobytes() for row in cts[t]}) == N
    # the sender saw only base-OT points and IKNP columns: uniform, independent of idx
    u = np.concatenate([m.body["u"].reshape(-1) for m in cs.view if m.type == MsgType.OT_EXT_U])
    assert [m.type for m in cs.view] == [MsgType.OT_BASE_A, MsgType.OT_EXT_U]
    assert u.size == 128 * 16  # T·k = 48 OTs, padded to 128, 16 bytes each


def test_embedding_server_view_does_not_depend_on_the_ids():
    V, d = 2000, 32
    table = np.zeros((V, d), np.float32)

    def view_for(ids):
        async def server(ch):
            await embedding.serve_rows(ch, table)

        async def client(ch):
            return await embedding.retrieve_rows(ch, ids)

        _, rows, cs, cc = run_pair(server, client, record=True)
        assert np.array_equal(rows, table[ids])
        return cs.view, cc.view

    (sv1, cv1), (sv2, _) = view_for(np.array([0, 0, 0])), view_for(np.array([1999, 5, 1024]))
    assert _structure(sv1) == _structure(sv2)
    assert sv1[0].body == sv2[0].body == {"count": 3, "setup": True}  # the count, never the ids
    # with an all-zero table, the encrypted table the client gets is uniform (its pads)
    ct = np.concatenate([m.body["ct"] for m in cv1 if m.type == MsgType.OT_EMB_TABLE and "ct" in m.body])
    assert_uniform(ct, "encrypted table")
