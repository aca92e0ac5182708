"""No masked row ever reaches the server twice (DESIGN.md s6.4), and the check can fail.

A uniformity test does not notice 1 mask row in 100 repeating, but the server does: two
sessions that mask the same activation with the same row send the same ``x - r``, and any two
rows masked alike give it ``x1 - x2``. So every row the server received, in every recorded
session, is hashed (support.scan_masked_rows) and no hash may appear twice; the second test
runs a client whose mask material reuses ~1% of its rows and shows the same check finds them.
"""
import random

import pytest
import trio

from conftest import load_tiny_models
from shardlm.models.sampling import SamplingParams
from shardlm.party.run import run_generation
from shardlm.party.transcript import load_transcript, session_dirs
from shardlm.protocols import offline, preprocess, registry
from shardlm.wire.msgtypes import MsgType

from support import assert_uniform_ring, scan_masked_rows, tls_server

GREEDY = SamplingParams()
PROMPT, OTHER = [5, 77, 31, 200, 9, 14], [250, 1, 99, 42, 7, 8]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_tiny_models(tmp_path_factory, ["llama"], 11)["llama"]


def _run_sessions(model, tmp_path, rec, runs):
    """``runs``: [(protocol, prompt, max_tokens, options)], one session each, over real TLS to a
    server recording what it receives under ``rec``."""
    async def main():
        async with tls_server(tmp_path, model=model, record_dir=str(rec)) as (server, cfg):
            for protocol, prompt, n, options in runs:
                await run_generation(cfg, model, registry.get(protocol), prompt, n, GREEDY, ignore_eos=True,
                                     options=options)
    trio.run(main)


def test_no_masked_row_repeats_across_many_sessions(model, tmp_path):
    rec = tmp_path / "rec"
    runs = [("v3", PROMPT, 8, {}), ("v3", PROMPT, 8, {}), ("v3", OTHER, 8, {}),   # the same prompt twice:
            ("v3-2r", PROMPT, 8, {}), ("v3-2r", PROMPT, 8, {}),                  # where a reuse would show
            ("v2", PROMPT, 8, {}), ("v2", PROMPT, 8, {}),
            ("v3", PROMPT, 4, {"embedding_source": "ot"}), ("v3", PROMPT, 4, {"embedding_source": "ot"})]
    _run_sessions(model, tmp_path, rec, runs)
    scan = scan_masked_rows(rec)
    assert scan.sessions == len(runs) and not scan.partial
    # every linear row of every forward, and the OT receiver's messages, were looked at
    assert scan.rows["MASKED_LINEAR"] > 1000 and scan.rows["OT_EXT_U"] >= 2 * 128 and scan.rows["OT_BASE_A"] == 2
    assert not scan.duplicates, f"{len(scan.duplicates)} masked rows reached the server twice: {scan.describe()}"


class ReusingStore(preprocess.MaterialStore):
    """A deliberately broken store: about 1 row in 100 it hands out is one an earlier store of
    this process handed out for the same unit and row (a cache of mask rows consulted where it
    should not be). The products stay right (its W r comes along), so generation is exact and
    nothing looks wrong to the client."""

    earlier: dict = {}  # (unit, row) -> (r, W r), across the stores of one test
    reused: list = []   # (unit, row) of every row handed out again

    def __init__(self, store: preprocess.MaterialStore, rng: random.Random):
        super().__init__(store.meta, store.pools)
        self.rng = rng

    def take(self, unit: str, n: int):
        start = self.pools[unit].cursor
        r, wr = super().take(unit, n)
        r, wr = r.clone(), wr.clone()
        for i in range(n):
            key = (unit, start + i)
            if key in self.earlier and self.rng.random() < 0.01:
                r[i], wr[i] = self.earlier[key]
                self.reused.append(key)
            else:
                self.earlier.setdefault(key, (r[i].clone(), wr[i].clone()))
        return r, wr


def test_the_check_finds_one_row_in_a_hundred_reused(model, tmp_path, monkeypatch):
    rng = random.Random(22)
    ReusingStore.earlier, ReusingStore.reused = {}, []
    real_deal = offline.deal_locally
    monkeypatch.setattr(offline, "deal_locally", lambda *a, **k: ReusingStore(real_deal(*a, **k), rng))
    rec = tmp_path / "rec"
    _run_sessions(model, tmp_path, rec, [("v3", PROMPT, 24, {})] * 4)
    scan = scan_masked_rows(rec)
    sent = scan.rows["MASKED_LINEAR"]
    assert 1 <= len(ReusingStore.reused) <= 0.02 * sent  # ~1% of the rows: a partial reuse
    # today's uniformity test passes on this broken client ...
    assert_uniform_ring([m.body["m"] for d in session_dirs(rec) for m in load_transcript(d)[1]
                         if m.type == MsgType.MASKED_LINEAR])
    # ... the reuse check does not: every reused row shows up as a repeat of an earlier session's row
    assert scan.duplicates, "the check missed a reused mask row"
    groups = [{(u, r) for _, _, _, u, r in group} for group in scan.duplicates]
    assert all(len(g) == 1 for g in groups)  # each repeat is one unit's row, in two or more sessions
    assert set().union(*groups) == set(ReusingStore.reused)


def test_the_check_reads_a_transcript_cut_by_a_kill(model, tmp_path):
    """A server killed mid-session leaves a cut last frame and index line; the rows before them count."""
    rec = tmp_path / "rec"
    _run_sessions(model, tmp_path, rec, [("v3", PROMPT, 3, {})])
    (d,) = session_dirs(rec)
    whole = scan_masked_rows(rec).rows["MASKED_LINEAR"]
    index = (d / "index.jsonl").read_text().splitlines(keepends=True)
    last = load_transcript(d)[1][-2]  # the last MASKED_LINEAR (before BYE)
    with open(d / "frames.bin", "r+b") as f:
        f.truncate(_offset(index, last.n) + last.frame_bytes - 5)
    (d / "index.jsonl").write_text("".join(index[:last.n + 1]) + index[last.n + 1][:7])
    with pytest.raises(ValueError):
        load_transcript(d)
    scan = scan_masked_rows(rec)
    assert scan.partial == [d.name] and scan.rows["MASKED_LINEAR"] == whole - last.body["m"].shape[0]


def _offset(index, n):
    import json

    return json.loads(index[n])["offset"]
