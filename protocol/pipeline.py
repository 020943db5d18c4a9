"""Composition of stages: chains, additive reductions, and JAX interop.

* :class:`Pipeline` chains stages by name (an output feeds any later input of
  the same name) and is itself a :class:`~jacana.protocol.stage.Stage`; its
  ``jacobian`` composes Jacobian products forward (one ``jacobian`` call per
  stage), its ``vjp`` runs ``apply`` forward and pulls cotangents back.
* :class:`AdditiveStage` sends the same request to many parts (chunks), checks
  their provenance and sums the replies (:func:`reduce_partials`).
* :func:`as_jax_function` makes any stage (in-process or remote) a JAX function
  that ``jax.grad`` / ``jax.value_and_grad`` differentiate.

    >>> import numpy as np, jax
    >>> from jacana.protocol.stage import JaxStage
    >>> sq = JaxStage(lambda p, i: {"y": p["a"] * i["x"] ** 2}, {"a": np.float32(1)},
    ...               {"x": np.ones(3, np.float32)}, stage_id="sq")
    >>> tot = JaxStage(lambda p, i: {"z": i["y"].sum()}, {}, {"y": np.ones(3, np.float32)},
    ...                differentiable_inputs=["y"], stage_id="sum")
    >>> pipe = Pipeline([sq, tot])
    >>> x = np.arange(3, dtype=np.float32)
    >>> outs, jac = pipe.jacobian({"a": np.float32(2)}, {"x": x})
    >>> float(outs["z"]), float(jac["z"][0])
    (10.0, 5.0)
    >>> f = as_jax_function(pipe)
    >>> float(jax.grad(lambda a: f({"a": a}, {"x": x})["z"])(np.float32(2)))
    5.0
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from jacana.protocol.errors import MalformedMessage, ProtocolError, StageError
from jacana.protocol.message import Message
from jacana.protocol.provenance import Provenance, merge
from jacana.protocol.rpc import MessageStage, raise_if_error
from jacana.protocol.stage import Arrays, Stage, StageSpec, TensorSpec, sizes, unpack


#: Forward mode (one ``jacobian`` pass gives the value and every derivative) up to this many
#: differentiated numbers; reverse mode (``apply`` forward, then one ``vjp`` pass back) above.
#: The AGC cuts (4 numbers) run forward; with bin edges or a network's weights (tens to
#: thousands) the two reverse passes are cheaper than that many tangents.
FORWARD_MAX_PARAMS = 16


def gradient_mode(n_params: int) -> str:
    """``"jacobian"`` (forward mode) for at most :data:`FORWARD_MAX_PARAMS` numbers, else ``"vjp"``."""
    return "jacobian" if n_params <= FORWARD_MAX_PARAMS else "vjp"


class Pipeline(Stage):
    """Stages chained by name. Parameters are shared by name across stages
    (their derivatives add up); inputs not produced by an earlier stage are the
    pipeline's inputs; ``outputs`` defaults to the last stage's outputs."""

    def __init__(self, stages: Sequence[Stage], *, stage_id: str = "pipeline", outputs: Sequence[str] | None = None) -> None:
        if not stages:
            raise StageError("a pipeline needs at least one stage")
        self.stages = list(stages)
        self.stage_id = stage_id
        self.specs = [s.describe() for s in self.stages]
        self._outputs = tuple(outputs) if outputs is not None else self.specs[-1].output_names
        self._spec = self._build_spec(self.specs)

    def _build_spec(self, specs: Sequence[StageSpec]) -> StageSpec:
        params: dict[str, TensorSpec] = {}
        inputs: dict[str, TensorSpec] = {}
        produced: dict[str, TensorSpec] = {}
        for spec in specs:
            for p in spec.params:
                if p.name in produced or p.name in inputs:
                    raise StageError(f"pipeline {self.stage_id!r}: parameter {p.name!r} clashes with a tensor name")
                if p.name in params and (params[p.name].shape, params[p.name].dtype) != (p.shape, p.dtype):
                    raise StageError(f"pipeline {self.stage_id!r}: parameter {p.name!r} declared with two shapes/dtypes")
                params.setdefault(p.name, p)
            for i in spec.inputs:
                if i.name in params:
                    raise StageError(f"pipeline {self.stage_id!r}: input {i.name!r} clashes with a parameter")
                if i.name not in produced:
                    prev = inputs.get(i.name)
                    inputs[i.name] = i if prev is None or i.differentiable else prev
            for o in spec.outputs:
                if o.name in produced or o.name in inputs or o.name in params:
                    raise StageError(f"pipeline {self.stage_id!r}: output {o.name!r} of {spec.stage!r} is produced twice or shadows an input")
                produced[o.name] = o
        missing = [o for o in self._outputs if o not in produced]
        if missing:
            raise StageError(f"pipeline {self.stage_id!r}: no stage produces {missing}")
        return StageSpec(self.stage_id, tuple(params.values()), tuple(inputs.values()),
                         tuple(produced[o] for o in self._outputs))

    def describe(self, inputs: Mapping[str, TensorSpec] | None = None) -> StageSpec:
        if not inputs:
            return self._spec
        known = dict(inputs)
        specs = []
        for stage, spec in zip(self.stages, self.specs):
            mine = {n: known[n] for n in spec.input_names if n in known}
            s = stage.describe(mine) if mine else spec
            specs.append(s)
            known.update({o.name: o for o in s.outputs})
        return self._build_spec(specs)

    @staticmethod
    def _args(spec: StageSpec, params: Arrays, env: Mapping[str, Any]) -> tuple[dict, dict]:
        try:
            return {n: params[n] for n in spec.param_names}, {n: env[n] for n in spec.input_names}
        except KeyError as exc:
            raise StageError(f"stage {spec.stage!r} needs {exc.args[0]!r}, which nothing provides") from None

    def _forward(self, params: Arrays, inputs: Arrays) -> dict[str, Any]:
        env = dict(inputs)
        for stage, spec in zip(self.stages, self.specs):
            env.update(stage.apply(*self._args(spec, params, env)))
        return env

    def apply(self, params, inputs):
        env = self._forward(params, inputs)
        return {o: env[o] for o in self._outputs}

    def jacobian(self, params, inputs, wrt=None):
        wrt = self._spec.check_wrt(wrt)
        cols = {name: sl for name, _, sl in sizes(self._spec, wrt)}
        n = sum(sl.stop - sl.start for sl in cols.values())
        env = dict(inputs)
        jac: dict[str, np.ndarray] = {}  # tensor -> (size, n) Jacobian w.r.t. the packed wrt
        for a in wrt:
            if a in inputs:
                block = np.zeros((np.size(inputs[a]), n))
                block[:, cols[a]] = np.eye(np.size(inputs[a]))
                jac[a] = block
        for stage, spec in zip(self.stages, self.specs):
            p, i = self._args(spec, params, env)
            for t in spec.inputs:
                if t.name in jac and not t.differentiable:
                    raise StageError(f"input {t.name!r} of stage {spec.stage!r} depends on {list(wrt)} but is not differentiable")
            wrt_k = tuple(x for x in spec.param_names if x in cols) + tuple(
                t.name for t in spec.inputs if t.name in jac
            )
            if not wrt_k:
                env.update(stage.apply(p, i))
                continue
            outs, jk = stage.jacobian(p, i, wrt_k)
            env.update(outs)
            cols_k = sizes(spec, wrt_k)
            for o, v in outs.items():
                if np.asarray(v).dtype.kind not in "fc":
                    continue
                jo = np.asarray(jk[o]).reshape(np.size(v), -1)
                total = np.zeros((np.size(v), n), np.result_type(jo.dtype, np.float32))
                for name, _, sl in cols_k:
                    if name in spec.param_names:  # d out / d param, directly
                        total[:, cols[name]] += jo[:, sl]
                    else:  # chain rule through an input: (out x input) @ (input x wrt)
                        total += jo[:, sl] @ jac[name]
                jac[o] = total
        out_vals = {o: env[o] for o in self._outputs}
        out_jac = {
            o: (jac[o] if o in jac else np.zeros((np.size(v), n), np.result_type(np.asarray(v).dtype, np.float32))).reshape(np.shape(v) + (n,))
            for o, v in out_vals.items()
        }
        return out_vals, out_jac

    def jvp(self, params, inputs, tangents):
        wrt = self._spec.check_wrt(tuple(tangents))
        env = dict(inputs)
        tan = {a: np.asarray(tangents[a]) for a in wrt if a in inputs}
        ptan = {a: np.asarray(tangents[a]) for a in wrt if a not in inputs}
        for stage, spec in zip(self.stages, self.specs):
            p, i = self._args(spec, params, env)
            t_k = {x: ptan[x] for x in spec.param_names if x in ptan}
            t_k.update({t.name: tan[t.name] for t in spec.inputs if t.name in tan})
            if not t_k:
                env.update(stage.apply(p, i))
                continue
            outs, touts = stage.jvp(p, i, t_k)
            env.update(outs)
            tan.update({o: t for o, t in touts.items() if np.asarray(outs[o]).dtype.kind in "fc"})
        outs = {o: env[o] for o in self._outputs}
        return outs, {o: tan.get(o, np.zeros_like(v, dtype=np.result_type(np.asarray(v).dtype, np.float32))) for o, v in outs.items()}

    def mode(self, wrt: Sequence[str] | None = None) -> str:
        """The mode :meth:`value_and_grad` uses for ``wrt`` (default: every parameter)."""
        wrt = self._spec.check_wrt(wrt)
        return gradient_mode(sum(self._spec.args[a].size for a in wrt))

    def value_and_grad(self, params: Arrays, inputs: Arrays, output: str | None = None,
                       wrt: Sequence[str] | None = None) -> tuple[dict, dict]:
        """(outputs, d output / d arg for each ``wrt`` arg): one optimisation step's call.

        ``output`` (default: the only output) must be a scalar. Forward or reverse mode is
        chosen from the number of differentiated values (:func:`gradient_mode`); the caller
        never needs to know which ran."""
        wrt = self._spec.check_wrt(wrt)
        output = output or (self._outputs[0] if len(self._outputs) == 1 else None)
        if output not in self._outputs:
            raise StageError(f"pipeline {self.stage_id!r}: name the scalar output to differentiate, one of {list(self._outputs)}")
        out_spec = next(t for t in self._spec.outputs if t.name == output)
        if out_spec.size != 1:
            raise StageError(f"pipeline {self.stage_id!r}: output {output!r} has shape {out_spec.shape}, not a scalar")
        if self.mode(wrt) == "jacobian":
            outs, jac = self.jacobian(params, inputs, wrt)
            return outs, unpack(np.asarray(jac[output]).reshape(-1), sizes(self._spec, wrt), {**params, **inputs})
        env, grads = self._vjp(params, inputs, {output: np.ones(out_spec.shape)}, wrt)
        return {o: env[o] for o in self._outputs}, grads

    def vjp(self, params, inputs, cotangents, wrt=None):
        return self._vjp(params, inputs, cotangents, wrt)[1]

    def _vjp(self, params, inputs, cotangents, wrt=None) -> tuple[dict, dict]:
        wrt = self._spec.check_wrt(wrt)
        env = dict(inputs)
        calls = []
        for stage, spec in zip(self.stages, self.specs):
            p, i = self._args(spec, params, env)
            outs = stage.apply(p, i)
            env.update(outs)
            calls.append((stage, spec, p, i, outs))
        want = set(wrt)
        # names through which a cotangent can flow: wanted args, and floats produced from them
        live = set(want)
        for _, spec, _, _, outs in calls:
            if any(x in live for x in spec.param_names) or any(t.name in live and t.differentiable for t in spec.inputs):
                live.update(o for o, v in outs.items() if np.asarray(v).dtype.kind in "fc")
        ct: dict[str, np.ndarray] = {o: np.asarray(c) for o, c in cotangents.items()}
        for stage, spec, p, i, outs in reversed(calls):
            cts = {o: ct[o] for o in outs if o in ct}
            if not cts:
                continue
            wrt_k = tuple(x for x in spec.param_names if x in want) + tuple(
                t.name for t in spec.inputs if t.differentiable and t.name in live
            )
            if not wrt_k:
                continue
            grads = stage.vjp(p, i, cts, wrt_k)
            for a, g in grads.items():
                ct[a] = ct[a] + g if a in ct else np.asarray(g)
        like = {**params, **inputs}
        return env, {a: ct[a] if a in ct else unpack(None, [(a, np.shape(like[a]), slice(0))], like)[a] for a in wrt}


def reduce_partials(messages: Sequence[Message], expected: Sequence[Provenance] | None = None) -> Message:
    """Sum additive partial responses after checking they belong together.

    All must be responses of one kind, step and parameter digest with the same
    tensors (names, dtypes, shapes); their provenance is merged with
    :func:`~jacana.protocol.provenance.merge` (duplicates, overlaps and, given
    ``expected``, missing chunks raise :class:`ProvenanceError`)."""
    if not messages:
        raise ProtocolError("no partial results to reduce")
    for m in messages:
        raise_if_error(m)
    first = messages[0]
    if first.kind not in ("apply", "jacobian", "jvp", "vjp") or first.role != "response":
        raise MalformedMessage(f"cannot sum {first.role} messages of kind {first.kind!r}")
    layout = [(k, np.asarray(v).dtype, np.shape(v)) for k, v in first.tensors.items()]
    for m in messages[1:]:
        if (m.kind, m.role, m.step, m.params_digest, tuple(m.wrt)) != (first.kind, first.role, first.step, first.params_digest, tuple(first.wrt)):
            raise MalformedMessage(
                f"partials disagree on kind/step/parameter digest/wrt: {(m.kind, m.step, m.params_digest[:15])} vs "
                f"{(first.kind, first.step, first.params_digest[:15])}"
            )
        if [(k, np.asarray(v).dtype, np.shape(v)) for k, v in m.tensors.items()] != layout:
            raise MalformedMessage("partials disagree on their tensors' names, dtypes or shapes")
    provenance = merge([m.provenance for m in messages], expected)
    total = {}
    for name, dtype, _ in layout:
        if dtype == np.bool_:
            raise MalformedMessage(f"cannot sum bool tensor {name!r}")
        total[name] = np.sum([np.asarray(m.tensors[name]) for m in messages], axis=0, dtype=dtype)
    return Message(first.kind, total, role="response", stage=first.stage, step=first.step,
                   params_digest=first.params_digest, wrt=first.wrt, axes=first.axes,
                   provenance=provenance, meta=first.meta)


@dataclass(frozen=True)
class Part:
    """One additive part: a transport, the inputs only it gets, the chunks it covers."""

    transport: Any
    inputs: Mapping[str, Any] = field(default_factory=dict)
    provenance: tuple[Provenance, ...] = ()


class AdditiveStage(MessageStage):
    """The sum over parts of one stage (e.g. yields over chunks of events).

    Each call sends one request per part (concurrently, ``max_workers`` threads),
    then :func:`reduce_partials` checks provenance against ``expected`` (default:
    the parts' own provenance) and sums. Outputs, Jacobians, JVPs and VJPs are
    all additive, so every mode works."""

    def __init__(self, parts: Sequence[Part], *, expected: Sequence[Provenance] | None = None,
                 stage_id: str | None = None, max_workers: int = 8, step: int | None = None) -> None:
        from jacana.protocol.rpc import RemoteStage

        if not parts:
            raise StageError("an additive stage needs at least one part")
        self.parts = list(parts)
        self.expected = tuple(expected) if expected is not None else tuple(p for part in self.parts for p in part.provenance)
        self.max_workers = max_workers
        inner = RemoteStage(self.parts[0].transport).describe()
        private = set(self.parts[0].inputs)
        spec = StageSpec(stage_id or f"sum({inner.stage})", inner.params,
                         tuple(t for t in inner.inputs if t.name not in private), inner.outputs)
        super().__init__(self._sum, spec, step=step)

    def _sum(self, base: Message) -> Message:
        def one(part: Part) -> Message:
            req = base.__class__(**{**base.__dict__, "tensors": {**base.tensors, **{k: np.asarray(v) for k, v in part.inputs.items()}},
                                    "provenance": tuple(part.provenance)})
            resp = part.transport.request(req)
            raise_if_error(resp)
            if resp.step != req.step or resp.params_digest != req.params_digest:
                raise MalformedMessage("partial response does not echo the request's step and parameter digest")
            return resp

        if len(self.parts) == 1 or self.max_workers <= 1:
            replies = [one(p) for p in self.parts]
        else:
            with ThreadPoolExecutor(min(self.max_workers, len(self.parts))) as pool:
                replies = list(pool.map(one, self.parts))
        return reduce_partials(replies, self.expected)


def as_jax_function(stage: Stage, mode: str = "jacobian"):
    """Wrap ``stage`` as ``f(params: dict, inputs: dict) -> dict`` for JAX.

    ``mode="jacobian"``: a ``jax.custom_jvp`` whose rule makes one ``jacobian``
    call (one round trip gives value and Jacobian); works with ``jax.grad``,
    ``jax.value_and_grad``, ``jax.jacfwd`` and ``jax.jit``.
    ``mode="vjp"``: a ``jax.custom_vjp``: ``apply`` forward, ``vjp`` backward
    (two round trips; best for many parameters). Host calls go through
    ``jax.pure_callback``; output shapes come from ``stage.describe()``.
    """
    import jax
    import jax.numpy as jnp

    if mode not in ("jacobian", "vjp"):
        raise ValueError(f"mode must be 'jacobian' or 'vjp', not {mode!r}")
    spec = stage.describe()
    diff = spec.diff_args
    pnames = set(spec.param_names)
    canon = lambda dt: jax.dtypes.canonicalize_dtype(np.dtype(dt))  # noqa: E731
    out_structs = {t.name: jax.ShapeDtypeStruct(t.shape, canon(t.dtype)) for t in spec.outputs}
    n = sum(spec.args[a].size for a in diff)
    jac_structs = {t.name: jax.ShapeDtypeStruct(t.shape + (n,), canon(t.dtype)) for t in spec.outputs if t.is_float}
    arg_structs = {a: jax.ShapeDtypeStruct(spec.args[a].shape, canon(spec.args[a].dtype)) for a in diff}

    def rebuild(d: Mapping, c: Mapping) -> tuple[dict, dict]:
        allv = {**{k: np.asarray(v) for k, v in d.items()}, **{k: np.asarray(v) for k, v in c.items()}}
        return ({k: allv[k] for k in spec.param_names}, {k: allv[k] for k in spec.input_names})

    def cast(values: Mapping, structs: Mapping) -> dict:
        return {k: np.asarray(values[k], dtype=s.dtype).reshape(s.shape) for k, s in structs.items()}

    def host_apply(d, c):
        return cast(stage.apply(*rebuild(d, c)), out_structs)

    def host_jac(d, c):
        outs, jac = stage.jacobian(*rebuild(d, c), diff)
        return cast(outs, out_structs), cast(jac, jac_structs)

    def host_vjp(d, c, ct):
        cts = {k: np.asarray(v) for k, v in ct.items() if k in jac_structs}
        return cast(stage.vjp(*rebuild(d, c), cts, diff), arg_structs)

    def call_apply(d, c):
        return jax.pure_callback(host_apply, out_structs, d, c, vmap_method="sequential")

    if mode == "jacobian":
        @jax.custom_jvp
        def core(d, c):
            return call_apply(d, c)

        @core.defjvp
        def core_jvp(primals, tangents):
            d, c = primals
            td, _ = tangents
            outs, jac = jax.pure_callback(host_jac, (out_structs, jac_structs), d, c, vmap_method="sequential")
            if n:
                flat = jnp.concatenate([jnp.reshape(td[a], (-1,)) for a in diff])
            touts = {}
            for o, v in outs.items():
                if o in jac:
                    touts[o] = jnp.tensordot(jac[o], flat.astype(jac[o].dtype), axes=1) if n else jnp.zeros_like(v)
                else:
                    touts[o] = np.zeros(v.shape, jax.dtypes.float0)
            return outs, touts
    else:
        @jax.custom_vjp
        def core(d, c):
            return call_apply(d, c)

        def fwd(d, c):
            return call_apply(d, c), (d, c)

        def bwd(res, ct):
            d, c = res
            cts = {k: v for k, v in ct.items() if k in jac_structs}
            grads = jax.pure_callback(host_vjp, arg_structs, d, c, cts, vmap_method="sequential")
            zeros = {k: (jnp.zeros_like(v) if jnp.issubdtype(v.dtype, jnp.inexact) else np.zeros(np.shape(v), jax.dtypes.float0))
                     for k, v in c.items()}
            return grads, zeros

        core.defvjp(fwd, bwd)

    def f(params: Mapping[str, Any], inputs: Mapping[str, Any] | None = None) -> dict:
        inputs = inputs or {}
        allv = {**params, **inputs}
        missing = [k for k in spec.param_names + spec.input_names if k not in allv]
        extra = [k for k in allv if k not in pnames and k not in spec.input_names]
        if missing or extra:
            raise StageError(f"stage {spec.stage!r}: missing {missing}, unexpected {extra}")
        d = {a: jnp.asarray(allv[a], canon(spec.args[a].dtype)) for a in diff}
        c = {k: jnp.asarray(v) for k, v in allv.items() if k not in d}
        return core(d, c)

    f.spec = spec  # type: ignore[attr-defined]
    return f
