"""Frame + codec: round trips (property-based) and rejection of malformed input."""
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shardlm.wire import codec, frames
from shardlm.wire.errors import ErrorCode, FrameError, ProtocolError

NP_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
             "float16", "float32", "float64"]

arrays = st.sampled_from(NP_DTYPES).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
)
torch_tensors = st.builds(
    lambda a, dt: torch.from_numpy(a).to(dt),
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
               elements=st.floats(-1e4, 1e4, width=32)),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                     torch.uint8, torch.int8, torch.bool]),
)
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=40))
values = st.recursive(
    scalars | arrays | torch_tensors,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
messages = st.dictionaries(st.text(max_size=10), values, max_size=6)


def assert_same(a, b):
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert a == b and type(a) is type(b)


def roundtrip(body, msg_type=0x0110, seq=7, chunk=None):
    wire = frames.encode_frame(msg_type, seq, codec.encode_body(body))
    dec = frames.FrameDecoder()
    chunk = chunk or len(wire)
    frame = None
    for i in range(0, len(wire), chunk):
        assert frame is None, "a frame completed before all its bytes arrived"
        dec.feed(wire[i:i + chunk])
        frame = dec.next_frame()
    assert frame is not None and frame.type == msg_type and frame.seq == seq
    return codec.decode_body(frame.payload)


@settings(max_examples=200, deadline=None)
@given(messages, st.integers(1, 97))
def test_any_message_roundtrips_through_frame_and_codec(body, chunk):
    assert_same(body, roundtrip(body, chunk=chunk))


def test_uint64_and_int64_extremes_survive_exactly():
    u = np.array([0, 1, 2**63, 2**64 - 2, 2**64 - 1], dtype=np.uint64)
    i = np.array([-(2**63), -1, 0, 2**63 - 1], dtype=np.int64)
    t = torch.tensor([-(2**63), 2**63 - 1], dtype=torch.int64)
    out = roundtrip({"u": u, "i": i, "t": t, "big": 2**64 - 1})
    assert out["u"].dtype == np.uint64 and out["u"].tolist() == u.tolist()
    assert out["i"].tolist() == i.tolist()
    assert out["t"].tolist() == t.tolist()
    assert out["big"] == 2**64 - 1


def test_tensor_bytes_are_not_element_encoded():
    # 1 MiB of float64 costs 1 MiB plus a small constant on the wire.
    arr = np.random.default_rng(0).standard_normal(131072)
    size = sum(memoryview(p).nbytes for p in codec.encode_body({"x": arr}))
    assert arr.nbytes <= size < arr.nbytes + 64


def test_decoded_tensors_are_aligned_views():
    body = {"a": np.arange(3, dtype=np.uint8), "b": np.arange(5, dtype=np.uint64)}
    out = roundtrip(body)
    assert out["b"].ctypes.data % 8 == 0 or out["b"].flags.aligned


def test_bad_crc_is_rejected():
    wire = bytearray(frames.encode_frame(0x0110, 0, codec.encode_body({"x": 1})))
    wire[-1] ^= 0x01
    dec = frames.FrameDecoder()
    dec.feed(wire)
    with pytest.raises(FrameError) as e:
        dec.next_frame()
    assert e.value.code == ErrorCode.BAD_CRC


def test_oversized_length_is_rejected_from_the_header_alone():
    limits = frames.Limits(max_frame_bytes=1024)
    header = frames.HEADER.pack(frames.MAGIC, frames.WIRE_VERSION, 0x0110, 0, 0, 2**32 - 1, 0)
    dec = frames.FrameDecoder(limits)
    dec.feed(header)  # no payload bytes at all: the verdict comes before any allocation
    with pytest.raises(FrameError) as e:
        dec.next_frame()
    assert e.value.code == ErrorCode.FRAME_TOO_LARGE


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.1\r\n", b"\x00" * 40, b"SHLX" + b"\x00" * 16])
def test_garbage_is_rejected_as_bad_magic(junk):
    dec = frames.FrameDecoder()
    dec.feed(junk)
    with pytest.raises(FrameError) as e:
        dec.next_frame()
    assert e.value.code == ErrorCode.BAD_MAGIC


def test_wrong_wire_version_is_rejected():
    dec = frames.FrameDecoder()
    dec.feed(frames.HEADER.pack(frames.MAGIC, 99, 0x0110, 0, 0, 0, 0))
    with pytest.raises(FrameError) as e:
        dec.next_frame()
    assert e.value.code == ErrorCode.BAD_VERSION


def test_tensor_element_limit_is_enforced():
    limits = frames.Limits(max_tensor_elements=100)
    payload = b"".join(bytes(memoryview(p).cast("B")) for p in codec.encode_body({"x": np.zeros(101, np.uint8)}))
    with pytest.raises(ProtocolError) as e:
        codec.decode_body(payload, limits)
    assert e.value.code == ErrorCode.TENSOR_TOO_LARGE


def test_tensor_claiming_more_bytes_than_sent_is_malformed():
    parts = codec.encode_body({"x": np.zeros(16, np.uint64)})
    payload = b"".join(bytes(memoryview(p).cast("B")) for p in parts)[:-8]
    with pytest.raises(ProtocolError) as e:
        codec.decode_body(payload)
    assert e.value.code == ErrorCode.MALFORMED


@pytest.mark.parametrize("payload", [b"", b"\x05\x00\x00\x00ab", struct.pack("<I", 1) + b"\xc1", struct.pack("<I", 1) + b"\x01"])
def test_malformed_bodies_raise_protocol_errors(payload):
    with pytest.raises(ProtocolError) as e:
        codec.decode_body(payload)
    assert e.value.code == ErrorCode.MALFORMED


def test_unsupported_objects_are_refused_at_encode():
    with pytest.raises(TypeError):
        codec.encode_body({"x": object()})
    with pytest.raises(TypeError):
        codec.encode_body({"x": np.zeros(2, dtype=np.complex64)})
