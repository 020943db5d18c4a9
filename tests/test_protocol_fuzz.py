"""Property-based fuzzing: bad bytes raise ProtocolError (never another exception or a hang)."""

from __future__ import annotations

import json
import socket
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jacana.protocol import errors
from jacana.protocol.message import DTYPES, MAGIC, PREFIX, Message, decode, encode
from jacana.protocol.provenance import Provenance
from jacana.protocol.rpc import handle_bytes
from jacana.protocol.server import StageServer
from jacana.protocol.stage import JaxStage
from jacana.protocol.transport import frame, read_frame

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID = encode(Message(
    "jacobian",
    {"a": np.float32(1.0), "x": np.arange(6, dtype=np.float32).reshape(2, 3), "m": np.array([True, False])},
    stage="fuzz", step=4, param_names=("a",), wrt=("a",), axes={"x": ("r", "c")},
    provenance=(Provenance("f.root", 0, 10, 10),), meta={"note": "ok"},
))
HEADER_LEN = PREFIX.unpack_from(VALID)[1]
HEADER = json.loads(VALID[8 : 8 + HEADER_LEN])


def decode_or_protocol_error(data):
    try:
        msg = decode(data, max_bytes=1 << 20)
    except errors.ProtocolError:
        return None
    assert isinstance(msg, Message)
    encode(msg)  # whatever decodes must re-encode
    return msg


@SETTINGS
@given(st.binary(max_size=512))
def test_random_bytes(data):
    decode_or_protocol_error(data)
    decode_or_protocol_error(MAGIC + data)


@SETTINGS
@given(st.integers(0, len(VALID) - 1))
def test_truncation_is_detected(cut):
    with pytest.raises(errors.ProtocolError):
        decode(VALID[:cut])


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_mutations(edits):
    data = bytearray(VALID)
    for pos, val in edits:
        data[pos] = val
    decode_or_protocol_error(bytes(data))


@SETTINGS
@given(st.integers(0, len(VALID)), st.binary(min_size=1, max_size=16))
def test_insertions(pos, blob):
    decode_or_protocol_error(VALID[:pos] + blob + VALID[pos:])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def with_header(header: dict, payload: bytes = VALID[8 + HEADER_LEN :]) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return PREFIX.pack(MAGIC, len(text)) + text + payload


@SETTINGS
@given(st.sampled_from(sorted(HEADER)), JSON)
def test_header_field_replaced_by_arbitrary_json(key, value):
    decode_or_protocol_error(with_header({**HEADER, key: value}))


@SETTINGS
@given(st.integers(0, 2), st.sampled_from(["name", "dtype", "shape", "offset", "nbytes", "axes", "extra"]), JSON)
def test_tensor_entry_field_replaced(index, key, value):
    tensors = [dict(t) for t in HEADER["tensors"]]
    tensors[index][key] = value
    decode_or_protocol_error(with_header({**HEADER, "tensors": tensors}))


@SETTINGS
@given(JSON)
def test_whole_header_arbitrary_json(value):
    decode_or_protocol_error(with_header(value) if not isinstance(value, dict) else with_header({**value}))


def test_specific_malformations_raise_the_right_error():
    cases = {
        errors.VersionMismatch: [with_header({**HEADER, "version": "2.0"}), with_header({**HEADER, "protocol": "other"})],
        errors.UnsupportedDType: [with_header({**HEADER, "tensors": [{**HEADER["tensors"][0], "dtype": "float128"}] + HEADER["tensors"][1:]})],
        errors.TruncatedMessage: [VALID[:-1], VALID[:5]],
        errors.MessageTooLarge: [VALID + b"\0" * (1 << 20)],
        errors.MalformedMessage: [
            b"XXXX" + VALID[4:],
            VALID + b"\0" * 8,
            with_header({**HEADER, "tensors": [{**HEADER["tensors"][0], "shape": [2**60, 2**60]}] + HEADER["tensors"][1:]}),
            with_header({**HEADER, "kind": "exec"}),
            PREFIX.pack(MAGIC, 8) + b"[" * 7 + b" ",
            PREFIX.pack(MAGIC, 200008) + b"[" * 200000 + b" " * 8,  # deep nesting
            VALID.replace(b'"kind":"jacobian"', b'"kind":"jacobian","kind":"apply"', 1),  # duplicate key
            VALID.replace(b'"step":4', b'"step":NaN', 1),
        ],
    }
    for cls, blobs in cases.items():
        for blob in blobs:
            with pytest.raises(cls):
                decode(blob, max_bytes=1 << 20)


def test_bool_tensor_with_non_boolean_byte_is_refused():
    data = bytearray(VALID)
    start = 8 + HEADER_LEN + [t for t in HEADER["tensors"] if t["name"] == "m"][0]["offset"]
    data[start] = 7
    with pytest.raises(errors.MalformedMessage, match="bool"):
        decode(bytes(data))


# --- mutants that pass every earlier check -----------------------------------------------------
# The fuzzers above change one field at a time, so an early check (nbytes, offset) stops almost
# every mutant before the later ones run. These keep the layout consistent (nbytes = size x
# itemsize, canonical offsets, payload_nbytes = the bytes present) so that only the check under
# test can refuse them: deleting "tensor runs past the payload" then lets numpy's ValueError out.

def consistent_layout(tensors: list[dict]) -> tuple[list[dict], int]:
    """The entries with nbytes and offsets recomputed canonically; the end of the last one."""
    out, offset = [], 0
    for t in tensors:
        start = -(-offset // 8) * 8
        nbytes = int(np.prod(t["shape"], dtype=np.int64)) * np.dtype(t["dtype"]).itemsize
        out.append({**t, "offset": start, "nbytes": nbytes})
        offset = start + nbytes
    return out, offset


def mutant(index: int, dtype: str, shape: list[int], payload_mode: str) -> tuple[bytes, int, int]:
    """(message, end of the tensors, payload bytes present) for tensor ``index`` changed to
    ``dtype``/``shape``, every other field consistent. ``payload_mode``: ``keep`` the payload,
    ``fit`` it to the new tensors (zero bytes), or ``declare`` the new end without changing it."""
    tensors = [dict(t) for t in HEADER["tensors"]]
    tensors[index].update(dtype=dtype, shape=shape)
    tensors[index].pop("axes", None) if len(shape) != len(tensors[index].get("axes", shape)) else None
    tensors, end = consistent_layout(tensors)
    payload = VALID[8 + HEADER_LEN :]
    declared = len(payload)
    if payload_mode == "fit":
        payload, declared = bytes(end), end
    elif payload_mode == "declare":
        declared = end
    return with_header({**HEADER, "tensors": tensors, "payload_nbytes": declared}, payload), end, len(payload)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2), st.sampled_from(DTYPES), st.lists(st.integers(0, 7), max_size=3),
       st.sampled_from(["keep", "fit", "declare"]))
def test_layout_consistent_mutants_raise_only_protocol_errors(index, dtype, shape, payload_mode):
    data, end, present = mutant(index, dtype, shape, payload_mode)
    if payload_mode == "keep" and end > present:  # (a bool tensor over float bytes may be refused first)
        with pytest.raises(errors.MalformedMessage):
            decode(data)
    else:
        decode_or_protocol_error(data)


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("extra", [1, 4, 8, 64, 10**6])
def test_a_tensor_running_past_the_payload_is_refused_by_that_check(index, extra):
    """Every tensor in turn grown past the payload by ``extra`` elements, all else consistent."""
    payload_len = len(VALID) - 8 - HEADER_LEN
    data, end, present = mutant(index, "uint8", [payload_len + extra], "keep")
    assert end > present
    with pytest.raises(errors.MalformedMessage, match="runs past the payload"):
        decode(data)


def with_meta_number(raw: bytes) -> bytes:
    """VALID with ``meta.note`` set to the JSON text ``raw`` (any number literal, kept verbatim)."""
    text = json.dumps({**HEADER, "meta": {"note": "@"}}).encode().replace(b'"@"', raw)
    text += b" " * (-(8 + len(text)) % 8)
    return PREFIX.pack(MAGIC, len(text)) + text + VALID[8 + HEADER_LEN :]


def test_header_numbers_follow_spec_md():
    """Integers of magnitude below 2^53 (in meta too), finite numbers, shapes numpy can represent:
    each a MalformedMessage, not a ValueError or an inf that cannot be encoded again."""
    empty_but_huge = [0, 2**53 - 1, 2**53 - 1]
    bad = [with_header({**HEADER, "tensors": [{**HEADER["tensors"][0], "shape": empty_but_huge, "nbytes": 0}]
                        + HEADER["tensors"][1:]})]
    bad += [with_meta_number(raw) for raw in (b"1e400", b"-1e400", b"9" * 4300, str(2**53).encode(),
                                              b"[-" + str(2**53).encode() + b"]", b'{"a":[[1e999]]}')]
    for data in bad:
        with pytest.raises(errors.MalformedMessage):
            decode(data)
    ok = decode(with_meta_number(b"[9007199254740991,-9007199254740991,-1e300,0.5]"))
    assert ok.meta["note"] == [2**53 - 1, -(2**53 - 1), -1e300, 0.5]
    encode(ok)
    for meta in ({"n": 2**53}, {"n": [float("inf")]}, {"n": {"deep": -(2**60)}}, {"n": float("nan")}):
        with pytest.raises(errors.MalformedMessage):
            encode(Message("describe", meta=meta))


STAGE = JaxStage(lambda p, i: {"y": p["a"] * i["x"] * i["m"][:, None]}, {"a": np.float32(1)},
                 {"x": np.ones((2, 3), np.float32), "m": np.ones(2, bool)}, stage_id="fuzz")


def test_the_unfuzzed_message_is_served():
    assert decode(handle_bytes(STAGE, VALID)).kind == "jacobian"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6))
def test_handle_bytes_always_answers_a_message(edits):
    data = bytearray(VALID)
    for pos, val in edits:
        data[pos] = val
    reply = decode(handle_bytes(STAGE, bytes(data)))
    assert reply.role == "response" and reply.kind in ("jacobian", "error")


def test_fuzzed_frames_never_crash_the_server():
    token = "fuzz-token-0123456789abcdef"
    rng = np.random.default_rng(1)
    with StageServer(STAGE, token=token, timeout=2.0, max_bytes=1 << 16) as server:
        with socket.create_connection(server.address, timeout=5) as s:
            reader = lambda n: s.recv(n)  # noqa: E731
            s.sendall(frame(encode(Message("hello", meta={"token": token}))))
            assert decode(read_frame(reader)).kind == "hello"
            for k in range(150):
                data = bytearray(VALID)
                for pos in rng.integers(0, len(data), size=rng.integers(1, 6)):
                    data[pos] = rng.integers(0, 256)
                if k % 10 == 0:
                    data = bytearray(rng.bytes(int(rng.integers(0, 300))))
                s.sendall(frame(bytes(data)))
                reply = decode(read_frame(reader))
                assert reply.kind in ("jacobian", "error")
            s.sendall(frame(VALID))
            assert decode(read_frame(reader)).kind == "jacobian"
        # a connection that sends garbage instead of a frame length is closed, not fatal
        with socket.create_connection(server.address, timeout=5) as s:
            s.sendall(struct.pack("<Q", 3) + b"abc")
            assert decode(read_frame(lambda n: s.recv(n))).meta["error"]["code"] == "auth"
