"""Byte-level fuzzing of the frame decoder, the codec and the body schemas (issue 22).

Whatever bytes arrive, the receiving side ends with frames it decoded and checked, or with one of
the project's own errors (wire/errors.py) carrying an ErrorCode: never another exception, never
an allocation the input's size does not justify. Inputs: arbitrary bytes, mutations of the seed
corpus (tests/fuzz_corpus: a valid frame of every message type, and inputs that once broke a
check), CRC-valid frames around generated msgpack (extension types, non-string keys, deep
nesting, bad tensor descriptors) and valid bodies with one field changed.

Examples per test are bounded for the suite; SHARDLM_FUZZ_SCALE multiplies them (README).
"""
import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_support import (LIMITS, body_checks, corpus_files, frame_of, fuzz_settings, receive_all,
                          valid_bodies)
from shardlm.wire import codec, frames
from shardlm.wire.errors import ErrorCode, FrameError, ProtocolError
from shardlm.wire.msgtypes import MsgType

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # large reprs of tensors

CHECKS = body_checks()
VALID = valid_bodies()
SEEDS = [p.read_bytes() for p in corpus_files()]
HEADER = frames.HEADER

chunkings = st.none() | st.lists(st.integers(1, 64), min_size=1, max_size=8)


def assert_same_either_way(data: bytes, chunks) -> tuple:
    """Decoding ``data`` whole and in pieces gives the same frames and the same verdict."""
    whole = receive_all(data, checks=CHECKS)
    pieces = receive_all(data, chunks, checks=CHECKS)
    assert _summary(whole) == _summary(pieces)
    return whole


def _summary(outcome):
    got, error = outcome
    return [(t, s, sorted(map(repr, b))) for t, s, b in got], error


# -- the corpus ---------------------------------------------------------------------------------

def test_corpus_holds_a_valid_frame_of_every_message_type():
    names = {p.name for p in corpus_files()}
    missing = [t.name for t in MsgType if f"valid-{t.name.lower()}.bin" not in names]
    assert not missing, f"run `python tests/fuzz_support.py` to write seeds for {missing}"
    assert len(names) >= 30


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_replays(path):
    data = path.read_bytes()
    got, error = assert_same_either_way(data, [1, 7, 3])
    if path.name.startswith("valid-"):
        assert error is None and len(got) == 1, (got, error)
        assert MsgType(got[0][0]).name.lower() == path.name[len("valid-"):-len(".bin")]
    elif path.name.startswith("session-"):
        assert error is None and len(got) >= 2
    else:  # crash-*, bad-*: inputs that once escaped as a foreign exception, or were accepted; now refused
        assert error is not None


# -- bytes ----------------------------------------------------------------------------------------

@fuzz_settings(1000)
@given(st.binary(max_size=512), chunkings)
@example(b"SHLM", None)
@example(b"SH", [1])
def test_arbitrary_bytes(data, chunks):
    got, error = assert_same_either_way(data, chunks)
    prefix = data[:len(frames.MAGIC)]
    if prefix != frames.MAGIC[:len(prefix)]:
        assert error == ErrorCode.BAD_MAGIC and not got


@st.composite
def mutated(draw):
    """A seed (or a few, concatenated) with a handful of byte-, field- and length-level edits."""
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(SEEDS), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "extend", "length", "type", "version", "seq",
                                   "payload", "splice"]))
        n = len(data)
        if op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and n:
            data[draw(st.integers(0, n - 1))] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, n)):]
        elif op == "extend":
            data += draw(st.binary(max_size=64))
        elif op == "splice" and n:
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.sampled_from(SEEDS))
        elif n >= frames.HEADER_SIZE:
            magic, version, msg_type, flags, seq, length, crc = HEADER.unpack_from(data)
            if op == "length":
                length = draw(st.integers(0, 2**32 - 1) | st.sampled_from(
                    [0, 1, 3, 4, length - 1, length + 1, LIMITS.max_frame_bytes, LIMITS.max_frame_bytes + 1, 2**31]))
                length = max(0, min(length, 2**32 - 1))
            elif op == "type":
                msg_type = draw(st.sampled_from(list(MsgType)) | st.integers(0, 0xFFFF))
            elif op == "version":
                version = draw(st.integers(0, 255))
            elif op == "seq":
                seq = draw(st.integers(0, 2**32 - 1))
            elif op == "payload":  # a new payload under a valid CRC: it reaches the codec
                payload = draw(st.binary(max_size=96))
                data[frames.HEADER_SIZE:frames.HEADER_SIZE + length] = payload
                length = len(payload)
            HEADER.pack_into(data, 0, magic, version, int(msg_type), flags, seq, length, crc)
    if draw(st.booleans()):
        _fix_crc(data)
    return bytes(data)


def _fix_crc(data: bytearray) -> None:
    """Recompute the first frame's CRC, so that the payload (if whole) reaches the codec."""
    if len(data) >= frames.HEADER_SIZE:
        fields = list(HEADER.unpack_from(data))
        payload = data[frames.HEADER_SIZE:frames.HEADER_SIZE + fields[5]]
        fields[6] = frames.crc_of([bytes(payload)])
        HEADER.pack_into(data, 0, *fields)


@fuzz_settings(1500)
@given(mutated(), chunkings)
def test_mutated_frames(data, chunks):
    assert_same_either_way(data, chunks)


# -- msgpack bodies under a valid CRC --------------------------------------------------------------

_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
           "float64", "bfloat16"]
ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
_odd = st.sampled_from([0, 1, 2, 3, 7, 2**31, 2**32, 2**62, 2**63, 2**64 - 1, -1, -(2**63)])
tensor_meta = st.tuples(
    st.sampled_from(_DTYPES + ["complex64", "object", "<i8", "", "V8", "float128", "U4"]) | st.text(max_size=6)
    | ints | st.none() | st.binary(max_size=4),
    st.lists(st.integers(0, 5) | _odd, max_size=6) | st.lists(st.floats(), max_size=3) | st.text(max_size=3)
    | ints | st.none() | st.dictionaries(st.text(max_size=2), ints, max_size=2),
    st.integers(-1, 3) | st.none() | st.text(max_size=2) | st.floats() | st.booleans(),
).map(list)
ext_values = st.builds(
    msgpack.ExtType,
    st.sampled_from([codec.EXT_NUMPY, codec.EXT_TORCH]) | st.integers(0, 127),
    tensor_meta.map(msgpack.packb) | st.lists(tensor_meta, max_size=3).map(msgpack.packb) | st.binary(max_size=24),
)
keys = (st.text(max_size=8) | st.integers(-3, 2**64 - 1) | st.binary(max_size=4) | st.booleans() | st.none()
        | st.floats())
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=12)
           | st.binary(max_size=24) | _odd)
values = st.recursive(scalars | ext_values,
                      lambda c: st.lists(c, max_size=4) | st.dictionaries(keys, c, max_size=4), max_leaves=16)
bodies = st.dictionaries(st.sampled_from(sorted({k for b in VALID.values() for k in b})) | keys, values, max_size=6)


def _nested(depth: int, kind: str) -> bytes:
    """msgpack for ``depth`` nested arrays or maps around nil (built by hand: the packer
    refuses deep nesting, an attacker's bytes need not)."""
    return (b"\x91" if kind == "list" else b"\x81\xa1k") * depth + b"\xc0"


def _negative_ext(code: int, data: bytes) -> bytes:
    """{"x": ext} with a negative (reserved) type code, -1 being msgpack's timestamp; by hand, as
    ExtType only takes 0..127."""
    return b"\x81\xa1x\xc7" + bytes([len(data)]) + struct.pack("b", code) + data


packed_bodies = (bodies.map(msgpack.packb) | values.map(msgpack.packb)
                 | st.builds(lambda d, k: b"\x81\xa4data" + _nested(d, k), st.integers(1, 3000),
                             st.sampled_from(["list", "map"]))
                 | st.builds(_negative_ext, st.integers(-128, -1), st.binary(max_size=24)))


@st.composite
def payloads(draw):
    """u32 body length | msgpack | bytes the tensor descriptors may point into."""
    packed = draw(packed_bodies)
    prefix = len(packed)
    if draw(st.integers(0, 9)) == 0:
        prefix = draw(st.integers(0, 2**32 - 1) | st.integers(max(0, prefix - 3), prefix + 3))
    tail = draw(st.binary(max_size=48) | st.integers(0, 256).map(bytes))
    return struct.pack("<I", prefix) + packed + tail


@fuzz_settings(1500)
@given(st.sampled_from(sorted(MsgType)), payloads(), chunkings)
def test_generated_msgpack_in_valid_frames(msg_type, payload, chunks):
    data = frames.encode_frame(msg_type, 0, [payload])
    got, error = assert_same_either_way(data, chunks)
    assert error not in (ErrorCode.BAD_MAGIC, ErrorCode.BAD_VERSION, ErrorCode.BAD_CRC)


# -- valid bodies with one field changed: the schemas -----------------------------------------------

def _arrays():
    return st.sampled_from(_DTYPES[:-1]).flatmap(
        lambda dt: st.lists(st.integers(0, 5), max_size=3).map(lambda shape: np.zeros(shape, dtype=dt)))


field_values = values | _arrays() | st.sampled_from([True, False, 2**64 - 1, -1, 1.5, "", b"", [], {}])


@st.composite
def near_valid(draw):
    msg_type = draw(st.sampled_from(sorted(CHECKS)))
    body = dict(VALID[msg_type])
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "add", "replace", "replace", "nonstr_key"]))
        if op == "drop" and body:
            del body[draw(st.sampled_from(sorted(body, key=repr)))]
        elif op == "add":
            body[draw(st.text(max_size=6))] = draw(field_values)
        elif op == "nonstr_key":
            body[draw(ints | st.binary(max_size=3) | st.booleans() | st.floats(allow_nan=False))] = 1
        elif body:
            body[draw(st.sampled_from(sorted(body, key=repr)))] = draw(field_values)
    return msg_type, body


@fuzz_settings(1000)
@given(near_valid())
def test_valid_bodies_with_a_field_changed(case):
    msg_type, body = case
    receive_all(frame_of(msg_type, body), checks=CHECKS)  # a clean verdict either way


def test_every_valid_body_passes_its_checks():
    for msg_type, body in VALID.items():
        got, error = receive_all(frame_of(msg_type, body), checks=CHECKS)
        assert error is None and [t for t, _, _ in got] == [msg_type], (msg_type, error)


# -- huge declared sizes are refused before anything of that size exists -------------------------

def _peak_during(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_a_declared_2_to_the_31_byte_payload_is_refused_before_allocation():
    header = HEADER.pack(frames.MAGIC, frames.WIRE_VERSION, MsgType.PING, 0, 0, 2**31, 0)
    for limits in (frames.Limits(), LIMITS):  # the default limit (256 MiB) and the fuzz one
        dec = frames.FrameDecoder(limits)

        def feed():
            dec.feed(header + b"\x00" * 100)
            with pytest.raises(FrameError) as e:
                dec.next_frame()
            assert e.value.code == ErrorCode.FRAME_TOO_LARGE

        assert _peak_during(feed) < 64 * 1024


@fuzz_settings(100)
@given(st.integers(LIMITS.max_frame_bytes + 1, 2**32 - 1), st.binary(max_size=64))
def test_declared_frame_lengths_over_the_limit_allocate_nothing(length, tail):
    dec = frames.FrameDecoder(LIMITS)

    def feed():
        dec.feed(HEADER.pack(frames.MAGIC, frames.WIRE_VERSION, MsgType.PING, 0, 0, length, 0) + tail)
        with pytest.raises(FrameError) as e:
            dec.next_frame()
        assert e.value.code == ErrorCode.FRAME_TOO_LARGE

    assert _peak_during(feed) < 64 * 1024


@fuzz_settings(200)
@given(st.sampled_from(_DTYPES), st.lists(st.integers(0, 2**64 - 1) | _odd, min_size=1, max_size=4),
       st.sampled_from([codec.EXT_NUMPY, codec.EXT_TORCH]), st.integers(0, 64))
def test_declared_tensor_sizes_allocate_at_most_the_payload(dtype, shape, kind, have):
    """A tensor descriptor claiming any shape costs at most the bytes actually sent: refused by
    the element limit or the payload's end, or a view of the bytes that are there."""
    meta = msgpack.packb([dtype, shape, 0])
    packed = msgpack.packb({"t": msgpack.ExtType(kind, meta)})
    payload = struct.pack("<I", len(packed)) + packed + bytes(-(4 + len(packed)) % 8) + bytes(have)
    result = []

    def decode():
        try:
            result.append(codec.decode_body(payload, LIMITS))
        except ProtocolError as exc:
            result.append(exc.code)

    peak = _peak_during(decode)
    assert peak < 64 * 1024 + 4 * len(payload), peak
    assert isinstance(result[0], dict) or result[0] in (ErrorCode.MALFORMED, ErrorCode.TENSOR_TOO_LARGE)
