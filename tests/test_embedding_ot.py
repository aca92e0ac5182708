"""Private embedding retrieval on the real model: exact rows, and v3 generation with --embedding ot."""
import numpy as np
import torch
import trio

from shardlm.models.reference import generate
from shardlm.models.sampling import SamplingParams
from shardlm.party.client import connect
from shardlm.party.run import run_generation
from shardlm.protocols import registry
from shardlm.party.transcript import load_transcript, session_dirs
from shardlm.protocols.ot.service import OtClient
from shardlm.wire.msgtypes import MsgType

from support import tls_server


def test_smollm2_rows_by_oblivious_transfer_are_exact(smollm2, tmp_path):
    ids = [1, 0, 49151, 9906, 9906, 28, 4]  # first, last and repeated rows

    async def main():
        async with tls_server(tmp_path, model=smollm2) as (server, cfg):
            async with connect(cfg) as conn:
                await conn.open_session("ot", smollm2.fingerprint(), 64)
                return await OtClient(conn.channel).retrieve_rows(ids)

    rows = trio.run(main)
    table = smollm2.weights["embed"]
    assert rows.dtype == np.float32 and rows.shape == (len(ids), table.shape[1])
    assert torch.equal(torch.from_numpy(rows), table[ids])


def test_v3_with_oblivious_embedding_matches_the_reference_and_never_sends_ids(tmp_path):
    from conftest import build_tiny
    from shardlm.models.load import load_model

    build_tiny("llama", tmp_path / "m", seed=4)
    model = load_model(str(tmp_path / "m"))
    prompt = [17, 250, 3, 99, 42]
    rec = tmp_path / "rec"

    async def main():
        async with tls_server(tmp_path, model=model, record_dir=str(rec)) as (server, cfg):
            return await run_generation(cfg, model, registry.get("v3"), prompt, 6, SamplingParams(), ignore_eos=True,
                                        options={"embedding_source": "ot"})

    rep = trio.run(main)
    assert rep.result.token_ids == generate(model, prompt, 6, SamplingParams(), stop_ids=())
    (d,) = session_dirs(rec)
    msgs = load_transcript(d)[1]
    requests = [m.body for m in msgs if m.type == MsgType.OT_EMB_REQ]
    assert [r["count"] for r in requests] == [5, 1, 1, 1, 1, 1]  # counts, never ids
    assert all(set(r) == {"count", "setup"} for r in requests)
    # the honest cost: the whole (encrypted) table crosses the link for every request
    assert sum(s["bytes_received"] for s in rep.stats.values()) > 6 * model.embedding_table().nbytes
