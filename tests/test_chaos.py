"""Chaos (issue 22): kill -9 the server or the client at chosen points of a session, in a loop.

Real processes (`shardlm serve --record-transcript`, `shardlm generate`, `shardlm preprocess`)
on a tiny model. A round starts a client, waits for its kill point, kills the victim with
SIGKILL and checks:

- the survivor: a killed server leaves the client with exit status 1 and one line
  ``error: ...`` on stderr (no traceback), and a restarted server serves again; a killed client
  leaves the server running, with 0 active sessions in ``health`` once the connection is gone,
  and serving the next client;
- the material: a store is marked used before its first row left (a killed run's store is
  refused on a re-run, a fresh one works), its claim does not outlive the killed run;
- nothing left behind: no ``*.tmp`` file, no traceback in the server's log;
- at the end, over every transcript the server recorded (those of a killed server are cut:
  read up to their last complete frame), no masked row reached the server twice.

Kill points, each watched on the server's transcript (flushed frame by frame) or the store:
``handshake`` (the server finished TLS, HELLO not answered yet), ``material`` (the client
claimed its --material store: loading it), ``prefill`` / ``decode`` (after the k-th masked
linear request), ``ot`` (after the k-th OT message of --embedding ot); with ``--net`` on the
client so the windows are wide. ``random`` (long runs only): a seeded random delay within the
measured length of a session, without --net; where it landed is read from the transcript.
Mid-HE kill points do not exist yet: there is no HE offline phase.

The in-suite loop covers each point once or twice (9 rounds). A long run:
``SHARDLM_CHAOS_ROUNDS=200 pytest tests/test_chaos.py -s`` (seeded: SHARDLM_CHAOS_SEED).
"""
import collections
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from conftest import build_tiny
from shardlm.models.load import load_model
from shardlm.models.reference import generate as reference_generate
from shardlm.models.sampling import SamplingParams
from shardlm.party.client import ClientConfig, connect
from shardlm.party.run import run_generation
from shardlm.protocols import registry
from shardlm.protocols.preprocess import MaterialError, MaterialStore
from shardlm.wire import tls

from support import scan_masked_rows

ROUNDS = int(os.environ.get("SHARDLM_CHAOS_ROUNDS", "0"))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(max(600, 30 * ROUNDS))]  # a long run outlasts the default
SEED = int(os.environ.get("SHARDLM_CHAOS_SEED", "22"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
L = 2  # the tiny model's layers
PER_FORWARD = {"v3": 4 * L + 1, "v3-2r": 2 * L + 2, "v2": 7 * L + 1}  # masked requests per forward
NET = "rtt=200ms"  # the client's simulated link in watched rounds: >= 100 ms between a request and the next
PROMPTS = ["hello", "hello there", "tell me a story"]  # few, so that sessions repeat a prompt
MAX_TOKENS = 8
POLL = 0.003

# (kill point, victim, protocol, material store): each point once or twice, both victims
SCHEDULE = [
    ("handshake", "client", "v3", False), ("handshake", "server", "v3-2r", False),
    ("material", "client", "v3", True),
    ("prefill", "client", "v2", False), ("prefill", "server", "v3-2r", False),
    ("decode", "client", "v3", True), ("decode", "server", "v2", False),
    ("ot", "client", "v3", False), ("ot", "server", "v3-2r", False),
]


# -- processes ---------------------------------------------------------------------------------
def _cli(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shardlm.cli", *args], env=ENV, **popen)


class ServerProcess:
    """`shardlm serve` on a fixed certificate, restartable on the same port and record directory."""

    def __init__(self, root: Path, model_dir: Path):
        self.root, self.model_dir = root, model_dir
        self.fingerprint = tls.generate_server_cert(root / "certs")
        self.rec = root / "rec"
        self.rec.mkdir()
        self.log = root / "server.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = _cli("serve", "--json", "--host", "127.0.0.1", "--port", str(self.port),
                             "--cert", str(self.root / "certs/server.crt"), "--key", str(self.root / "certs/server.key"),
                             "-m", str(self.model_dir), "--threads", "1", "--record-transcript", str(self.rec),
                             stdout=subprocess.PIPE, stderr=log, text=True)
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            assert sel.select(120), "the server did not report listening within 120 s"
        event = json.loads(self.proc.stdout.readline() or "{}")
        assert event.get("event") == "listening", (event, self.log.read_text()[-2000:])
        self.port = event["port"]
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()

    def stop(self) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.proc.stdout.close()

    def config(self) -> ClientConfig:
        return ClientConfig(server=f"127.0.0.1:{self.port}", fingerprint=self.fingerprint, timeout=30)

    @property
    def client_args(self) -> list[str]:
        return ["-s", f"127.0.0.1:{self.port}", "--tls-fingerprint", self.fingerprint]

    def health(self) -> dict:
        async def ask():
            async with connect(self.config()) as conn:
                return await conn.health()
        return trio.run(ask)

    def until_idle(self, timeout: float = 20) -> dict:
        """Health once no session is left (the killed client's connection is gone)."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if (h["active_sessions"], h["connections"]) == (0, 1) or time.monotonic() > deadline:
                return h
            time.sleep(0.05)


class ClientProcess:
    def __init__(self, root: Path, name: str, args: list[str]):
        self.out, self.err = root / f"{name}.out", root / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = _cli("generate", *args, stdout=out, stderr=err)
        self.started = time.monotonic()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def stderr(self) -> str:
        return self.err.read_text()


def assert_clear_error(client: ClientProcess) -> str:
    """Exit status 1 and one line `error: ...` at the end of stderr, no traceback."""
    err = client.stderr
    assert client.proc.returncode == 1 and "Traceback" not in err, (client.proc.returncode, err[-3000:])
    lines = err.rstrip("\n").split("\n")
    assert lines[-1].startswith("error: ") and sum(ln.startswith("error: ") for ln in lines) == 1, err[-3000:]
    return lines[-1]


# -- what the server recorded ------------------------------------------------------------------
def recorded_types(session: Path) -> list[str]:
    """Message types of a session's transcript so far (complete index lines only)."""
    try:
        text = (session / "index.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["type"] for line in text.split("\n")[:-1]]


def new_sessions(rec: Path, before: set) -> list[Path]:
    """Sessions recorded since ``before`` (a set of names) by a generating client (not health checks)."""
    out = []
    for d in sorted(rec.iterdir()):
        if d.name not in before and "HEALTH" not in recorded_types(d)[:1]:
            out.append(d)
    return out


def landed(types: list[str], protocol: str) -> str:
    """Where in a session its transcript ends: the kill point it shows."""
    if "BYE" in types:
        return "finished"
    masked = types.count("MASKED_LINEAR")
    if types and types[-1].startswith("OT_"):
        return "ot"
    if masked == 0:
        return "handshake"
    return "prefill" if masked < PER_FORWARD[protocol] else "decode"


# -- the loop ----------------------------------------------------------------------------------
class Chaos:
    def __init__(self, root: Path, model_dir: Path, seed: int):
        self.root, self.model_dir = root, model_dir
        self.model = load_model(str(model_dir))
        self.rng = random.Random(seed)
        self.server = ServerProcess(root, model_dir)
        self.server.start()
        self.n = 0
        self.stores = 0
        self.summary = collections.Counter()
        self.session_seconds = None  # measured once: a no-net session, connect to exit

    # -- helpers
    def client(self, *args: str) -> ClientProcess:
        self.n += 1
        return ClientProcess(self.root, f"client{self.n:03d}", [*self.server.client_args, "-m", str(self.model_dir),
                                                               "--threads", "1", *args])

    def store(self, protocol: str) -> Path:
        """A fresh store from `shardlm preprocess`."""
        self.stores += 1
        out = self.root / f"store{self.stores:03d}"
        proc = _cli("preprocess", "-m", str(self.model_dir), "--protocol", protocol, "--tokens", "48",
                    "--out", str(out), "--threads", "1", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        return out

    def reference(self, prompt: str, n: int) -> list[int]:
        ids = self.model.tokenizer.encode_prompt(prompt)
        return reference_generate(self.model, ids, n, SamplingParams())

    def next_client_is_served(self, protocol: str) -> None:
        prompt = self.rng.choice(PROMPTS)
        ids = self.model.tokenizer.encode_prompt(prompt)

        async def main():
            return await run_generation(self.server.config(), self.model, registry.get(protocol), ids, 3,
                                        SamplingParams())
        assert trio.run(main).result.token_ids == self.reference(prompt, 3)

    def measure(self) -> float:
        """Seconds from a no-net v3 session's connection to its BYE, as the server records them."""
        if self.session_seconds is None:
            before = {d.name for d in self.server.rec.iterdir()}
            c = self.client("-p", PROMPTS[0], "--max-tokens", str(MAX_TOKENS), "--protocol", "v3")
            t_connected = None
            while True:
                session = new_sessions(self.server.rec, before)
                if t_connected is None and session:
                    t_connected = time.monotonic()
                if session and "BYE" in recorded_types(session[0]):
                    break
                assert c.running, c.stderr[-2000:]
                time.sleep(POLL)
            self.session_seconds = time.monotonic() - t_connected
            assert c.wait() == 0, c.stderr[-2000:]
        return self.session_seconds

    def random_round(self) -> tuple:
        if self.rng.random() < 0.5:
            return ("random", self.rng.choice(["client", "server"]), self.rng.choice(list(PER_FORWARD)),
                    self.rng.random() < 0.3, True)
        point = self.rng.choice(["handshake", "material", "prefill", "decode", "ot"])
        victim = "client" if point == "material" else self.rng.choice(["client", "server"])
        material = point == "material" or (point in ("prefill", "decode") and self.rng.random() < 0.5)
        return point, victim, self.rng.choice(list(PER_FORWARD)), material, True

    # -- one round
    def round(self, point: str, victim: str, protocol: str, material: bool, jitter: bool = False) -> str:
        """``jitter`` (random rounds): a material kill comes up to 0.1 s after the claim, so it
        also lands after the store was marked used (the first row, if sent, is the only one:
        the next is a simulated round trip later)."""
        rng, server = self.rng, self.server
        t0 = time.monotonic()
        prompt = rng.choice(PROMPTS)
        store = self.store(protocol) if material else None
        args = ["-p", prompt, "--max-tokens", str(MAX_TOKENS), "--protocol", protocol]
        if point != "random":
            args += ["--net", NET]
        if point == "ot":
            args += ["--embedding", "ot"]
        if store is not None:
            args += ["--material", str(store)]
        per = PER_FORWARD[protocol]
        k = {"prefill": lambda: rng.randint(1, per - 2), "decode": lambda: rng.randint(per + 1, per + 4),
             "ot": lambda: rng.randint(1, 4)}.get(point, lambda: 0)()
        delay = rng.uniform(0, self.measure()) if point == "random" else 0.0
        if jitter and point == "material":
            delay = rng.uniform(0, 0.1)
        before = {d.name for d in server.rec.iterdir()}
        client = self.client(*args)

        def session_types():
            s = new_sessions(server.rec, before)
            return recorded_types(s[0]) if s else None

        triggers = {
            "handshake": lambda: session_types() is not None,
            "material": lambda: (store / "lock").exists(),
            "prefill": lambda: (session_types() or []).count("MASKED_LINEAR") >= k,
            "decode": lambda: (session_types() or []).count("MASKED_LINEAR") >= k,
            "ot": lambda: sum(t.startswith("OT_") for t in session_types() or []) >= k,
            "random": lambda: session_types() is not None,
        }
        while not triggers[point]():
            assert client.running, f"{point}: the client ended before its kill point: {client.stderr[-2000:]}"
            time.sleep(POLL)
        time.sleep(delay)
        (client if victim == "client" else server).kill()
        sessions = new_sessions(server.rec, before)  # the killed client's, before any other connects
        assert len(sessions) <= 1, sessions

        # the survivor
        if victim == "server":
            rc = client.wait()
            error = assert_clear_error(client) if rc != 0 or point != "random" else None
            server.start()  # a restarted server serves again
        else:
            assert server.alive, server.log.read_text()[-3000:]
            error = None
        health = server.until_idle()
        assert (health["active_sessions"], health["connections"]) == (0, 1), health

        # where the kill landed, from what the server recorded
        where = landed(recorded_types(sessions[0]), protocol) if sessions else "before connecting"
        if point == "material":  # claimed, perhaps marked used, no row sent yet (or the first in flight)
            assert sessions and recorded_types(sessions[0]).count("MASKED_LINEAR") <= 1
            used = any(json.loads((store / "cursor.json").read_text()).values())
            where = f"material ({'marked used' if used else 'still unused'})"
        elif point != "random":
            assert where == point, (point, victim, k, recorded_types(sessions[0]) if sessions else None)

        # the material: marked used before its first row left; a used store is refused, a fresh one works
        if store is not None:
            used = any(json.loads((store / "cursor.json").read_text()).values())
            sent = sessions and "MASKED_LINEAR" in recorded_types(sessions[0])
            assert used or not sent, f"{store}: rows were sent, yet the store is not marked used"
            again = self.client("-p", prompt, "--max-tokens", "4", "--protocol", protocol, "--material", str(store),
                                "--json")
            again.wait()
            if used:  # the claim died with the killed run: refused as used, not as in use
                assert again.proc.returncode == 1 and "Traceback" not in again.stderr, again.stderr[-2000:]
                err = json.loads(again.out.read_text())
                assert err["code"] == "material" and "already used" in err["error"], err
            else:
                assert again.proc.returncode == 0, again.stderr[-2000:]
            fresh = self.client("-p", prompt, "--max-tokens", "4", "--protocol", protocol, "--material",
                                str(self.store(protocol)), "--json")
            assert fresh.wait() == 0, fresh.stderr[-2000:]
            assert json.loads(fresh.out.read_text())["token_ids"] == self.reference(prompt, 4)
            with pytest.raises(MaterialError, match="already used"):  # used by now, and not held by anyone
                MaterialStore.load(store)
        else:
            self.next_client_is_served(protocol)

        # nothing left behind
        leftovers = [str(p) for p in self.root.rglob("*.tmp")]
        assert not leftovers, leftovers
        assert "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]
        label = f"{point}/{victim}/{protocol}{'/material' if material else ''}: landed {where}"
        self.summary[label.split(": ")[0].split("/")[0] + " -> " + where] += 1
        print(f"round {sum(self.summary.values())}: {label}" + (f" ({error})" if error else "")
              + f" [{time.monotonic() - t0:.1f} s]", flush=True)
        return where


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos")
    build_tiny("llama", root / "model", seed=5)
    c = Chaos(root, root / "model", SEED)
    yield c
    c.server.stop()


def test_kill_9_at_every_point_of_a_session(chaos):
    t0 = time.monotonic()
    rounds = list(SCHEDULE) + [chaos.random_round() for _ in range(max(0, ROUNDS - len(SCHEDULE)))]
    for i, r in enumerate(rounds):
        chaos.round(*r)
        if (i + 1) % 25 == 0:  # long runs: check as they go
            scan = scan_masked_rows(chaos.server.rec)
            assert not scan.duplicates, scan.describe()
    scan = scan_masked_rows(chaos.server.rec)
    print(f"{len(rounds)} rounds in {time.monotonic() - t0:.0f} s, {chaos.server.starts} server starts; "
          f"{scan.sessions} recorded sessions ({len(scan.partial)} cut by a kill), rows {dict(scan.rows)}; "
          f"kill points -> where they landed: {dict(chaos.summary)}")
    assert scan.rows["MASKED_LINEAR"] > 0 and scan.rows["OT_EXT_U"] > 0
    assert not scan.duplicates, f"{len(scan.duplicates)} masked rows reached the server twice: {scan.describe()}"
