"""Stage calls as messages: serving a stage (:func:`handle`) and calling one
(:class:`RemoteStage`), whatever carries the bytes.

Tensor naming inside messages (see SPEC.md):

=========  ==========================================  ==========================================
kind       request tensors                             response tensors
=========  ==========================================  ==========================================
describe   none (``meta.inputs`` may give shapes)     none (``meta.spec`` is the StageSpec)
apply      params + inputs                             outputs
jacobian   params + inputs, header ``wrt``             outputs + ``jacobian:<out>`` (packed)
jvp        params + inputs + ``tangent:<arg>``         outputs + ``tangent:<out>``
vjp        params + inputs + ``cotangent:<out>``,      ``cotangent:<arg>`` for each ``wrt`` arg
           header ``wrt``
=========  ==========================================  ==========================================

    >>> import numpy as np
    >>> from jacana.protocol.stage import JaxStage
    >>> from jacana.protocol.transport import InProcessTransport
    >>> s = JaxStage(lambda p, i: {"y": p["a"] * i["x"]}, params={"a": np.float32(1)},
    ...              inputs={"x": np.ones(2, np.float32)}, stage_id="scale")
    >>> remote = RemoteStage(InProcessTransport(s))
    >>> remote.apply({"a": np.float32(3)}, {"x": np.ones(2, np.float32)})["y"].tolist()
    [3.0, 3.0]
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jacana.protocol.errors import MalformedMessage, ProtocolError, StageError, error_class
from jacana.protocol.message import Message, decode, encode, encode_parts, params_digest
from jacana.protocol.provenance import Provenance
from jacana.protocol.stage import Arrays, Stage, StageSpec, TensorSpec

DERIVATIVE_PREFIXES = ("jacobian:", "tangent:", "cotangent:")


def error_message(exc: BaseException, request: Message | None = None) -> Message:
    """An ``error`` response describing ``exc`` (code + message; no traceback)."""
    code = exc.code if isinstance(exc, ProtocolError) else StageError.code
    text = str(exc) if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
    meta = {"error": {"code": code, "message": text[:4000]}}
    if request is None:
        return Message("error", role="response", meta=meta)
    return Message(
        "error", role="response", stage=request.stage, step=request.step,
        params_digest=request.params_digest, meta=meta,
    )


def raise_if_error(msg: Message) -> Message:
    """Raise the protocol error an ``error`` message carries; else return ``msg``."""
    if msg.kind == "error":
        err = msg.meta.get("error") if isinstance(msg.meta, Mapping) else None
        code = err.get("code") if isinstance(err, Mapping) else None
        text = err.get("message") if isinstance(err, Mapping) else None
        raise error_class(str(code))(f"peer {msg.stage or '?'}: {text}")
    return msg


def split_tensors(tensors: Mapping[str, Any]) -> tuple[dict, dict[str, dict]]:
    """(outputs, {"jacobian": {...}, "tangent": {...}, "cotangent": {...}}) of a response's tensors,
    the derivative prefixes stripped."""
    outputs, derived = {}, {p[:-1]: {} for p in DERIVATIVE_PREFIXES}
    for name, arr in tensors.items():
        prefix = next((p for p in DERIVATIVE_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            outputs[name] = arr
        else:
            derived[prefix[:-1]][name[len(prefix):]] = arr
    return outputs, derived


def split_request(req: Message) -> tuple[dict, dict, dict[str, dict]]:
    """(params, inputs, {prefix: {name: array}}) from a request's tensors."""
    params, inputs, derived = {}, {}, {p: {} for p in DERIVATIVE_PREFIXES}
    pnames = set(req.param_names)
    for name, arr in req.tensors.items():
        prefix = next((p for p in DERIVATIVE_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            derived[prefix][name[len(prefix):]] = arr
        elif name in pnames:
            params[name] = arr
        else:
            inputs[name] = arr
    missing = pnames - set(params)
    if missing:
        raise MalformedMessage(f"params.names lists {sorted(missing)} but no such tensors")
    if req.params_digest and params_digest(params) != req.params_digest:
        raise MalformedMessage("params digest does not match the parameter tensors")
    return params, inputs, derived


def _describe_arg(spec: TensorSpec) -> str:
    return f"shape {list(spec.shape)} and dtype {spec.dtype}"


def _conform_one(stage: str, what: str, name: str, value: Any, decl: TensorSpec, seed: bool) -> np.ndarray:
    arr = np.asarray(value)
    given = arr.dtype.name
    if tuple(arr.shape) != decl.shape:
        raise MalformedMessage(f"stage {stage!r}: {what} {name!r} has shape {list(arr.shape)} and dtype {given}; "
                               f"the stage declares {_describe_arg(decl)}")
    if given == decl.dtype:
        return arr
    # a lossless widening (e.g. float32 -> float64, from a client running JAX without x64) is
    # converted to the declared dtype; a tangent or cotangent (a derivative seed) may also be
    # narrowed within its kind, as every stage casts seeds to its own dtype anyway
    if np.can_cast(arr.dtype, decl.dtype, "same_kind" if seed else "safe"):
        return arr.astype(decl.dtype)
    raise MalformedMessage(f"stage {stage!r}: {what} {name!r} has dtype {given}; the stage declares "
                           f"{_describe_arg(decl)} (only a lossless widening is converted)")


def conform(spec: StageSpec, params: Arrays, inputs: Arrays, derived: Mapping[str, Arrays]
            ) -> tuple[dict, dict, dict[str, dict]]:
    """Check a request's tensors against the stage's declared signature ``spec``: every parameter
    and input present, none other, each of the declared shape and dtype; tangents of declared
    arguments and cotangents of declared outputs of their shapes. Raise :class:`MalformedMessage`
    naming the tensor otherwise. The stage then only ever sees its declared signature, so it
    compiles nothing new for a client's whim."""
    sid = spec.stage
    declared = {"parameter": {t.name: t for t in spec.params}, "input": {t.name: t for t in spec.inputs}}
    kinds = (("parameter", params, "input"), ("input", inputs, "parameter"))
    for what, given, other in kinds:
        for name in given:
            if name in declared[what]:
                continue
            if name in declared[other]:
                hint = ("; it is a parameter: list it in params.names" if other == "parameter"
                        else "; it is an input, not a parameter")
            else:
                hint = f"; it declares {sorted(declared[what])[:20]}"
            raise MalformedMessage(f"stage {sid!r} has no {what} {name!r}{hint}")
    for what, given, _ in kinds:
        missing = [n for n in declared[what] if n not in given]
        if missing:
            raise MalformedMessage(f"stage {sid!r}: the request lacks the {what}s {missing[:20]}")
    out = [{n: _conform_one(sid, what, n, v, declared[what][n], False) for n, v in given.items()}
           for what, given, _ in kinds]
    args, outputs = spec.args, {t.name: t for t in spec.outputs}
    seeds: dict[str, dict] = {p: {} for p in DERIVATIVE_PREFIXES}
    for prefix, values in derived.items():
        if values and prefix == "jacobian:":
            raise MalformedMessage(f"stage {sid!r}: a request carries no jacobian: tensors")
        table, kind = (args, "argument") if prefix == "tangent:" else (outputs, "output")
        for name, value in values.items():
            if name not in table:
                raise MalformedMessage(f"stage {sid!r}: {prefix}{name} names no {kind} of the stage")
            seeds[prefix][name] = _conform_one(sid, prefix[:-1], prefix + name, value, table[name], True)
    return out[0], out[1], seeds


def handle(stage: Stage, req: Message, *, check_signature: bool = False) -> Message:
    """Serve one request with ``stage``; errors become ``error`` messages.

    ``check_signature``: refuse (``malformed``) tensors that are not of the stage's declared
    signature (:func:`conform`) instead of passing them on; the network server does."""
    try:
        if req.role != "request":
            raise MalformedMessage(f"expected a request, got a {req.role}")
        if req.kind == "hello":
            return req.reply(meta={"stage": stage.stage_id})
        if req.kind == "describe":
            shapes = req.meta.get("inputs")
            override = None
            if shapes is not None:
                if not isinstance(shapes, list):
                    raise MalformedMessage("meta.inputs must be a list of tensor specs")
                override = {t.name: t for t in (TensorSpec.from_json(s) for s in shapes)}
            return req.reply(meta={"spec": stage.describe(override).to_json()})
        if req.kind == "error":
            raise MalformedMessage("an error message is not a request")
        params, inputs, derived = split_request(req)
        if req.provenance:
            stage = stage.for_chunk(req.provenance)
        spec = stage.describe()
        if check_signature:
            params, inputs, derived = conform(spec, params, inputs, derived)
        axes = {t.name: t.axes for t in spec.outputs if t.axes is not None}
        if req.kind == "apply":
            outs = stage.apply(params, inputs)
            return req.reply(tensors=outs, axes={k: v for k, v in axes.items() if k in outs})
        wrt = spec.check_wrt(req.wrt) if req.wrt else spec.diff_args
        if req.kind == "jacobian":
            outs, jac = stage.jacobian(params, inputs, wrt)
            tensors = {**outs, **{f"jacobian:{o}": j for o, j in jac.items()}}
            jac_axes = {f"jacobian:{o}": (*a, "wrt") for o, a in axes.items() if f"jacobian:{o}" in tensors}
            return req.reply(tensors=tensors, wrt=wrt, axes={**{k: v for k, v in axes.items() if k in outs}, **jac_axes})
        if req.kind == "jvp":
            outs, touts = stage.jvp(params, inputs, derived["tangent:"])
            return req.reply(tensors={**outs, **{f"tangent:{o}": t for o, t in touts.items()}})
        if req.kind == "vjp":
            grads = stage.vjp(params, inputs, derived["cotangent:"], wrt)
            return req.reply(tensors={f"cotangent:{a}": grads[a] for a in wrt}, wrt=wrt)
        raise MalformedMessage(f"unknown request kind {req.kind!r}")
    except Exception as exc:  # every failure is answered as an error message
        return error_message(exc, req)


def handle_bytes(stage: Stage, data: bytes, *, max_bytes: int | None = None, check_signature: bool = False) -> bytes:
    """Decode, serve, encode. Never raises for bad input: answers an error message."""
    return b"".join(handle_parts(stage, data, max_bytes=max_bytes, check_signature=check_signature))


def handle_parts(stage: Stage, data: Any, *, max_bytes: int | None = None, check_signature: bool = False) -> list:
    """:func:`handle_bytes` answering the buffers of :func:`~jacana.protocol.message.encode_parts`
    (a stream writes them in turn: the outputs are not copied into one message first)."""
    try:
        req = decode(data, max_bytes=max_bytes)
    except Exception as exc:
        return encode_parts(error_message(exc))
    resp = handle(stage, req, check_signature=check_signature)
    try:
        return encode_parts(resp)
    except Exception as exc:  # e.g. a stage returned an unsupported dtype
        return encode_parts(error_message(exc, req))


class MessageStage(Stage):
    """A :class:`Stage` whose every call is one request message answered by ``call(request) -> response``.

    The one place where stage calls become messages and responses become arrays: a peer
    behind a transport (:class:`RemoteStage`), a sum over parts
    (:class:`~jacana.protocol.pipeline.AdditiveStage`), a cluster (the dask executor) all
    supply only ``call``. ``spec`` is the declared signature (default: asked with a
    ``describe`` request). ``step`` and ``provenance`` are sent in every request; replies must
    echo the request's step and parameter digest.
    """

    def __init__(self, call: Any, spec: StageSpec | None = None, *, provenance: Sequence[Provenance] = (),
                 step: int | None = None) -> None:
        self._call = call
        self.provenance = tuple(provenance)
        self.step = step
        self._spec = spec
        self.stage_id = spec.stage if spec is not None else ""
        self.stage_id = self.describe().stage

    def request(self, kind: str, params: Arrays = {}, inputs: Arrays = {}, extra: Arrays = {}, *,
                wrt: Sequence[str] = (), meta: Mapping[str, Any] | None = None,
                tangents: Arrays | None = None, cotangents: Arrays | None = None) -> Message:
        """The request message of one call: params, inputs, and ``tangents`` / ``cotangents`` by name
        (sent as ``tangent:<name>`` / ``cotangent:<name>``; ``extra``: tensors already so named)."""
        params = {k: np.asarray(v) for k, v in params.items()}
        extra = {**extra, **{f"tangent:{k}": np.asarray(v) for k, v in (tangents or {}).items()},
                 **{f"cotangent:{k}": np.asarray(v) for k, v in (cotangents or {}).items()}}
        return Message(
            kind,
            {**params, **{k: np.asarray(v) for k, v in inputs.items()}, **extra},
            stage=getattr(self, "stage_id", ""),
            step=self.step,
            param_names=tuple(params),
            params_digest=params_digest(params) if params else "",
            wrt=tuple(wrt),
            provenance=self.provenance,
            meta=dict(meta or {}),
        )

    def call(self, req: Message) -> Message:
        resp = raise_if_error(self._call(req))
        if resp.role != "response" or resp.kind != req.kind:
            raise MalformedMessage(f"expected a {req.kind} response, got {resp.role} {resp.kind}")
        if resp.step != req.step or resp.params_digest != req.params_digest:
            raise MalformedMessage("response does not echo the request's step and parameter digest (stale reply?)")
        return resp

    def describe(self, inputs: Mapping[str, TensorSpec] | None = None) -> StageSpec:
        if inputs is None and self._spec is not None:
            return self._spec
        meta = {"inputs": [t.to_json() for t in inputs.values()]} if inputs else None
        resp = self.call(self.request("describe", meta=meta))
        spec = StageSpec.from_json(resp.meta.get("spec"))
        if inputs is None:
            self._spec = spec
        return spec

    def apply(self, params, inputs):
        return split_tensors(self.call(self.request("apply", params, inputs)).tensors)[0]

    def jacobian(self, params, inputs, wrt=None):
        wrt = self.describe().check_wrt(wrt)
        resp = self.call(self.request("jacobian", params, inputs, wrt=wrt))
        if tuple(resp.wrt) != tuple(wrt):
            raise MalformedMessage(f"jacobian response wrt {resp.wrt} != requested {wrt}")
        outs, derived = split_tensors(resp.tensors)
        return outs, derived["jacobian"]

    def jvp(self, params, inputs, tangents):
        outs, derived = split_tensors(self.call(self.request("jvp", params, inputs, tangents=tangents)).tensors)
        return outs, derived["tangent"]

    def vjp(self, params, inputs, cotangents, wrt=None):
        wrt = self.describe().check_wrt(wrt)
        resp = self.call(self.request("vjp", params, inputs, wrt=wrt, cotangents=cotangents))
        grads = split_tensors(resp.tensors)[1]["cotangent"]
        if set(grads) != set(wrt):
            raise MalformedMessage(f"vjp response gives {sorted(grads)}, requested {list(wrt)}")
        return grads


class RemoteStage(MessageStage):
    """A :class:`Stage` whose work is done by a peer behind a transport (``transport.request``)."""

    def __init__(self, transport: Any, *, provenance: Sequence[Provenance] = (), step: int | None = None,
                 spec: StageSpec | None = None) -> None:
        self.transport = transport
        super().__init__(transport.request, spec, provenance=provenance, step=step)
