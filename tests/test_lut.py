"""v3-ot's core step: nonlinear functions on additive shares by lookup tables over 1-of-N OT
(protocols/mpc/lut.py), both parties over an in-memory channel.

- each table on shares against its plaintext function over its documented range (the bounds of
  the module docstring), the OT delivering exactly the entry the two index shares select;
- 1-of-N OT correct at the table sizes used, at scale (10^4 lookups in one batch, one round);
- a replayed or reordered OT message is refused (the channel's sequence numbers, at this use);
- both views: the receiver's output shares are uniform whatever the input (chi-square), failing
  for a table sent without its s_out mask and for a reused s_out; the sender's view (IKNP
  columns) is uniform and its structure does not depend on the inputs.
"""
import numpy as np
import pytest

from shardlm.party.channel import Channel
from shardlm.protocols.mpc import lut
from shardlm.wire.errors import ProtocolError
from shardlm.wire.msgtypes import MsgType

from ot_support import run_ext, run_pair
from support import assert_uniform_ring

# the module docstring's bounds: (absolute, relative) error over the documented range
# (w max|f'| over two buckets, w the bucket width, plus the output's rounding)
BOUNDS = {"exp": (1.2e-2, None), "sigmoid": (8.0e-3, None), "gelu_gate": (2.0e-3, None),
          "reciprocal": (None, 1.6e-2), "rsqrt": (None, 3.2e-2), "rsqrt_mantissa": (None, 1.9e-4)}


def _inputs(t: lut.Table, n: int, seed: int) -> np.ndarray:
    """n points over [lo, hi]: both ends and uniform draws."""
    return np.concatenate([[t.lo, t.hi], np.random.default_rng(seed).uniform(t.lo, t.hi, n - 2)])


def _run(t: lut.Table, v_s: np.ndarray, v_r: np.ndarray, **kw):
    return run_ext(lambda ch, S: lut.lut_send(ch, S, t, v_s), lambda ch, R: lut.lut_recv(ch, R, t, v_r), **kw)


def _check_error(t: lut.Table, x: np.ndarray, got: np.ndarray) -> None:
    want = t.plain(x)
    err = np.abs(got - want)
    if t.name == "ltz":  # a sign: exact but within one bucket of 0
        assert np.all((err == 0) | (np.abs(x) < t.width)), x[err > 0]
        return
    ab, rel = BOUNDS[t.name]
    if ab is not None:
        assert err.max() <= ab, (t.name, err.max())
    if rel is not None:
        assert (err / np.abs(want)).max() <= rel, (t.name, (err / np.abs(want)).max())


@pytest.mark.parametrize("name", sorted(lut.TABLES))
def test_table_on_shares_matches_its_function_over_its_range(name):
    t = lut.TABLES[name]
    # the on-share computation is local index shares + the OT: the error over many points from the
    # index the shares select, then the OT on a few hundred of them delivers exactly that entry
    x = _inputs(t, 200_000, 1)
    v = lut.encode(x, t.frac)
    v_s, v_r = lut.share(v)
    got = lut.decode(t.entries()[lut.lut_plain_index(t, v_s, v_r)], t.out_frac)
    _check_error(t, lut.decode(v, t.frac), got)

    x = _inputs(t, 300, 2)
    v_s, v_r = lut.share(lut.encode(x, t.frac))
    s, r, cs, cr = _run(t, v_s, v_r)
    assert np.array_equal(s + r, t.entries()[lut.lut_plain_index(t, v_s, v_r)])
    _check_error(t, lut.decode(lut.encode(x, t.frac), t.frac), lut.decode(s + r, t.out_frac))
    # one round trip for the batch after the base OTs (phase "ot-base"): one flight of IKNP columns
    # R -> S, one of ciphertexts S -> R; and the documented bytes: 2^k 8 per element one way
    assert cr.stats["setup"].messages_sent == 1 and cr.stats["setup"].rounds == cs.stats["setup"].rounds == 1
    sent = cs.stats["setup"].bytes_sent
    assert x.size * t.bytes_per_eval[0] <= sent <= x.size * t.bytes_per_eval[0] * 1.01 + 4096


def test_lookups_at_scale_in_one_batch():
    """10^4 lookups of the comparison table (1-of-256) and a full-size table in one batch."""
    t = lut.TABLES["ltz"]
    x = np.random.default_rng(3).uniform(-3999, 3999, 10_000)
    v_s, v_r = lut.share(lut.encode(x))
    s, r, _, cr = _run(t, v_s, v_r)
    assert np.array_equal(s + r, t.entries()[lut.lut_plain_index(t, v_s, v_r)])
    _check_error(t, x, lut.decode(s + r, 0))
    assert cr.stats["setup"].rounds == 1  # 8 10^4 IKNP columns in two messages, one flight


def test_random_tables_through_the_generic_step():
    """The core step on arbitrary per-element tables (what the sender offers is its own business):
    exactly T_t[index_t] arrives, for 1-of-2^13 (one bit beyond the largest k used)."""
    T, n = 64, 1 << 13
    tables = lut.random_ring(T * n).reshape(T, n)
    idx = np.random.default_rng(4).integers(0, n, T)
    idx[:2] = [0, n - 1]
    s, r, _, _ = run_ext(lambda ch, S: lut.offer(ch, S, T, lambda a, b: tables[a:b], n),
                         lambda ch, R: lut.choose(ch, R, idx, n))
    assert np.array_equal(s + r, tables[np.arange(T), idx])


class _Tampering(Channel):
    """The sender's channel, replaying or holding back its second ciphertext message on the wire
    (the frame's bytes as they were: its sequence number included)."""

    def __init__(self, stream, how):
        super().__init__(stream)
        self.how, self.cts, self.held = how, 0, None

    async def _write(self, msg_type, frame):
        if msg_type == MsgType.OT_NOFN_CT:
            self.cts += 1
            if self.how == "reorder" and self.cts == 2:  # hold it; the next goes out first
                self.held = frame
                self._send_seq += 1
                return frame[1]
            size = await super()._write(msg_type, frame)
            if self.how == "replay" and self.cts == 2:
                await super()._write(msg_type, frame)
            elif self.held is not None:
                held, self.held = self.held, None
                await super()._write(msg_type, held)
            return size
        return await super()._write(msg_type, frame)


@pytest.mark.parametrize("how", ["replay", "reorder"])
def test_a_replayed_or_reordered_ot_message_is_refused(how):
    t = lut.Table("tanh", np.tanh, -1.0, 1.0, 12)
    # 40 elements of 1-of-4096 x 8 bytes: two instances per 64 Ki-row message, 20 ciphertext messages
    v_s, v_r = lut.share(lut.encode(np.linspace(-1, 1, 40)))

    async def sender(ch):
        from shardlm.protocols.ot.iknp import IknpSender
        tampering = _Tampering(ch.stream, how)
        await lut.lut_send(tampering, await IknpSender.setup(tampering), t, v_s)

    async def receiver(ch):
        from shardlm.protocols.ot.iknp import IknpReceiver
        r = await IknpReceiver.setup(ch)
        with pytest.raises(ProtocolError, match="sequence number") as info:
            await lut.lut_recv(ch, r, t, v_r)
        return str(info.value)

    _, msg, _, _ = run_pair(sender, receiver)
    assert "sequence number" in msg


# the views do not depend on the table: the comparison's (1-of-256) keeps 8192 lookups fast
VIEW_TABLE = lut.TABLES["ltz"]


def _receiver_outputs(x: np.ndarray) -> tuple[np.ndarray, list]:
    v_s, v_r = lut.share(lut.encode(x))
    s, r, cs, cr = _run(VIEW_TABLE, v_s, v_r, record=True)
    _check_error(VIEW_TABLE, x, lut.decode(s + r, 0))
    return r, cs.view


def _assert_receiver_view_uniform(r: np.ndarray) -> None:
    assert_uniform_ring([r.view(np.int64)])
    # and no repeats: a reused s_out shows as equal outputs for equal inputs
    assert np.unique(r).size == r.size


def test_receiver_output_shares_are_uniform_and_fail_without_fresh_masks(monkeypatch):
    x = np.full(8192, -1000.0)  # one input: anything but a fresh mask per element shows
    r, _ = _receiver_outputs(x)
    _assert_receiver_view_uniform(r)

    # broken variants: the table sent without its s_out mask, and one s_out for every element
    fresh = lut.random_ring
    for broken in (lambda n: np.zeros(n, np.uint64), lambda n: np.repeat(fresh(1), n)):
        v_s, v_r = lut.share(lut.encode(x))
        monkeypatch.setattr(lut, "random_ring", broken)
        s, r, _, _ = _run(VIEW_TABLE, v_s, v_r)
        monkeypatch.setattr(lut, "random_ring", fresh)
        with pytest.raises(AssertionError):
            _assert_receiver_view_uniform(r)


def _sender_bulk(view) -> np.ndarray:
    return np.concatenate([m.body["u"].reshape(-1) for m in view if m.type == MsgType.OT_EXT_U])


def _structure(view):
    return [(m.type, m.nbytes, tuple((k, (v.dtype.str, v.shape)) if isinstance(v, np.ndarray) else (k, type(v).__name__)
                                     for k, v in sorted(m.body.items())))
            for m in view]


def test_sender_view_is_uniform_and_independent_of_the_inputs():
    _, view_a = _receiver_outputs(np.full(8192, -500.0))
    _, view_b = _receiver_outputs(np.linspace(-3999, 3999, 8192))
    assert _structure(view_a) == _structure(view_b)
    for view in (view_a, view_b):
        u = _sender_bulk(view)
        assert u.size >= 50_000
        assert_uniform_ring([u[: u.size // 8 * 8].view(np.int64)])
