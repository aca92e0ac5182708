"""The two-host WAN table: protocols x links x prompts through ``shardlm netsim-proxy``.

    python -m shardlm.party.bench_wan [--model smollm2] [--protocol v3 ...] [--rtt 0ms 20ms ...]
        [--bw 100mbit ...] [--prompt chat edit] [--tokens 8] [--client-arg=--draft ...] [--json]

One ``shardlm serve`` (one torch thread) holds the model; per link (RTT x bandwidth) a proxy
process delays and rate-limits both directions (party/proxy.py), and per cell an unmodified
``shardlm generate --json`` client (one torch thread) runs through it. A ``--protocol`` entry is
the protocol's name followed by its client flags, as one argument: ``"v3-2r --reply-bits full"``
(the entry is also the row's label), so any declared option rides along; ``--client-arg`` adds
flags to every client (a hook for options such as speculative drafts). Each row: decode tok/s,
rounds and bytes (both ways) per generated token, prefill time, and accepted tokens per forward
where the client reports it. The default grid is the whole table (4 protocols x 4 RTTs x 2
rates x 2 prompts: about an hour on SmolLM2); pick a subset with the flags. Figures depend on the
machine's load: note ``/proc/loadavg`` next to them (it is printed with each run).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys

from . import launch

PROMPTS = {
    "chat": "What are three good habits for staying focused while working from home?",
    "edit": ("Rewrite this paragraph with the small changes asked, keeping everything else word for word. "
             "Change 'Tuesday' to 'Thursday' and 'ten' to 'eleven'.\n\n"
             "The team meets every Tuesday at ten in the small room on the second floor. Bring the weekly "
             "numbers, a short list of blockers, and any questions for the product group. The meeting "
             "ends on time, so keep updates brief and send details by email afterwards."),
}
PROTOCOLS = ["plain", "v3", "v3-2r", "split"]
RTTS = ["0ms", "5ms", "20ms", "50ms"]
RATES = ["1gbit", "100mbit"]


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_cell(server: launch.ServerProcess, address: str, model: str, entry: str, prompt: str, tokens: int,
             client_args: list[str], timeout: float = 1800) -> dict:
    """One client run through ``address``: the row of the table (or the error it ended with)."""
    name, *flags = shlex.split(entry)
    cmd = [sys.executable, "-m", "shardlm.cli", "generate", "--json", "-s", address,
           "--tls-fingerprint", server.fingerprint, "-m", model, "--protocol", name, "--threads", "1",
           "--max-tokens", str(tokens), "-p", prompt, *flags, *client_args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:  # with --json the client's one-line error is on stdout
        return {"error": (done.stdout.strip().splitlines() or done.stderr.strip().splitlines()
                          or [f"exit {done.returncode}"])[-1]}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    per = out["per_decode_token"]
    row = {
        "generated": out["generated_tokens"],
        "decode_tok_s": out["timing"]["decode_tokens_per_s"],
        "prefill_ms": out["timing"]["prefill_ms"],
        "rounds_per_token": per["rounds"],
        "bytes_per_token": (per["bytes_sent"] or 0) + (per["bytes_received"] or 0) if per["rounds"] is not None else None,
        "bytes_down_per_token": per["bytes_received"],
        "offline_ms": out.get("offline_ms"),
    }
    drafting = out.get("drafting")
    if drafting:
        row["tokens_per_forward"] = drafting["tokens_per_forward"]
    if "auto" in out:  # --protocol auto: what it chose
        row["chose"] = f"{out['auto']['chose']['protocol']} K={out['auto']['chose']['draft_len']}"
    return row


def run(model: str, protocols: list[str], rtts: list[str], rates: list[str], prompts: dict[str, str], tokens: int,
        client_args: list[str] = (), on_row=None, server_args: list[str] = ()) -> list[dict]:
    """The grid, one row per cell (``prompts``: label -> text); ``on_row(row)`` as each finishes."""
    names = {shlex.split(e)[0] for e in protocols} - {"plain", "split"}
    names = sorted(names - {"auto"} | ({"v3", "v3-2r"} if "auto" in names else set()))  # what auto may choose
    rows = []
    with launch.server(["--model", model, "--threads", "1", "--preload", ",".join(names) or "none", *server_args],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}) as server:
        for bw in rates:
            for rtt in rtts:
                with launch.proxy(server.address, rtt=rtt, bw=bw) as px:
                    for prompt, text in prompts.items():
                        for entry in protocols:
                            before = load()
                            row = {"protocol": entry, "rtt": rtt, "bw": bw, "prompt": prompt, "load": before,
                                   **run_cell(server, px.address, model, entry, text, tokens,
                                              list(client_args))}
                            rows.append(row)
                            if on_row is not None:
                                on_row(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--protocol", action="append", metavar="'NAME [FLAGS]'",
                    help=f"repeatable (default: {' '.join(PROTOCOLS)}), e.g. 'v3 --reply-bits full'")
    ap.add_argument("--rtt", nargs="+", default=RTTS)
    ap.add_argument("--bw", nargs="+", default=RATES)
    ap.add_argument("--prompt", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    ap.add_argument("--tokens", type=int, default=8, help="tokens to generate per cell (few: rounds dominate)")
    ap.add_argument("--client-arg", action="append", default=[], metavar="FLAG",
                    help="a flag for every client, e.g. --client-arg=--draft ... (repeatable)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the server and proxy processes are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def show(row):
        if args.json:
            return
        if "error" in row:
            print(f"{row['protocol']:<24} {row['rtt']:>5} {row['bw']:>8} {row['prompt']:<5} ERROR {row['error']}",
                  flush=True)
            return
        acc = f" tokens/fwd {row['tokens_per_forward'] or 0:.2f}" if "tokens_per_forward" in row else ""
        acc += f" chose {row['chose']}" if "chose" in row else ""
        print(f"{row['protocol']:<24} {row['rtt']:>5} {row['bw']:>8} {row['prompt']:<5} "
              f"{row['decode_tok_s']:7.2f} tok/s  {row['rounds_per_token'] or 0:6.1f} rounds/tok  "
              f"{(row['bytes_per_token'] or 0) / 1e3:8.1f} kB/tok  prefill {row['prefill_ms']:7.0f} ms"
              f"{acc}  (load {row['load']})", flush=True)
    rows = run(args.model, args.protocol or PROTOCOLS, args.rtt, args.bw, {p: PROMPTS[p] for p in args.prompt}, args.tokens,
               args.client_arg, show)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
