"""Messages: a versioned JSON header plus typed little-endian tensors.

Wire layout (all integers little-endian)::

    offset 0   4 bytes  magic b"JCNA"
    offset 4   u32      H, length of the (padded) header in bytes
    offset 8   H bytes  header: UTF-8 JSON object, right-padded with spaces so 8+H % 8 == 0
    offset 8+H          payload: the tensors' bytes, each starting at an 8-byte-aligned
                        offset (relative to the payload), zero bytes between them

The header is described in ``SPEC.md`` and ``schemas/header.schema.json``.
Nothing is ever pickled; decoding only parses JSON and reinterprets bytes.

    >>> import numpy as np
    >>> msg = Message("apply", {"x": np.arange(3.0)}, stage="demo", step=1)
    >>> data = encode(msg)
    >>> data[:4]
    b'JCNA'
    >>> decode(data) == msg
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from jacana.protocol.errors import (
    MalformedMessage,
    ProtocolError,
    TruncatedMessage,
    MessageTooLarge,
    UnsupportedDType,
    VersionMismatch,
)
from jacana.protocol.provenance import Provenance

MAGIC = b"JCNA"
PROTOCOL = "jacana-stage"
VERSION = (1, 0)
VERSION_STRING = f"{VERSION[0]}.{VERSION[1]}"
KINDS = ("hello", "describe", "apply", "jacobian", "jvp", "vjp", "error")
ROLES = ("request", "response")
#: The allowed tensor dtypes (numpy names); always little-endian on the wire.
DTYPES = (
    "bool",
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}
ALIGN = 8
PREFIX = struct.Struct("<4sI")
MAX_HEADER_BYTES = 1 << 20
MAX_NDIM = 32
_MAX_INT = 2**53 - 1
#: A tensor name: an identifier, optionally prefixed by a role (``jacobian:y``).
NAME_RE = re.compile(r"(?:(?:jacobian|tangent|cotangent):)?[A-Za-z_][A-Za-z0-9_.\-]{0,127}")
#: A tensor name without a role prefix (parameter, input and output names, axis names).
BASE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")
_DIGEST_RE = re.compile(r"(?:sha256:[0-9a-f]{64})?")
_VERSION_RE = re.compile(r"(\d{1,4})\.(\d{1,4})")
_KEYS_REQUIRED = {"protocol", "version", "kind", "role", "tensors", "payload_nbytes"}
_KEYS_OPTIONAL = {"stage", "step", "params", "wrt", "provenance", "meta"}
_TENSOR_KEYS = {"name", "dtype", "shape", "offset", "nbytes"}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True, eq=False)
class Message:
    """One protocol message. ``tensors`` maps names to numpy arrays (order kept).

    ``param_names`` says which tensors are the stage's parameters and
    ``params_digest`` fingerprints their values (:func:`params_digest`), ``wrt``
    lists the arguments derivatives are taken with respect to, ``axes`` names a
    tensor's axes (the output layout, e.g. sample x region x variation x bin),
    ``provenance`` lists the chunks an additive partial covers, ``meta`` is any
    JSON object (describe specs, error details).
    """

    kind: str
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)
    role: str = "request"
    stage: str = ""
    step: int | None = None
    param_names: tuple[str, ...] = ()
    params_digest: str = ""
    wrt: tuple[str, ...] = ()
    axes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    provenance: tuple[Provenance, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    version: str = VERSION_STRING

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        if list(self.tensors) != list(other.tensors):
            return False
        for name, a in self.tensors.items():
            a, b = np.asarray(a), np.asarray(other.tensors[name])
            if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
                return False
        return (
            self.kind == other.kind
            and self.role == other.role
            and self.stage == other.stage
            and self.step == other.step
            and tuple(self.param_names) == tuple(other.param_names)
            and self.params_digest == other.params_digest
            and tuple(self.wrt) == tuple(other.wrt)
            and {k: tuple(v) for k, v in self.axes.items()} == {k: tuple(v) for k, v in other.axes.items()}
            and tuple(self.provenance) == tuple(other.provenance)
            and json.dumps(self.meta, sort_keys=True) == json.dumps(other.meta, sort_keys=True)
            and self.version == other.version
        )

    __hash__ = None  # type: ignore[assignment]

    def reply(self, kind: str | None = None, tensors: Mapping[str, np.ndarray] | None = None, **changes: Any) -> "Message":
        """A response to this request: same stage, step, parameter digest and provenance."""
        fields = dict(
            kind=kind or self.kind,
            tensors=tensors or {},
            role="response",
            stage=self.stage,
            step=self.step,
            params_digest=self.params_digest,
            provenance=self.provenance,
        )
        fields.update(changes)
        return Message(**fields)


def wire_dtype(dtype: Any) -> str:
    """The protocol name of a numpy dtype, or raise :class:`UnsupportedDType`.

    >>> wire_dtype(np.dtype(">f4"))
    'float32'
    """
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise UnsupportedDType(f"not a dtype: {dtype!r}") from exc
    name = dt.newbyteorder("=").name if dt.byteorder not in ("|",) else dt.name
    if name not in _WIRE_DTYPES or dt.fields is not None or dt.subdtype is not None:
        raise UnsupportedDType(f"dtype {dt} is not one of the protocol's dtypes {DTYPES}")
    return name


def params_digest(params: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` over the parameter values, independent of dict order.

    For each name in sorted order: ``name\\n dtype\\n dims joined by ','\\n``
    followed by the little-endian bytes of the value.

    >>> params_digest({"a": np.float64(1.0)}) == params_digest({"a": np.array(1.0)})
    True
    """
    h = hashlib.sha256()
    for name in sorted(params):
        arr = np.asarray(params[name])
        dt = wire_dtype(arr.dtype)
        arr = np.asarray(arr, dtype=_WIRE_DTYPES[dt], order="C")
        h.update(f"{name}\n{dt}\n{','.join(str(d) for d in arr.shape)}\n".encode())
        h.update(arr.tobytes())
    return "sha256:" + h.hexdigest()


def _check_name(name: Any, what: str, pattern: re.Pattern = NAME_RE) -> str:
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise MalformedMessage(f"{what} {name!r} is not a valid name (pattern {pattern.pattern})")
    return name


def _check_int(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_INT:
        raise MalformedMessage(f"{what} must be an integer in [0, 2**53), got {value!r}")
    return value


def _check_names(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise MalformedMessage(f"{what} must be a list of names")
    names = tuple(_check_name(v, what) for v in value)
    if len(set(names)) != len(names):
        raise MalformedMessage(f"{what} has duplicate names")
    return names


def _check_common(kind: Any, role: Any, stage: Any, step: Any, digest: Any) -> None:
    if kind not in KINDS:
        raise MalformedMessage(f"kind {kind!r} is not one of {KINDS}")
    if role not in ROLES:
        raise MalformedMessage(f"role {role!r} is not one of {ROLES}")
    if not isinstance(stage, str) or len(stage) > 256:
        raise MalformedMessage(f"stage must be a string of at most 256 characters, got {stage!r:.80}")
    if step is not None:
        _check_int(step, "step")
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise MalformedMessage(f"params digest {digest!r:.80} is not 'sha256:<64 hex>' or empty")


def encode(msg: Message) -> bytes:
    """Encode a :class:`Message` to bytes (canonical: equal messages, equal bytes)."""
    return b"".join(encode_parts(msg))


def encode_parts(msg: Message) -> list[Any]:
    """The encoding of ``msg`` as a list of buffers (prefix and header, then the tensors' own
    memory, zero gaps between them): ``b"".join(encode_parts(msg)) == encode(msg)``. A stream
    writes them one after the other without copying the tensors into one message."""
    if not isinstance(msg, Message):
        raise MalformedMessage(f"expected a Message, got {type(msg).__name__}")
    _check_common(msg.kind, msg.role, msg.stage, msg.step, msg.params_digest)
    m = _VERSION_RE.fullmatch(msg.version) if isinstance(msg.version, str) else None
    if m is None or int(m.group(1)) != VERSION[0]:
        raise VersionMismatch(f"cannot encode version {msg.version!r}; this peer speaks {VERSION_STRING}")
    entries = []
    parts: list[Any] = []
    offset = 0
    for name, value in msg.tensors.items():
        _check_name(name, "tensor name")
        arr = np.asarray(value)
        dt = wire_dtype(arr.dtype)
        if arr.ndim > MAX_NDIM:
            raise MalformedMessage(f"tensor {name!r} has {arr.ndim} > {MAX_NDIM} dimensions")
        arr = np.asarray(arr, dtype=_WIRE_DTYPES[dt], order="C")
        start = _align(offset)
        if start > offset:
            parts.append(b"\0" * (start - offset))
        entry: dict[str, Any] = {
            "name": name,
            "dtype": dt,
            "shape": list(arr.shape),
            "offset": start,
            "nbytes": arr.nbytes,
        }
        if name in msg.axes:
            axes = [_check_name(a, f"axis name of {name!r}", BASE_NAME_RE) for a in msg.axes[name]]
            if len(axes) != arr.ndim:
                raise MalformedMessage(f"tensor {name!r} has {arr.ndim} dimensions but {len(axes)} axis names")
            entry["axes"] = axes
        entries.append(entry)
        parts.append(arr.reshape(-1).view(np.uint8).data if arr.size else b"")
        offset = start + arr.nbytes
    unknown_axes = set(msg.axes) - set(msg.tensors)
    if unknown_axes:
        raise MalformedMessage(f"axes given for unknown tensors {sorted(unknown_axes)}")
    header: dict[str, Any] = {
        "protocol": PROTOCOL,
        "version": msg.version,
        "kind": msg.kind,
        "role": msg.role,
        "tensors": entries,
        "payload_nbytes": offset,
    }
    if msg.stage:
        header["stage"] = msg.stage
    if msg.step is not None:
        header["step"] = msg.step
    if msg.param_names or msg.params_digest:
        header["params"] = {"names": list(_check_names(list(msg.param_names), "params.names")), "digest": msg.params_digest}
    if msg.wrt:
        header["wrt"] = list(_check_names(list(msg.wrt), "wrt"))
    if msg.provenance:
        header["provenance"] = [Provenance.from_json(p.to_json()).to_json() for p in msg.provenance]
    if msg.meta:
        if not isinstance(msg.meta, Mapping):
            raise MalformedMessage("meta must be a JSON object")
        header["meta"] = dict(msg.meta)
        _check_json_numbers(header["meta"], "meta")
    try:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise MalformedMessage(f"header is not JSON-serialisable: {exc}") from exc
    hbytes = text.encode("ascii")
    hbytes += b" " * (_align(PREFIX.size + len(hbytes)) - PREFIX.size - len(hbytes))
    if len(hbytes) > MAX_HEADER_BYTES:
        raise MessageTooLarge(f"header of {len(hbytes)} bytes exceeds {MAX_HEADER_BYTES}")
    return [PREFIX.pack(MAGIC, len(hbytes)) + hbytes, *parts]


def _check_json_numbers(value: Any, what: str) -> None:
    """SPEC.md's number rules for what goes into a header: integers of magnitude below 2^53,
    finite floats (checked without recursion, so any depth is safe)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, Mapping):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, int) and not isinstance(v, bool) and not -_MAX_INT <= v <= _MAX_INT:
            raise MalformedMessage(f"{what} holds an integer of {v.bit_length()} bits, beyond 2**53 "
                                   f"(SPEC.md: integers below 2^53)")
        elif isinstance(v, float) and not math.isfinite(v):
            raise MalformedMessage(f"{what} holds the non-finite number {v}")


def _reject_constant(name: str) -> Any:
    raise MalformedMessage(f"header contains the non-JSON constant {name}")


def _parse_int(text: str) -> int:
    # SPEC.md: integers in the header are below 2^53 (16 digits at most; no 4300-digit parse)
    if len(text.lstrip("-")) > 16 or not -_MAX_INT <= int(text) <= _MAX_INT:
        raise MalformedMessage(f"header integer {text[:24]}{'...' if len(text) > 24 else ''} is beyond 2**53")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedMessage(f"header number {text[:24]}{'...' if len(text) > 24 else ''} is not finite")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise MalformedMessage("header object has duplicate keys")
    return out


def decode_header(data: bytes | bytearray | memoryview, *, max_bytes: int | None = None) -> tuple[dict[str, Any], int]:
    """Parse and check the prefix and JSON header; return (header, payload offset)."""
    try:
        mv = memoryview(data).cast("B")
    except TypeError as exc:
        raise MalformedMessage(f"cannot read a message from {type(data).__name__}") from exc
    if max_bytes is not None and len(mv) > max_bytes:
        raise MessageTooLarge(f"message of {len(mv)} bytes exceeds the limit of {max_bytes}")
    if len(mv) < PREFIX.size:
        raise TruncatedMessage(f"message of {len(mv)} bytes is shorter than the {PREFIX.size}-byte prefix")
    magic, hlen = PREFIX.unpack_from(mv)
    if magic != MAGIC:
        raise MalformedMessage(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if hlen > MAX_HEADER_BYTES:
        raise MalformedMessage(f"header length {hlen} exceeds {MAX_HEADER_BYTES}")
    if (PREFIX.size + hlen) % ALIGN:
        raise MalformedMessage(f"header length {hlen} leaves the payload unaligned")
    if PREFIX.size + hlen > len(mv):
        raise TruncatedMessage(f"header of {hlen} bytes runs past the end of a {len(mv)}-byte message")
    try:
        text = bytes(mv[PREFIX.size : PREFIX.size + hlen]).decode("utf-8")
        header = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int,
                            parse_float=_parse_float, object_pairs_hook=_no_duplicate_keys)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedMessage(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise MalformedMessage("header is not a JSON object")
    if header.get("protocol") != PROTOCOL:
        raise VersionMismatch(f"protocol {header.get('protocol')!r:.80} is not {PROTOCOL!r}")
    version = header.get("version")
    m = _VERSION_RE.fullmatch(version) if isinstance(version, str) else None
    if m is None:
        raise VersionMismatch(f"version {version!r:.80} is not 'MAJOR.MINOR'")
    major, minor = int(m.group(1)), int(m.group(2))
    if major != VERSION[0]:
        raise VersionMismatch(f"protocol version {version} is not supported (this peer speaks {VERSION_STRING})")
    missing = _KEYS_REQUIRED - set(header)
    if missing:
        raise MalformedMessage(f"header lacks {sorted(missing)}")
    unknown = set(header) - _KEYS_REQUIRED - _KEYS_OPTIONAL
    if unknown and minor <= VERSION[1]:
        raise MalformedMessage(f"header has unknown keys {sorted(unknown)}")
    return header, PREFIX.size + hlen


def decode(data: bytes | bytearray | memoryview, *, max_bytes: int | None = None, copy: bool = False) -> Message:
    """Decode bytes into a :class:`Message`; raise a :class:`ProtocolError` subclass otherwise.

    With ``copy=False`` the arrays are views of ``data`` (read-only for ``bytes``).
    """
    header, start = decode_header(data, max_bytes=max_bytes)
    mv = memoryview(data).cast("B")
    kind, role = header["kind"], header["role"]
    stage = header.get("stage", "")
    step = header.get("step")
    params = header.get("params", {"names": [], "digest": ""})
    if not isinstance(params, dict) or set(params) != {"names", "digest"}:
        raise MalformedMessage("params must be an object with exactly 'names' and 'digest'")
    _check_common(kind, role, stage, step, params["digest"])
    param_names = _check_names(params["names"], "params.names")
    wrt = _check_names(header.get("wrt", []), "wrt")
    prov = header.get("provenance", [])
    if not isinstance(prov, list):
        raise MalformedMessage("provenance must be a list")
    provenance = tuple(Provenance.from_json(p) for p in prov)
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise MalformedMessage("meta must be a JSON object")
    payload_nbytes = _check_int(header["payload_nbytes"], "payload_nbytes")
    have = len(mv) - start
    if have < payload_nbytes:
        raise TruncatedMessage(f"payload has {have} bytes, header declares {payload_nbytes}")
    if have > payload_nbytes:
        raise MalformedMessage(f"{have - payload_nbytes} trailing bytes after the payload")
    entries = header["tensors"]
    if not isinstance(entries, list):
        raise MalformedMessage("tensors must be a list")
    tensors: dict[str, np.ndarray] = {}
    axes: dict[str, tuple[str, ...]] = {}
    offset = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise MalformedMessage("tensor entry is not an object")
        keys = set(entry)
        if not _TENSOR_KEYS <= keys or not keys <= _TENSOR_KEYS | {"axes"}:
            raise MalformedMessage(f"tensor entry keys {sorted(keys)} are not {sorted(_TENSOR_KEYS)} (+ axes)")
        name = _check_name(entry["name"], "tensor name")
        if name in tensors:
            raise MalformedMessage(f"tensor {name!r} appears twice")
        dt = entry["dtype"]
        if not isinstance(dt, str) or dt not in _WIRE_DTYPES:
            raise UnsupportedDType(f"tensor {name!r} has dtype {dt!r:.40}, not one of {DTYPES}")
        dtype = _WIRE_DTYPES[dt]
        shape = entry["shape"]
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise MalformedMessage(f"tensor {name!r} shape must be a list of at most {MAX_NDIM} sizes")
        count, span = 1, dtype.itemsize
        for d in shape:
            count *= _check_int(d, f"tensor {name!r} dimension")
            span *= max(d, 1)
            if span > _MAX_INT:  # an empty tensor too: numpy cannot even describe such a shape
                raise MalformedMessage(f"tensor {name!r} shape {shape!r:.80} spans more than 2**53 bytes")
        nbytes = _check_int(entry["nbytes"], f"tensor {name!r} nbytes")
        if nbytes != count * dtype.itemsize:
            raise MalformedMessage(f"tensor {name!r}: nbytes {nbytes} != prod(shape) * itemsize {count * dtype.itemsize}")
        expected = _align(offset)
        if entry["offset"] != expected or type(entry["offset"]) is not int:
            raise MalformedMessage(f"tensor {name!r} offset {entry['offset']!r:.40} is not the canonical {expected}")
        if expected + nbytes > payload_nbytes:
            raise MalformedMessage(f"tensor {name!r} runs past the payload")
        arr = np.frombuffer(mv, dtype=dtype, count=count, offset=start + expected).reshape(shape)
        if dt == "bool" and count and arr.view(np.uint8).max() > 1:
            raise MalformedMessage(f"tensor {name!r} has bool bytes other than 0 and 1")
        tensors[name] = arr.copy() if copy else arr
        if "axes" in entry:
            ax = entry["axes"]
            if not isinstance(ax, list) or len(ax) != len(shape):
                raise MalformedMessage(f"tensor {name!r} axes must list one name per dimension")
            axes[name] = tuple(_check_name(a, f"axis name of {name!r}", BASE_NAME_RE) for a in ax)
        offset = expected + nbytes
    if offset != payload_nbytes:
        raise MalformedMessage(f"payload_nbytes {payload_nbytes} != end of the last tensor {offset}")
    return Message(
        kind=kind,
        tensors=tensors,
        role=role,
        stage=stage,
        step=step,
        param_names=param_names,
        params_digest=params["digest"],
        wrt=wrt,
        axes=axes,
        provenance=provenance,
        meta=meta,
        version=header["version"],
    )


def header_schema() -> dict[str, Any]:
    """The JSON Schema of the header (``schemas/header.schema.json``)."""
    from importlib import resources

    return json.loads(resources.files("jacana.protocol").joinpath("schemas/header.schema.json").read_text("utf-8"))
