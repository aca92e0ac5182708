"""OT extension throughput between two processes over loopback TLS.

    python -m shardlm.protocols.ot.bench_ot [--count 2^20] [--kind random|correlated|chosen]
        [--embedding VxD] [--net rtt=10ms,bw=1gbit] [--json]

Starts ``shardlm serve`` as a child process (fresh pinned certificate), opens an ``ot`` session
from this process and runs one batch with the server as OT sender and this process as
receiver. Reports OTs per second of the extension (base OTs excluded), the base-OT set-up time,
and bytes per OT as counted by the client's channel (both directions, frame headers
included).
"""

from __future__ import annotations

import json
import re
import time

import click
import numpy as np
import trio

from ...party import launch
from ...party.client import ClientConfig, connect
from ...wire import netsim
from . import embedding, prims
from .service import KINDS, MAX_COUNT, OtClient, synthetic_table


def parse_count(text: str) -> int:
    """An integer, or 2^k / 2**k / 1<<k."""
    s = str(text).strip().replace(" ", "")
    m = re.fullmatch(r"2(?:\^|\*\*)(\d+)", s) or re.fullmatch(r"1<<(\d+)", s)
    if m:
        return 1 << int(m.group(1))
    try:
        return int(s.replace("_", ""))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected an integer or 2^k") from None


def _shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[xX,](\d+)", text.strip())
    if not m:
        raise click.BadParameter(f"{text!r}: expected VxD, e.g. 49152x576", param_hint="--embedding")
    return int(m.group(1)), int(m.group(2))


async def run_bench(cfg: ClientConfig, kind: str, count: int, nbytes: int) -> dict:
    async with connect(cfg) as conn:
        await conn.open_session("ot")
        client = OtClient(conn.channel)
        res = await client.batch(kind, count, server_role="sender", nbytes=nbytes, keep=False)
        stats = conn.channel.stats
        ext = stats[f"ot-{kind}"]
        base = stats.get("ot-base")
    ext_bytes = ext.bytes_sent + ext.bytes_received
    return {
        "kind": kind, "count": count,
        "ots_per_s": count / res["seconds"],
        "extension_seconds": res["seconds"],
        "base_ot_seconds": res["setup_seconds"],
        "server_seconds": res["done"]["seconds"],
        "bytes_per_ot": ext_bytes / count if count else 0.0,
        "bytes_receiver_to_sender": ext.bytes_sent,
        "bytes_sender_to_receiver": ext.bytes_received,
        "base_ot_bytes": (base.bytes_sent + base.bytes_received) if base else 0,
        "rounds": ext.rounds,
    }


async def run_embedding_bench(cfg: ClientConfig, rows: int, cols: int, count: int) -> dict:
    ids = np.frombuffer(prims.random_bytes(8 * count), dtype=np.uint64) % rows
    async with connect(cfg) as conn:
        await conn.open_session("ot")
        client = OtClient(conn.channel)
        t0 = time.perf_counter()
        got = await client.retrieve_rows(ids, table={"rows": rows, "cols": cols, "seed": 1})
        seconds = time.perf_counter() - t0
        stats = conn.channel.stats
    if not np.array_equal(got, synthetic_table(rows, cols, 1)[ids.astype(np.int64)]):
        raise click.ClickException("embedding retrieval returned wrong rows")
    phases = [stats[p] for p in ("emb-table", "emb-keys") if p in stats]
    down = sum(p.bytes_received for p in phases)
    up = sum(p.bytes_sent for p in phases)
    return {
        "kind": "embedding", "rows": rows, "cols": cols, "tokens": count, "seconds": seconds,
        "bytes_per_token": (down + up) / count, "bytes_table": stats["emb-table"].bytes_received,
        "bytes_keys_per_token": stats["emb-keys"].bytes_received / count,
        "bytes_iknp_per_token": stats["emb-keys"].bytes_sent / count,
        "formula": embedding.cost_bytes(rows, cols, count),
        "base_ot_bytes": stats["ot-base"].bytes_sent + stats["ot-base"].bytes_received,
        "rows_correct": True,
    }


@click.command()
@click.option("--count", default="2^20", show_default=True, help="Number of OTs (an integer or 2^k).")
@click.option("--kind", type=click.Choice(KINDS), default="random", show_default=True)
@click.option("--nbytes", default=16, show_default=True, help="Message bytes for --kind chosen.")
@click.option("--net", default=None, help="Simulate a link on the client side, e.g. 'rtt=10ms,bw=1gbit'.")
@click.option("--embedding", "embedding_shape", default=None, metavar="VxD",
              help="Instead: retrieve --count rows privately from a synthetic V x D float32 table "
                   "(e.g. 49152x576) and report bytes per token.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def main(count, kind, nbytes, net, embedding_shape, as_json):
    """Benchmark IKNP OT extension between two processes over loopback TLS.

    The server process is the OT sender, this process the receiver (random choice bits).
    """
    n = parse_count(count)
    if not 1 <= n <= MAX_COUNT:
        raise click.BadParameter(f"{n}: between 1 and {MAX_COUNT} (2^{MAX_COUNT.bit_length() - 1}) OTs per batch",
                                 param_hint="--count")
    spec = None
    if net:
        try:
            spec = netsim.parse_netspec(net)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--net") from None
    with launch.server(["--idle-timeout", "3600", "--session-ttl", "3600"]) as srv:
        cfg = srv.client_config(timeout=3600, net=spec)
        t0 = time.perf_counter()
        if embedding_shape:
            result = trio.run(run_embedding_bench, cfg, *_shape(embedding_shape), n)
        else:
            result = trio.run(run_bench, cfg, kind, n, nbytes)
        result["wall_seconds"] = time.perf_counter() - t0
    result["net"] = net or "loopback"
    result["transport"] = "TLS 1.3, two processes"
    if as_json:
        click.echo(json.dumps(result, default=str))
    else:
        for k, v in result.items():
            click.echo(f"{k:26s} {v:,.3f}" if isinstance(v, float) else f"{k:26s} {v}")


if __name__ == "__main__":
    main()
