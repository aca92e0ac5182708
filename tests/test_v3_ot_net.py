"""v3-ot (``--protocol v3-ot``) between a real TLS server and client: greedy generation equals the
reference on tiny gpt2 and llama, and both parties' recorded session views pass DESIGN.md s6's
tests -- each shown failing on a deliberately broken variant.

A party's view is every frame its channel received (``party/transcript.py``: the server's with
``record_dir`` on the server, the client's with ``ClientConfig.record_dir``), plus, for the
client, what it computes from them that a recording cannot show: its output share of every
table lookup. Per message type, what must be uniform (chi-square per byte position and bit
balance, support.assert_uniform_ring) and why:

server's view (what the client sends)
  MPC_INPUT m, MPC_RESHARE m   enc(x) - r, x_c - r: one-time pads by the client's fresh masks r
  MPC_OPEN v                   x_c - a_c: Beaver masks nobody knows (packed lanes padded from the CSPRNG)
  OT_EXT_U u                   IKNP columns G(k0) ^ G(k1) ^ choices (the client as OT receiver)
  OT_EXT_CORR d                Gilboa corrections x + Delta - H(m1) (the client as OT sender)
client's view (what the server sends)
  MPC_OPEN_OK v, MPC_REVEAL v  x_s - a_s; the server's share of the logits (W of a uniform m)
  OT_EXT_U u, OT_EXT_CORR d    as above, roles swapped
  OT_NOFN_CT ct                the tables' ciphertexts: entries f - s_out under 1-of-N pads
  (lookup outputs)             the chosen entries once decrypted, f(x) - s_out: a fresh s_out each
not tested for uniformity: OT_BASE_A / OT_BASE_B (curve points: encodings, not uniform bytes; the
base OTs run before the prompt exists), OT_NOFN_CT's head (public counts) and the handshake,
MPC_SETUP and BYE (public scalars): the structure test holds these equal across prompts.

'No plaintext': no 64-bit word of any payload (nor of the client's lookup outputs) lies within
2^24 of 0 -- where plaintext lives: token ids, embeddings and activations with |x| < 16 at 2^-20,
every table entry (exp, sigmoid, GELU's gate, 1/x: within [0, 1.01]) -- which a uniform word does with
probability 2^-39 (~6e7 words here: 1e-4 in all); and none equals a prompt id or an encoded
embedding entry of the prompt.

Broken variants (monkeypatched, one session each): the client sending its input unmasked (the
server's view fails (b) and (c)); the server's tables minus one s_out for all elements (the
client's lookup outputs fail (b), its recorded bytes pass); tables with neither s_out nor 1-of-N
pads (the client's recorded ciphertexts fail (b) and (c)); a prefill chunked by the prompt's
content (both views fail (a)). A replayed or reordered OT frame of the client ends the session
on the server's sequence-number check (test_lut.py has it at the table level).

Cost: tiny models (gpt2 with two layers, llama with one), two prompt tokens, ``triple_batch``
1024; the broken variants with one token and no decode step where that suffices.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import re
import shutil

import numpy as np
import pytest
import torch
import trio

from conftest import load_tiny_models
from shardlm.models.reference import generate as reference_generate
from shardlm.models.sampling import SamplingParams
from shardlm.party import client as client_mod
from shardlm.party import generation
from shardlm.party.channel import Channel
from shardlm.party.run import run_generation
from shardlm.party.transcript import load_transcript, session_dirs
from shardlm.protocols import registry, units
from shardlm.protocols.mpc import engine as mpc_engine
from shardlm.protocols.mpc import lut
from shardlm.protocols.mpc.shares import Shared
from shardlm.protocols.mpc.void import VOID
from shardlm.protocols.ot import nofn
from shardlm.wire.errors import ConnectionClosed, RemoteError
from shardlm.wire.msgtypes import MsgType

from support import assert_uniform_ring, tls_server

GREEDY = SamplingParams()
OPTS = {"triple_batch": 1 << 10}
PROMPTS = ([5, 77], [250, 1])  # same length, different tokens (and different completions)
N = 2  # one prefill and one decode forward
SMALL = 1 << 24  # plaintext fixed-point values lie within this of 0 (see the module docstring)
SAMPLE = 1 << 20  # ring words per group for the chi-square (every word for the small-word check)

# the uniform groups of each view: (message type, field) -> group
GROUPS = {
    "server": {(MsgType.MPC_INPUT, "m"): "re-shares", (MsgType.MPC_RESHARE, "m"): "re-shares",
               (MsgType.MPC_OPEN, "v"): "openings", (MsgType.OT_EXT_U, "u"): "ot columns",
               (MsgType.OT_EXT_CORR, "d"): "ot corrections",
               (MsgType.OT_NOFN_CT, "ct"): "multiplexer ciphertexts"},  # the client as mux.py's sender
    "client": {(MsgType.MPC_OPEN_OK, "v"): "openings", (MsgType.MPC_REVEAL, "v"): "openings",
               (MsgType.OT_EXT_U, "u"): "ot columns", (MsgType.OT_EXT_CORR, "d"): "ot corrections",
               (MsgType.OT_NOFN_CT, "ct"): "table ciphertexts"},
}
# what reaches each party at all: the handshake, ring messages (0x12xx), OT messages (0x11xx)
TYPES = {
    "server": {MsgType.HELLO, MsgType.MPC_SETUP, MsgType.OT_BASE_A, MsgType.OT_BASE_B, MsgType.OT_EXT_U,
               MsgType.OT_EXT_CORR, MsgType.OT_NOFN_CT, MsgType.MPC_INPUT, MsgType.MPC_RESHARE, MsgType.MPC_OPEN,
               MsgType.BYE},
    "client": {MsgType.HELLO_OK, MsgType.MPC_SETUP_OK, MsgType.OT_BASE_A, MsgType.OT_BASE_B, MsgType.OT_EXT_U,
               MsgType.OT_EXT_CORR, MsgType.OT_NOFN_CT, MsgType.MPC_OPEN_OK, MsgType.MPC_REVEAL},
}
RANDOM_SCALARS = {"session_id"}  # fresh per session, whatever the prompt


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """gpt2 with its two layers (test_lut_engine runs llama's two); llama with one for the views
    (every kind of step is in one layer) and the broken variants."""
    return load_tiny_models(tmp_path_factory, ("llama", "gpt2"), 3, {"llama": {"num_hidden_layers": 1}})


# -- running sessions ---------------------------------------------------------------------------
def _run(model, tmp_path, prompts, n, record=True):
    """Greedy v3-ot sessions, one per prompt, against one TLS server; with ``record``, both views
    under tmp_path/server and tmp_path/client and the client's lookup outputs. Returns (reports,
    server dirs, client dirs, lookup outputs per session); a session the server ends returns its
    RemoteError (or ConnectionClosed, if it closed while the client was sending) as its report."""
    outputs, recv = [], lut.lut_recv

    async def recording(ch, receiver, table, v_r):  # only the client is a table's receiver
        out = await recv(ch, receiver, table, v_r)
        outputs[-1].append(out.reshape(-1).copy())
        return out

    async def main():
        server_cfg = {"record_dir": str(tmp_path / "server")} if record else {}
        async with tls_server(tmp_path, model=model, **server_cfg) as (server, cfg):
            if record:
                cfg = dataclasses.replace(cfg, record_dir=str(tmp_path / "client"))
            reps = []
            for p in prompts:
                outputs.append([])
                try:
                    with trio.fail_after(120):
                        reps.append(await run_generation(cfg, model, registry.get("v3-ot"), p, n, GREEDY,
                                                         ignore_eos=True, options=OPTS))
                except (RemoteError, ConnectionClosed) as e:
                    reps.append(e)
            with trio.fail_after(10):  # every server transcript complete (BYE recorded)
                while server.active or server.sessions:
                    await trio.sleep(0.01)
            return reps

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lut, "lut_recv", recording)
        reps = trio.run(main)
    if not record:
        return reps
    return reps, session_dirs(tmp_path / "server"), session_dirs(tmp_path / "client"), \
        [np.concatenate(o) for o in outputs]


def _views(model, tmp_path, prompts, n) -> tuple[list, list, list]:
    """:func:`_run`'s sessions digested: (reports, server views, client views). The transcripts
    (~100 MB per view) are deleted once read."""
    reps, sdirs, cdirs, outs = _run(model, tmp_path, prompts, n)
    assert len(sdirs) == len(cdirs) == len(prompts)
    servers = [digest(d, _plaintext(model, p)) for d, p in zip(sdirs, prompts)]
    clients = [digest(d, _plaintext(model, p), o) for d, p, o in zip(cdirs, prompts, outs)]
    for d in ("server", "client"):
        shutil.rmtree(tmp_path / d)
    return reps, servers, clients


# -- a view, digested -------------------------------------------------------------------------------
@dataclasses.dataclass
class View:
    role: str
    structure: list  # per message: type, phase, frame bytes, fields (arrays: dtype and shape)
    types: set
    samples: dict  # group -> int64 words (at most SAMPLE, spread over the whole session)
    words: dict  # group or message type -> words seen
    small: dict  # group or message type -> words within SMALL of 0
    found: int  # words equal to a prompt id or an encoded embedding entry of the prompt


def _words(v) -> np.ndarray:
    """A payload as 64-bit words (byte strings and uint8 arrays: their whole 8-byte words)."""
    a = np.frombuffer(v, np.uint8) if isinstance(v, (bytes, bytearray)) else np.ascontiguousarray(v).reshape(-1)
    b = a.view(np.uint8)
    return b[: b.size // 8 * 8].view(np.int64)


def _field(v):
    if isinstance(v, np.ndarray):
        return (v.dtype.str, v.shape)
    if isinstance(v, (bytes, bytearray)):
        return ("bytes", len(v))
    return v


def _plaintext(model, prompt) -> np.ndarray:
    """The prompt's ids and its embedding entries, encoded as the engines encode them (2^-20)."""
    emb = model.weights["embed"]
    rows = emb[torch.tensor(prompt)].double().numpy()  # the first activation (gpt2 adds positions)
    enc = np.round(rows * (1 << mpc_engine.FRAC_BITS)).astype(np.int64).reshape(-1)
    return np.unique(np.concatenate([np.asarray(prompt, np.int64), enc]))


def digest(session_dir, plaintext: np.ndarray, lookups: np.ndarray | None = None) -> View:
    meta, msgs = load_transcript(session_dir)
    role = meta["role"]
    groups = GROUPS[role]
    structure, by_group = [], collections.defaultdict(list)
    small, words, found = collections.Counter(), collections.Counter(), 0
    for m in msgs:
        structure.append((m.type, m.phase, m.frame_bytes,
                          tuple((k, "random" if k in RANDOM_SCALARS else _field(v)) for k, v in sorted(m.body.items()))))
        for k, v in m.body.items():
            if not isinstance(v, (np.ndarray, bytes, bytearray)):
                continue
            w = _words(v)
            key = groups.get((m.type, k), m.type.name)
            near = w[(w + SMALL).view(np.uint64) < 2 * SMALL]  # every plaintext value is among these
            small[key] += near.size
            words[key] += w.size
            found += int(np.isin(near, plaintext).sum())
            if (m.type, k) in groups:
                by_group[key].append(w)
    if lookups is not None:
        w = lookups.view(np.int64)
        small["lookup outputs"] += int(((w + SMALL).view(np.uint64) < 2 * SMALL).sum())
        found += int(np.isin(w, plaintext).sum())
        words["lookup outputs"] += w.size
        by_group["lookup outputs"].append(w)
    samples = {}
    for g, parts in by_group.items():
        w = np.concatenate(parts)
        samples[g] = w[:: max(1, w.size // SAMPLE)]
    return View(role, structure, {m.type for m in msgs}, samples, dict(words), dict(small), found)


# -- the tests over a view (DESIGN.md s6: 1 structure, 2 uniformity, 3 no path for plaintext) ------
def check_structure(a: View, b: View) -> None:
    """(a) the same message types, phases, frame sizes, tensor dtypes and shapes and public scalars."""
    assert a.role == b.role
    assert len(a.structure) == len(b.structure), (a.role, len(a.structure), len(b.structure))
    for i, (x, y) in enumerate(zip(a.structure, b.structure)):
        assert x == y, (a.role, i, x, y)


def check_uniform(v: View, lookups: bool = False) -> None:
    """(b) every group of share-carrying payloads is uniform over the ring."""
    want = set(GROUPS[v.role].values()) | ({"lookup outputs"} if lookups else set())
    assert set(v.samples) - {"lookup outputs"} == want - {"lookup outputs"}, (v.role, set(v.samples))
    for g, w in v.samples.items():
        if g == "lookup outputs" and not lookups:
            continue
        try:
            assert_uniform_ring([w])
        except AssertionError as e:
            raise AssertionError(f"{v.role} view, {g}: not uniform {e}") from None
    if lookups:  # a reused s_out shows as repeated outputs too
        w = v.samples["lookup outputs"]
        assert np.unique(w).size == w.size, (v.role, "repeated lookup outputs")


def check_no_plaintext(v: View) -> None:
    """(c) only the protocol's message types, no float tensor, no payload word near 0, no prompt
    id or embedding entry."""
    assert v.types == TYPES[v.role], (v.role, v.types ^ TYPES[v.role])
    floats = {m[0].name for m in v.structure for _, f in m[3] if isinstance(f, tuple) and "f" in f[0]}
    assert not floats, (v.role, "float tensors in", floats)
    near = {k: n for k, n in v.small.items() if n}
    assert not near, (v.role, "words within 2^24 of 0", near, v.words)
    assert v.found == 0, (v.role, f"{v.found} words equal a prompt id or embedding entry")


# -- 1. greedy generation over TLS ----------------------------------------------------------------------
def test_gpt2_greedy_over_tls_equals_the_reference(models, tmp_path):
    """GPT-2: LayerNorm, learned positions, and GELU by its gate's table (one lookup per element)."""
    gpt2 = models["gpt2"]
    prompt = [31, 200]
    (rep,) = _run(gpt2, tmp_path, [prompt], N, record=False)
    assert rep.result.token_ids == reference_generate(gpt2, prompt, N, GREEDY, stop_ids=())
    fw = rep.protocol_stats["forwards"]
    # every forward looked up at least the GELU gate of each MLP element (4 d per token and layer)
    assert all(f["lookups"] >= 4 * gpt2.config.hidden * gpt2.config.n_layers * f["tokens"] for f in fw), fw


# -- 2. both parties' views ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def views(models, tmp_path_factory):
    """Two v3-ot sessions on tiny llama, prompts of the same length: both parties' views."""
    model = models["llama"]
    reps, servers, clients = _views(model, tmp_path_factory.mktemp("views"), PROMPTS, N)
    return {"reps": reps, "model": model, "server": servers, "client": clients}


def test_llama_greedy_over_tls_equals_the_reference_for_two_prompts(views):
    model = views["model"]
    got = [rep.result.token_ids for rep in views["reps"]]
    assert got == [reference_generate(model, p, N, GREEDY, stop_ids=()) for p in PROMPTS]
    assert got[0] != got[1]
    assert all(f["lookups"] > 0 and f["triples_and"] > 0 for rep in views["reps"]
               for f in rep.protocol_stats["forwards"])


@pytest.mark.parametrize("role", ["server", "client"])
def test_view_structure_uniformity_and_no_plaintext(views, role):
    a, b = views[role]
    check_structure(a, b)
    for v in (a, b):
        check_uniform(v, lookups=role == "client")
        check_no_plaintext(v)
    if role == "client":  # the lookups ran in both forwards: the table ciphertexts are most of it
        assert a.words["table ciphertexts"] > 200_000 and a.words["lookup outputs"] > 300


# -- broken variants: each check must be able to fail ----------------------------------------------
def _broken_views(models, tmp_path, prompts=([5],), n=1):
    model = models["llama"]
    reps, servers, clients = _views(model, tmp_path, prompts, n)
    for rep, p in zip(reps, prompts):  # a broken privacy, not a broken computation
        assert rep.result.token_ids == reference_generate(model, p, n, GREEDY, stop_ids=())
    return servers, clients


def test_server_view_checks_fail_for_a_client_sending_its_input_unmasked(models, tmp_path, monkeypatch):
    share = mpc_engine.Engine.share

    def unmasked(self, x=None, shape=None):  # r = 0: the server receives enc(x) itself
        if self.role != "client":
            return share(self, x, shape)
        sent = self.encode(x)
        self.transport.to_server("input", sent)
        return Shared(torch.zeros_like(sent), VOID)
    monkeypatch.setattr(mpc_engine.Engine, "share", unmasked)
    (server,), (client,) = _broken_views(models, tmp_path)
    with pytest.raises(AssertionError, match="re-shares"):
        check_uniform(server)
    with pytest.raises(AssertionError, match="within 2"):
        check_no_plaintext(server)
    assert server.found >= 64  # the prompt's embedding row, word for word
    check_uniform(client, lookups=True)  # the client's view does not change
    check_no_plaintext(client)


def test_client_view_checks_fail_for_tables_with_one_s_out(models, tmp_path, monkeypatch):
    """The server offers every element's table minus the same s_out: the client's lookup outputs
    are the entries all shifted alike. On the wire nothing shows (the 1-of-N pads hide every
    entry either way): the recorded bytes pass, the outputs the client computes from them fail."""
    fresh = lut.random_ring
    monkeypatch.setattr(lut, "random_ring", lambda n: np.repeat(fresh(1), n))
    (server,), (client,) = _broken_views(models, tmp_path)
    with pytest.raises(AssertionError, match="lookup outputs"):
        check_uniform(client, lookups=True)
    check_uniform(client)  # the recorded bytes alone
    check_no_plaintext(client)
    check_uniform(server)
    check_no_plaintext(server)


def test_client_view_checks_fail_for_tables_sent_in_the_clear(models, tmp_path, monkeypatch):
    """No s_out and no 1-of-N pads (both sides' pads zero, so the lookups still compute f): the
    tables, rotated by the server's index share, travel in the clear, and the client's lookup
    outputs are f(x) itself."""
    monkeypatch.setattr(lut, "random_ring", lambda n: np.zeros(n, np.uint64))
    monkeypatch.setattr(nofn, "pad_bytes", lambda blocks, nbytes, domain=1: np.zeros((len(blocks), nbytes), np.uint8))
    (server,), (client,) = _broken_views(models, tmp_path)
    with pytest.raises(AssertionError, match="table ciphertexts"):
        check_uniform(client)
    with pytest.raises(AssertionError, match="table ciphertexts"):
        check_no_plaintext(client)
    assert client.small["lookup outputs"] == client.words["lookup outputs"]  # every one in the clear
    # the same pads hide the client's multiplexer entries (mux.py) from the server
    with pytest.raises(AssertionError, match="multiplexer ciphertexts"):
        check_uniform(server)


def test_structure_check_fails_for_a_prefill_chunked_by_content(views, models, tmp_path, monkeypatch):
    """A client that ends a prefill chunk after the prompt's largest id (unless it is last): two
    prompts of the same length then give the server different forwards. On PROMPTS[0] (largest
    id last) it runs as the sound client does, so its session is the views fixture's; on
    PROMPTS[1] it prefills one token at a time."""
    prefill = generation.prefill

    async def by_content(client, ids, progress=None):
        cut = int(np.argmax(ids)) + 1
        if cut < len(ids):
            await client.forward(ids[:cut])
            return await client.forward(ids[cut:])
        return await prefill(client, ids, progress)
    monkeypatch.setattr(generation, "prefill", by_content)
    forwards = units.forwards  # mask material for the extra forward's head (the client's own)
    monkeypatch.setattr(units, "forwards", lambda prompt_tokens, max_tokens: forwards(prompt_tokens, max_tokens) + 1)
    (server,), (client,) = _broken_views(models, tmp_path, PROMPTS[1:], N)
    for a, b in ((views["server"][0], server), (views["client"][0], client)):
        with pytest.raises(AssertionError):
            check_structure(a, b)
        check_uniform(b, lookups=b.role == "client")  # all else holds: only the structure shows it
        check_no_plaintext(b)


# -- 3. a replayed or reordered OT message in a session ------------------------------------------------
class _Tampering(Channel):
    """The client's channel: replays its 2nd OT_EXT_U of the first forward (its IKNP columns for
    the server's extension: the AND triples and the tables' OTs) as the bytes were on the wire
    (its sequence number included), or holds back its first OT_NOFN_CT of the forward (the
    header of its multiplexer entries, mux.py) until the next message (their ciphertexts) has
    gone out. (A held message is let go in order before the client waits for anything.)"""

    how = "replay"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.forward, self.count, self.held, self.writing, self.receiving = False, 0, None, False, False
        self.count_held = False

    async def _send_held(self):
        (held_type, held), self.held = self.held, None
        self._send_seq -= 1  # counted when it was held
        await super()._write(held_type, held)

    async def _write(self, msg_type, frame):
        self.forward |= msg_type == MsgType.MPC_INPUT
        if msg_type == MsgType.OT_EXT_U and self.forward:
            self.count += 1
        if (self.how == "reorder" and msg_type == MsgType.OT_NOFN_CT and self.forward and not self.count_held
                and self.held is None and not self.receiving):
            self.held, self.count_held = (msg_type, frame), True
            self._send_seq += 1  # the next message takes the following number
            return frame[1]
        self.writing = True
        try:
            size = await super()._write(msg_type, frame)
            if self.how == "replay" and msg_type == MsgType.OT_EXT_U and self.count == 2:
                await super()._write(msg_type, frame)
            elif self.held is not None:
                await self._send_held()  # after a later message: reordered
            return size
        finally:
            self.writing = False

    async def recv(self):
        if self.held is not None and not self.writing:
            await self._send_held()
        self.receiving = True
        try:
            return await super().recv()
        finally:
            self.receiving = False


@pytest.mark.parametrize("how", ["replay", "reorder"])
def test_a_replayed_or_reordered_ot_message_ends_the_session(models, tmp_path, monkeypatch, caplog, how):
    """The server refuses the session on the out-of-sequence frame (its log says why); the client
    hears the error, or finds the connection closed if it was sending a flight of its own."""
    monkeypatch.setattr(_Tampering, "how", how)
    monkeypatch.setattr(client_mod, "Channel", _Tampering)
    with caplog.at_level(logging.INFO, logger="shardlm.server"):
        (err,) = _run(models["llama"], tmp_path, [[5, 77]], 1, record=False)
    if isinstance(err, RemoteError):
        assert err.code == "malformed" and "sequence number" in err.message, err
    else:
        assert isinstance(err, ConnectionClosed), err
    (ended,) = [r.getMessage() for r in caplog.records if "session ended" in r.getMessage()]
    got, want = map(int, re.search(r"\(error .*sequence number (\d+), expected (\d+)\)", ended).groups())
    assert got == want + (1 if how == "reorder" else -1), ended  # the frame after, or the one before, again


# -- 4. the session TTL ------------------------------------------------------------------------------
def test_a_v3_ot_session_lives_its_protocols_longer_ttl(models, tmp_path):
    """A server with a 0.3 s TTL: a v3-ot session, which takes longer than that on the tiny model
    (~0.6 s), lives 6 s (``session_ttl_scale``; a SmolLM2 token takes 15-55 s) and completes."""
    model, prompt = models["llama"], [5, 77]

    async def main():
        async with tls_server(tmp_path, model=model, session_ttl=0.3) as (server, cfg):
            t0 = trio.current_time()
            rep = await run_generation(cfg, model, registry.get("v3-ot"), prompt, N, GREEDY, ignore_eos=True,
                                       options=OPTS)
            return rep, trio.current_time() - t0

    rep, took = trio.run(main)
    assert rep.result.token_ids == reference_generate(model, prompt, N, GREEDY, stop_ids=())
    assert took > 0.3  # the server's own TTL alone would have ended it
