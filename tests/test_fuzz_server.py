"""Stateful fuzzing of the server over real TLS sockets (issue 22).

A real server (party/server.py, in-process, on loopback with TLS) runs in a thread; a hypothesis
state machine drives up to three blocking client connections at once with random sequences:
valid and invalid message types for the connection's state (before HELLO, in an echo or an ot
session, inside an ot sub-protocol), wrong sequence numbers, bad magic / version / CRC, oversized
frames and tensors, bodies that fail their schema, garbage msgpack, partial frames followed by a
disconnect, abrupt disconnects (FIN or RST), and plain bytes that are not TLS.

A small model (``predict``) says what the server should do with each well-framed message: a reply
of a given type, an ERROR with a given code, a silent close, or "loose" (a sub-protocol we do not
follow). Invariants: every connection ends, within a bound, with the replies the model predicts
and then an ERROR frame carrying an ErrorCode other than ``internal`` (or, where the model says
so, a close); timeouts (and ``busy``) may cut a connection short at any point; the server task
never dies and logs no internal error; after each sequence a fresh client completes HELLO and a
PING round trip, and ``health()`` reports no active session once every connection is closed. A
second test stalls a connection in each state and checks the server's timeouts end it.

Examples are bounded for the suite; SHARDLM_FUZZ_SCALE multiplies them (README).
"""
from __future__ import annotations

import logging
import queue
import socket
import ssl
import struct
import threading
import time

import numpy as np
import pytest
import trio
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from fuzz_support import LIMITS, fuzz_settings, valid_bodies
from shardlm.party import handshake
from shardlm.protocols import registry
from shardlm.protocols.ot import embedding
from shardlm.protocols.ot import service as ot
from shardlm.wire import codec, frames, tls
from shardlm.wire.errors import ErrorCode, ProtocolError
from shardlm.wire.msgtypes import MsgType, is_known
from support import tls_server

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

VALID = valid_bodies()
TIMING = {ErrorCode.HANDSHAKE_TIMEOUT.value, ErrorCode.IDLE_TIMEOUT.value, ErrorCode.SESSION_EXPIRED.value,
          ErrorCode.BUSY.value}  # may end any connection at any point
CODES = {c.value for c in ErrorCode} - {ErrorCode.INTERNAL.value}
MAX_SEQ_LEN = 4096
CLOSE, LOOSE = "close", "loose"


class ServerThread:
    """A real TLS server (tests/support.tls_server) running in its own thread and trio loop."""

    def __init__(self, tmp_path, **config):
        self.error: BaseException | None = None
        self.logged: list[logging.LogRecord] = []
        self._handler = _ListHandler(self.logged)
        logging.getLogger("shardlm.server").addHandler(self._handler)
        ready: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._main, args=(tmp_path, config, ready), daemon=True)
        self.thread.start()
        got = ready.get(timeout=60)
        if got is None:
            raise RuntimeError("the server did not start") from self.error
        self.server, self.cfg, self.token, self._stop = got
        host, port = self.cfg.server.rsplit(":", 1)
        self.address = (host, int(port))
        self.ctx = tls.client_context(fingerprint=self.cfg.fingerprint)

    def _main(self, tmp_path, config, ready) -> None:
        async def main():
            async with tls_server(tmp_path, **config) as (server, cfg):
                stop = trio.Event()
                ready.put((server, cfg, trio.lowlevel.current_trio_token(), stop))
                await stop.wait()
        try:
            trio.run(main)
        except BaseException as exc:  # the server died: every later check fails on this
            self.error = exc
            ready.put(None)

    def call(self, fn, *args):
        """``fn(*args)`` on the server's own thread (its state is not shared with ours)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)

    def check_alive(self) -> None:
        assert self.error is None and self.thread.is_alive(), f"the server died: {self.error!r}"
        internal = [r.getMessage() for r in self.logged if r.levelno >= logging.ERROR]
        assert not internal, internal

    def wait_idle(self, timeout: float = 10) -> dict:
        """health() once no connection is left (the server sees our closes a moment later)."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.call(self.server.health)
            sessions = self.call(lambda: len(self.server.sessions))
            if health["active_sessions"] == 0 and sessions == 0:
                return health
            assert time.monotonic() < deadline, f"connections or sessions left open: {health}, {sessions} sessions"
            time.sleep(0.01)

    def close(self) -> None:
        try:
            if self.thread.is_alive():
                self.call(self._stop.set)
            self.thread.join(30)
        finally:
            logging.getLogger("shardlm.server").removeHandler(self._handler)


class _ListHandler(logging.Handler):
    def __init__(self, records):
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record):
        self.records.append(record)


# -- a blocking client connection ---------------------------------------------------------------

class Conn:
    """One client connection and what the model expects of it."""

    def __init__(self, srv: ServerThread, tls_on: bool = True):
        sock = socket.create_connection(srv.address, timeout=10)
        self.sock = srv.ctx.wrap_socket(sock) if tls_on else sock
        self.seq = 0
        self.state = "new"  # new | echo | ot (the session's protocol) | loose
        self.replies: list[MsgType] = []  # the reply types the model expects, in order
        self.send_failed = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (ssl.SSLError, OSError):
            # the server hung up first (a timeout); what it sent before is checked at the verdict
            self.send_failed = True

    def send_frame(self, msg_type: int, body: dict, seq: int | None = None) -> None:
        self.send(frames.encode_frame(msg_type, self.seq if seq is None else seq, codec.encode_body(body)))
        self.seq += 1

    def abort(self, rst: bool = False) -> None:
        if rst:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def read_to_close(self, timeout: float) -> list[tuple[int, dict]]:
        """Every frame the server sends until it closes; fails if it has not closed in time."""
        deadline = time.monotonic() + timeout
        decoder = frames.FrameDecoder()
        got = []
        try:
            while True:
                left = deadline - time.monotonic()
                assert left > 0, f"the server kept the connection open for {timeout} s; got {got}"
                self.sock.settimeout(left)
                try:
                    data = self.sock.recv(1 << 16)
                except TimeoutError:
                    raise AssertionError(f"the server kept the connection open for {timeout} s; got {got}") from None
                except (ssl.SSLError, ConnectionError):
                    data = b""  # closed abruptly (a reset after an error, a TLS failure)
                if not data:
                    return got
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    got.append((frame.type, codec.decode_body(frame.payload)))
        finally:
            self.sock.close()

    def verdict(self, expect, timeout: float) -> list:
        """Read to the close and check: the predicted replies, then ``expect`` (an error code,
        CLOSE, or LOOSE: anything that ends cleanly); a timeout, or busy, may cut in anywhere."""
        got = self.read_to_close(timeout)
        errors = [i for i, (t, _) in enumerate(got) if t == MsgType.ERROR]
        assert errors in ([], [len(got) - 1]), f"frames after an ERROR: {got}"
        code = got[-1][1].get("code") if errors else None
        assert code is None or (code in CODES and got[-1][1].get("message")), f"bad error frame {got[-1]}"
        replies = [t for t, _ in got[:len(got) - len(errors)]]
        assert all(is_known(t) for t in replies), replies
        if self.state == LOOSE or expect == LOOSE:
            return got
        if self.send_failed:  # the server hung up while we were still sending (an error found in what it had)
            assert code is None or code in TIMING or code == expect, got
            return got
        assert replies == self.replies[:len(replies)], f"replies {replies}, expected {self.replies}"
        if code in TIMING:
            return got
        assert len(replies) == len(self.replies), f"replies {replies}, expected {self.replies}, then {code}"
        if expect == CLOSE:
            assert code is None, f"expected a plain close, got error {code}"
        else:
            assert code == expect, f"expected error {expect}, got {code or 'a close without an ERROR frame'}: {got}"
        return got


# -- what the server should do with a well-framed message -----------------------------------------

def predict(state: str, msg_type: int, body) -> tuple:
    """("reply", reply type, next state) | ("error", code) | (CLOSE,) | (LOOSE,)."""
    if not is_known(msg_type):
        return "error", ErrorCode.UNKNOWN_TYPE.value
    msg_type = MsgType(msg_type)
    if msg_type == MsgType.ERROR:
        return (CLOSE,)  # the server treats it as the peer's verdict and hangs up
    try:
        if msg_type == MsgType.PING:  # in every state (before HELLO: a client probing the link)
            if not isinstance(body.get("echo", True), bool):
                return "error", ErrorCode.MALFORMED.value
            return "reply", MsgType.PONG, state
        if state == "new":
            if msg_type == MsgType.HEALTH:
                return "reply", MsgType.HEALTH_OK, state
            if msg_type == MsgType.INFO:
                return "reply", MsgType.INFO_OK, state
            if msg_type == MsgType.HELLO:
                protocol = handshake.check_hello(body, offered=registry.offered(False), model_fingerprint="none",
                                                 max_seq_len=MAX_SEQ_LEN)
                return "reply", MsgType.HELLO_OK, protocol
        else:
            if msg_type == MsgType.BYE:
                return (CLOSE,)
            if state == "ot" and msg_type == MsgType.OT_REQ:
                req = ot.OT_REQ.check(body)
                if req["reveal"] and req["count"] > ot.MAX_REVEAL:
                    return "error", ErrorCode.MALFORMED.value
                return (LOOSE,) if req["setup"] else ("error", ErrorCode.WRONG_STATE.value)
            if state == "ot" and msg_type == MsgType.OT_EMB_REQ:
                req = embedding.OT_EMB_REQ.check(body)
                table = req["table"]
                if table is None or table["rows"] * table["cols"] > 1 << 26:
                    return "error", ErrorCode.MALFORMED.value
                return (LOOSE,) if req["setup"] else ("error", ErrorCode.WRONG_STATE.value)
    except ProtocolError as exc:
        return "error", exc.code.value
    return "error", ErrorCode.WRONG_STATE.value


def _small_table(body: dict) -> dict:
    """Keep a valid OT_EMB_REQ's synthetic table small (a large one is legal, and slow)."""
    try:
        table = embedding.OT_EMB_REQ.check(body)["table"]
    except ProtocolError:
        return body
    if table is not None and table["rows"] * table["cols"] > 4096:
        return {**body, "table": {"rows": 8, "cols": 4}}
    return body


_VALID_IN = {"new": [MsgType.HEALTH, MsgType.INFO, MsgType.PING, MsgType.HELLO, MsgType.HELLO, MsgType.HELLO], "echo": [MsgType.PING],
             "ot": [MsgType.PING, MsgType.OT_REQ, MsgType.OT_EMB_REQ]}
field_values = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
                | st.binary(max_size=8) | st.lists(st.integers(0, 3), max_size=3)
                | st.sampled_from(["echo", "ot", "plain", "v3", "none", "sender", "receiver", "random", "chosen"])
                | st.builds(np.zeros, st.integers(0, 3), st.sampled_from(["bool", "uint8", "int64", "float32"])))


@st.composite
def messages(draw, state: str):
    """(type, body): a message valid in ``state``, one of another state, or a valid one with its
    fields changed (a schema failure, most of the time)."""
    kind = draw(st.sampled_from(["valid", "valid", "any_type", "mutated", "mutated"]))
    if kind == "any_type":
        msg_type = draw(st.sampled_from(sorted(MsgType)))
        return msg_type, VALID[msg_type]
    msg_type = draw(st.sampled_from(_VALID_IN[state]))
    body = dict(VALID[msg_type])
    if msg_type == MsgType.HELLO:
        body["protocol"] = draw(st.sampled_from(["echo", "ot"]))
    elif msg_type == MsgType.PING:
        body = {"data": draw(st.binary(max_size=64) | st.integers(0, 9).map(lambda n: np.arange(n))),
                "echo": draw(st.booleans())}
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 2))):
            op = draw(st.sampled_from(["drop", "add", "replace", "replace"]))
            if op == "drop" and body:
                del body[draw(st.sampled_from(sorted(body, key=repr)))]
            elif op == "add":
                body[draw(st.text(max_size=6) | st.integers(0, 3))] = draw(field_values)
            elif body:
                body[draw(st.sampled_from(sorted(body, key=repr)))] = draw(field_values)
    if msg_type == MsgType.OT_EMB_REQ:
        body = _small_table(body)
    return msg_type, body


def _garbage_payload(data: bytes) -> bool:
    try:
        codec.decode_body(data, LIMITS)
    except ProtocolError:
        return True
    return False


# -- the state machine ------------------------------------------------------------------------------

# Not TLS. (Fewer than 5 bytes, or the header of a TLS or SSLv2 record announcing more bytes, wait
# for the handshake timeout: test_a_stalled_tls_handshake_is_ended_by_the_server.)
not_tls = (st.binary(min_size=5, max_size=512).filter(lambda b: b[0] < 0x80 and not 0x14 <= b[0] <= 0x17)
           | st.sampled_from([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello",
                              b"SHLM" + bytes(16)]))
MAX_OPEN = 3
VERDICT_SECONDS = 8.0  # every error closes at once; this bounds a server that forgot to


class ServerMachine(RuleBasedStateMachine):
    def __init__(self, srv: ServerThread):
        super().__init__()
        self.srv = srv
        self.conns: list[Conn] = []

    def _pick(self, i: int) -> Conn:
        return self.conns[i % len(self.conns)]

    def _end(self, conn: Conn, expect) -> None:
        self.conns.remove(conn)
        conn.verdict(expect, VERDICT_SECONDS)

    def _strict(self) -> list[Conn]:
        return [c for c in self.conns if c.state != LOOSE]

    @initialize()
    def first_connection(self):
        self.conns.append(Conn(self.srv))

    @precondition(lambda self: len(self.conns) < MAX_OPEN)
    @rule(tls_on=st.sampled_from([True, True, True, True, False]), data=not_tls, rst=st.booleans())
    def open_connection(self, tls_on, data, rst):
        if tls_on:
            self.conns.append(Conn(self.srv))
            return
        # plain bytes instead of a TLS handshake: a TLS alert at most, then the server hangs up
        conn = Conn(self.srv, tls_on=False)
        conn.send(data)
        if rst:
            conn.abort(rst=True)
        else:
            conn.read_to_close(VERDICT_SECONDS)

    @precondition(lambda self: any(c.state != LOOSE for c in self.conns))
    @rule(i=st.integers(0, MAX_OPEN - 1), n=st.integers(1, 4), data=st.data())
    def send_messages(self, i, n, data):
        """Up to ``n`` messages in a row (pipelined: the replies are read at the end)."""
        conn = self._strict()[i % len(self._strict())]
        for _ in range(n):
            msg_type, body = data.draw(messages(conn.state))
            conn.send_frame(msg_type, body)
            outcome = predict(conn.state, msg_type, body)
            if outcome[0] == "reply":
                conn.replies.append(outcome[1])
                conn.state = outcome[2]
            elif outcome[0] == LOOSE:
                conn.state = LOOSE
                return
            else:
                self._end(conn, outcome[1] if outcome[0] == "error" else CLOSE)
                return

    @precondition(lambda self: any(c.state != LOOSE for c in self.conns))
    @rule(i=st.integers(0, MAX_OPEN - 1), n=st.integers(1, 4), data=st.data())
    def send_more_messages(self, i, n, data):  # (the same rule twice: sending is most of what a step does)
        self.send_messages(i, n, data)

    @precondition(lambda self: any(c.state == LOOSE for c in self.conns))
    @rule(i=st.integers(0, MAX_OPEN - 1), msg_type=st.sampled_from(sorted(MsgType)))
    def send_inside_a_subprotocol(self, i, msg_type):
        conns = [c for c in self.conns if c.state == LOOSE]
        conn = conns[i % len(conns)]
        conn.send_frame(msg_type, VALID[msg_type])
        self._end(conn, LOOSE)  # whatever it makes of it, the server must end it (or be done)

    @precondition(lambda self: self.conns)
    @rule(i=st.integers(0, MAX_OPEN - 1), case=st.sampled_from(
        ["seq", "magic", "version", "crc", "declared_length", "frame_too_large", "tensor_too_large", "payload",
         "unknown_type"]), data=st.data())
    def send_bad_frame(self, i, case, data):
        conn = self._pick(i)
        msg_type = MsgType.PING if conn.state in ("echo", "ot") else MsgType.HEALTH
        body = {"data": b"x"} if msg_type == MsgType.PING else {}
        wire = bytearray(frames.encode_frame(msg_type, conn.seq, codec.encode_body(body)))
        if case == "seq":
            seq = data.draw(st.integers(0, 2**32 - 1).filter(lambda s: s != conn.seq))
            wire = bytearray(frames.encode_frame(msg_type, seq, codec.encode_body(body)))
            code = ErrorCode.MALFORMED
        elif case == "magic":
            wire = bytearray(data.draw(st.binary(min_size=1, max_size=64).filter(
                lambda b: b[:4] != frames.MAGIC[:len(b[:4])])))
            code = ErrorCode.BAD_MAGIC
        elif case == "version":
            wire[4] = data.draw(st.integers(0, 255).filter(lambda v: v != frames.WIRE_VERSION))
            code = ErrorCode.BAD_VERSION
        elif case == "crc":
            pos = data.draw(st.integers(16, len(wire) - 1))  # the CRC field or the payload
            wire[pos] ^= 1 << data.draw(st.integers(0, 7))
            code = ErrorCode.BAD_CRC
        elif case == "declared_length":
            length = data.draw(st.integers(LIMITS.max_frame_bytes + 1, 2**32 - 1) | st.just(2**31))
            wire = bytearray(frames.HEADER.pack(frames.MAGIC, frames.WIRE_VERSION, msg_type, 0, conn.seq, length, 0)
                             + data.draw(st.binary(max_size=64)))
            code = ErrorCode.FRAME_TOO_LARGE
        elif case == "frame_too_large":  # a body really over the limit, sent whole
            big = np.zeros(LIMITS.max_frame_bytes + data.draw(st.integers(1, 4096)), dtype=np.uint8)
            wire = bytearray(frames.encode_frame(msg_type, conn.seq, codec.encode_body({"data": big})))
            code = ErrorCode.FRAME_TOO_LARGE
        elif case == "tensor_too_large":
            n = LIMITS.max_tensor_elements + data.draw(st.integers(1, 1000))
            wire = bytearray(frames.encode_frame(msg_type, conn.seq, codec.encode_body({"data": np.zeros(n, np.uint8)})))
            code = ErrorCode.TENSOR_TOO_LARGE
        elif case == "payload":  # valid CRC, undecodable body
            payload = data.draw(st.binary(max_size=64).filter(_garbage_payload))
            wire = bytearray(frames.encode_frame(msg_type, conn.seq, [payload]))
            code = ErrorCode.MALFORMED
        else:
            msg_type = data.draw(st.integers(0, 0xFFFF).filter(lambda t: not is_known(t)))
            wire = bytearray(frames.encode_frame(msg_type, conn.seq, codec.encode_body({})))
            code = ErrorCode.UNKNOWN_TYPE
        conn.send(bytes(wire))
        self._end(conn, LOOSE if conn.state == LOOSE else code.value)

    @precondition(lambda self: self.conns)
    @rule(i=st.integers(0, MAX_OPEN - 1), cut=st.none() | st.floats(0, 1, exclude_max=True), rst=st.booleans())
    def disconnect(self, i, cut, rst):
        """Hang up (FIN, or RST), perhaps in the middle of a frame."""
        conn = self._pick(i)
        if cut is not None:
            wire = frames.encode_frame(MsgType.HEALTH, conn.seq, codec.encode_body({"pad": bytes(40)}))
            conn.send(wire[:int(cut * len(wire))])
        self.conns.remove(conn)
        conn.abort(rst)

    @invariant()
    def server_alive(self):
        self.srv.check_alive()

    def teardown(self):
        for conn in self.conns:
            if conn.state in ("echo", "ot"):
                conn.send_frame(MsgType.BYE, {})
                conn.verdict(CLOSE, VERDICT_SECONDS)
            else:
                conn.abort()
        self.conns = []
        self.srv.wait_idle()
        well_behaved_session(self.srv)
        health = self.srv.wait_idle()
        assert health["status"] == "ready"
        self.srv.check_alive()


def well_behaved_session(srv: ServerThread) -> None:
    """HELLO, a PING with a tensor, BYE: the server still serves a good client."""
    conn = Conn(srv)
    data = np.arange(100, dtype=np.uint64) * 2**57
    conn.send_frame(MsgType.HELLO, handshake.hello("echo", "none", 64))
    conn.send_frame(MsgType.PING, {"data": data, "echo": True})
    conn.send_frame(MsgType.BYE, {})
    got = conn.read_to_close(VERDICT_SECONDS)
    assert [t for t, _ in got] == [MsgType.HELLO_OK, MsgType.PONG], got
    handshake.check_hello_ok(got[0][1], protocol="echo")
    assert np.array_equal(got[1][1]["data"], data)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    srv = ServerThread(tmp_path_factory.mktemp("fuzz-server"), limits=LIMITS, max_seq_len=MAX_SEQ_LEN,
                       max_sessions=MAX_OPEN + 1, handshake_timeout=3.0, idle_timeout=3.0, send_timeout=3.0,
                       session_ttl=60.0)
    yield srv
    srv.close()
    assert srv.error is None, srv.error


def test_random_sequences_against_a_real_server(fuzz_server):
    run_state_machine_as_test(lambda: ServerMachine(fuzz_server),
                              settings=fuzz_settings(80, stateful_step_count=20))


# -- a client that stops sending, in every state ------------------------------------------------------

STALL_TIMEOUTS = dict(handshake_timeout=1.0, idle_timeout=0.5)


@pytest.fixture(scope="module")
def stall_server(tmp_path_factory):
    srv = ServerThread(tmp_path_factory.mktemp("stall-server"), limits=LIMITS, max_seq_len=MAX_SEQ_LEN,
                       send_timeout=3.0, session_ttl=60.0, **STALL_TIMEOUTS)
    yield srv
    srv.close()
    assert srv.error is None, srv.error


STALLS = {
    # name: (messages before the stall, the error expected)
    "after_tls": ([], ErrorCode.HANDSHAKE_TIMEOUT),
    "after_health": ([(MsgType.HEALTH, {})], ErrorCode.HANDSHAKE_TIMEOUT),
    "in_an_echo_session": ([(MsgType.HELLO, handshake.hello("echo", "none", 64))], ErrorCode.IDLE_TIMEOUT),
    # the server waits inside the ot handler's sub-protocol (base OT)
    "inside_an_ot_exchange_as_sender": ([(MsgType.HELLO, handshake.hello("ot", "none", 64)),
                                         (MsgType.OT_REQ, VALID[MsgType.OT_REQ])], ErrorCode.IDLE_TIMEOUT),
    "inside_an_ot_exchange_as_receiver": ([(MsgType.HELLO, handshake.hello("ot", "none", 64)),
                                           (MsgType.OT_REQ, {**VALID[MsgType.OT_REQ], "role": "receiver"})],
                                          ErrorCode.IDLE_TIMEOUT),
    "inside_an_embedding_request": ([(MsgType.HELLO, handshake.hello("ot", "none", 64)),
                                     (MsgType.OT_EMB_REQ, VALID[MsgType.OT_EMB_REQ])], ErrorCode.IDLE_TIMEOUT),
}


@pytest.mark.parametrize("name", sorted(STALLS))
@pytest.mark.parametrize("partial", [0, 7, 25], ids=["silent", "mid_header", "mid_body"])
def test_a_stalled_connection_is_ended_by_the_server(stall_server, name, partial):
    before, code = STALLS[name]
    conn = Conn(stall_server)
    for msg_type, body in before:
        conn.send_frame(msg_type, body)
    if partial:  # and a frame begun but never finished
        conn.send(frames.encode_frame(MsgType.PING, conn.seq, codec.encode_body({"data": bytes(64)}))[:partial])
    limit = max(STALL_TIMEOUTS.values())
    t0 = time.monotonic()
    got = conn.read_to_close(limit + VERDICT_SECONDS)
    assert got and got[-1][0] == MsgType.ERROR and got[-1][1]["code"] == code.value, got
    assert time.monotonic() - t0 < limit + VERDICT_SECONDS
    stall_server.wait_idle()
    well_behaved_session(stall_server)
    stall_server.check_alive()


@pytest.mark.parametrize("data", [b"", b"\x16\x03\x01\xff\xff" + bytes(100), b"\x16"],
                         ids=["nothing", "partial_tls_record", "one_byte"])
def test_a_stalled_tls_handshake_is_ended_by_the_server(stall_server, data):
    conn = Conn(stall_server, tls_on=False)
    conn.send(data)
    conn.read_to_close(STALL_TIMEOUTS["handshake_timeout"] + VERDICT_SECONDS)
    stall_server.wait_idle()
    well_behaved_session(stall_server)
