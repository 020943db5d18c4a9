"""The stage contract: declared signature, ``apply`` and derivatives.

A stage is a function ``outputs = f(params, inputs)`` of named arrays. It
declares its signature without running (:meth:`Stage.describe`, an abstract
evaluation) and implements :meth:`Stage.apply` plus any of
:meth:`Stage.jacobian`, :meth:`Stage.jvp`, :meth:`Stage.vjp`; the others are
derived. :class:`JaxStage` derives everything from a JAX function::

    >>> import numpy as np, jax.numpy as jnp
    >>> s = JaxStage(lambda p, i: {"y": p["a"] * i["x"] ** 2},
    ...              params={"a": np.float32(2.0)}, inputs={"x": np.ones(3, np.float32)},
    ...              stage_id="square")
    >>> [t.name for t in s.describe().outputs]
    ['y']
    >>> outs, jac = s.jacobian({"a": np.float32(2.0)}, {"x": np.arange(3, dtype=np.float32)})
    >>> jac["y"].ravel().tolist()  # dy/da = x**2, packed over wrt = ("a",)
    [0.0, 1.0, 4.0]

Jacobians are *packed*: ``jacobian[out]`` has shape ``out.shape + (N,)`` where
the last axis runs over the ``wrt`` arguments in order, each flattened (C order),
``N`` the sum of their sizes. Gradients from :meth:`Stage.vjp` are per argument.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jacana.protocol.errors import MalformedMessage, ProtocolError, StageError
from jacana.protocol.message import BASE_NAME_RE, wire_dtype
from jacana.protocol.provenance import Provenance

Arrays = Mapping[str, Any]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one parameter, input or output (no values)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str, ...] | None = None
    differentiable: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return np.dtype(self.dtype).kind in "fc"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.axes is not None:
            out["axes"] = list(self.axes)
        if self.differentiable:
            out["differentiable"] = True
        return out

    @classmethod
    def from_json(cls, obj: Any) -> "TensorSpec":
        try:
            if not isinstance(obj, Mapping) or not set(obj) <= {"name", "shape", "dtype", "axes", "differentiable"}:
                raise TypeError("bad keys")
            name, shape, dtype = obj["name"], obj["shape"], obj["dtype"]
            if not isinstance(name, str) or not BASE_NAME_RE.fullmatch(name):
                raise TypeError(f"bad name {name!r}")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise TypeError("bad shape")
            axes = obj.get("axes")
            if axes is not None and (not isinstance(axes, list) or len(axes) != len(shape)
                                     or not all(isinstance(a, str) for a in axes)):
                raise TypeError("bad axes")
            diff = obj.get("differentiable", False)
            if not isinstance(diff, bool):
                raise TypeError("bad differentiable flag")
            return cls(name, tuple(shape), wire_dtype(dtype) if isinstance(dtype, str) else _raise(dtype),
                       tuple(axes) if axes is not None else None, diff)
        except (TypeError, KeyError) as exc:
            raise MalformedMessage(f"invalid tensor spec {obj!r:.120}: {exc}") from None

    @classmethod
    def of(cls, name: str, value: Any, **kw: Any) -> "TensorSpec":
        """Spec of an example value (numpy/JAX array or ``ShapeDtypeStruct``)."""
        shape = tuple(int(d) for d in getattr(value, "shape", np.shape(value)))
        dtype = getattr(value, "dtype", None) or np.asarray(value).dtype
        return cls(name, shape, wire_dtype(dtype), **kw)


def _raise(dtype: Any) -> str:
    raise TypeError(f"dtype {dtype!r} is not a string")


@dataclass(frozen=True)
class StageSpec:
    """A stage's declared signature: the result of an abstract evaluation."""

    stage: str
    params: tuple[TensorSpec, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        names = [t.name for t in self.params + self.inputs + self.outputs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise StageError(f"stage {self.stage!r} uses the names {dup} more than once")

    @property
    def args(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.params + self.inputs}

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.params)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def diff_args(self) -> tuple[str, ...]:
        """Default ``wrt``: floating parameters and inputs declared differentiable."""
        return tuple(t.name for t in self.params if t.is_float) + tuple(
            t.name for t in self.inputs if t.differentiable and t.is_float
        )

    def check_wrt(self, wrt: Sequence[str] | None) -> tuple[str, ...]:
        """Validate ``wrt`` against the signature (``None`` means :attr:`diff_args`)."""
        if wrt is None:
            return self.diff_args
        args = self.args
        for name in wrt:
            if name not in args:
                raise StageError(f"stage {self.stage!r} has no argument {name!r} to differentiate")
            spec = args[name]
            if not spec.is_float:
                raise StageError(f"stage {self.stage!r}: argument {name!r} has dtype {spec.dtype}, not differentiable")
            if spec in self.inputs and not spec.differentiable:
                raise StageError(f"stage {self.stage!r}: input {name!r} is not declared differentiable")
        if len(set(wrt)) != len(wrt):
            raise StageError(f"stage {self.stage!r}: wrt {list(wrt)} repeats a name")
        return tuple(wrt)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "params": [t.to_json() for t in self.params],
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    @classmethod
    def from_json(cls, obj: Any) -> "StageSpec":
        if not isinstance(obj, Mapping) or set(obj) != {"stage", "params", "inputs", "outputs"}:
            raise MalformedMessage(f"invalid stage spec {obj!r:.120}")
        lists = [obj[k] for k in ("params", "inputs", "outputs")]
        if not isinstance(obj["stage"], str) or not all(isinstance(v, list) for v in lists):
            raise MalformedMessage(f"invalid stage spec {obj!r:.120}")
        try:
            return cls(obj["stage"], *(tuple(TensorSpec.from_json(t) for t in v) for v in lists))
        except StageError as exc:
            raise MalformedMessage(str(exc)) from None


def sizes(spec: StageSpec, wrt: Sequence[str]) -> list[tuple[str, tuple[int, ...], slice]]:
    """(name, shape, column slice in the packed Jacobian) for each ``wrt`` argument."""
    args, out, col = spec.args, [], 0
    for name in wrt:
        shape = args[name].shape
        out.append((name, shape, slice(col, col + math.prod(shape))))
        col += math.prod(shape)
    return out


def _overridden(obj: Any, name: str) -> bool:
    return getattr(type(obj), name) is not getattr(Stage, name)


class Stage:
    """Base class of every stage. Subclasses implement :meth:`describe`,
    :meth:`apply` and at least one of :meth:`jacobian`, :meth:`jvp`, :meth:`vjp`.
    All arrays are numpy arrays keyed by name."""

    stage_id: str = "stage"

    def describe(self, inputs: Mapping[str, TensorSpec] | None = None) -> StageSpec:
        """Declared signature; ``inputs`` may override input shapes (abstract evaluation)."""
        raise NotImplementedError

    def apply(self, params: Arrays, inputs: Arrays) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def jacobian(self, params: Arrays, inputs: Arrays, wrt: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(outputs, packed Jacobians ``{out: array of shape out.shape + (N,)}``)."""
        spec = self.describe()
        wrt = spec.check_wrt(wrt)
        cols = sizes(spec, wrt)
        n = cols[-1][2].stop if cols else 0
        args = {**params, **inputs}
        if _overridden(self, "jvp"):
            outs, jac = None, None
            for name, shape, sl in cols:
                for k in range(sl.stop - sl.start):
                    tangents = {a: np.zeros(s, np.asarray(args[a]).dtype) for a, s, _ in cols}
                    tangents[name].reshape(-1)[k] = 1
                    outs, touts = self.jvp(params, inputs, tangents)
                    if jac is None:
                        jac = {o: np.zeros(np.shape(t) + (n,), np.asarray(t).dtype) for o, t in touts.items()}
                    for o, t in touts.items():
                        jac[o][..., sl.start + k] = t
            if outs is None:
                outs = self.apply(params, inputs)
                jac = {o: np.zeros(np.shape(v) + (0,), np.asarray(v).dtype) for o, v in outs.items()}
            return dict(outs), jac  # type: ignore[arg-type]
        if _overridden(self, "vjp"):
            outs = self.apply(params, inputs)
            jac = {o: np.zeros(np.shape(v) + (n,), np.result_type(v, np.float32)) for o, v in outs.items()}
            for o, v in outs.items():
                for k in range(np.size(v)):
                    cts = {p: np.zeros(np.shape(w), np.asarray(w).dtype) for p, w in outs.items()}
                    cts[o].reshape(-1)[k] = 1
                    grads = self.vjp(params, inputs, cts, wrt)
                    for name, shape, sl in cols:
                        jac[o].reshape(-1, n)[k, sl] = np.asarray(grads[name]).reshape(-1)
            return dict(outs), jac
        raise StageError(f"stage {self.stage_id!r} implements none of jacobian, jvp, vjp")

    def jvp(self, params: Arrays, inputs: Arrays, tangents: Arrays) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(outputs, output tangents) for tangents of some differentiable arguments."""
        wrt = tuple(tangents)
        outs, jac = self.jacobian(params, inputs, wrt)
        flat = pack(tangents, wrt)
        return outs, {o: contract_columns(j, flat) for o, j in jac.items()}

    def vjp(self, params: Arrays, inputs: Arrays, cotangents: Arrays, wrt: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Gradients ``{arg: sum_out cotangent[out] . d out / d arg}`` for ``wrt``."""
        spec = self.describe()
        wrt = spec.check_wrt(wrt)
        outs, jac = self.jacobian(params, inputs, wrt)
        total = None
        for o, j in jac.items():
            if o not in cotangents:
                continue
            ct = np.asarray(cotangents[o]).reshape(-1)
            term = ct @ np.asarray(j).reshape(ct.size, -1)
            total = term if total is None else total + term
        return unpack(total, sizes(spec, wrt), {**params, **inputs})

    def for_chunk(self, provenance: Sequence[Provenance]) -> "Stage":
        """The stage bound to the chunk(s) a request names (default: itself).

        A data-reading stage overrides this to select its cached event batch."""
        return self


def pack(values: Arrays, wrt: Sequence[str]) -> np.ndarray:
    """Concatenate the flattened ``values[name]`` for ``name in wrt``."""
    if not wrt:
        return np.zeros(0)
    return np.concatenate([np.asarray(values[n]).reshape(-1) for n in wrt])


def unpack(flat: np.ndarray | None, cols: Sequence[tuple[str, tuple[int, ...], slice]], like: Arrays) -> dict[str, np.ndarray]:
    """Split a packed vector back into per-argument arrays (zeros if ``flat`` is None)."""
    out = {}
    for name, shape, sl in cols:
        dtype = np.result_type(np.asarray(like[name]).dtype, np.float32)
        out[name] = np.zeros(shape, dtype) if flat is None else np.asarray(flat[sl], dtype).reshape(shape)
    return out


def contract_columns(jac: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """``jac @ flat`` over the packed last axis."""
    jac = np.asarray(jac)
    return (jac.reshape(-1, jac.shape[-1]) @ flat).reshape(jac.shape[:-1]).astype(jac.dtype, copy=False)


#: Jitted programs a :class:`JaxStage` keeps (one per call kind, ``wrt`` and argument signature).
COMPILE_CACHE_SIZE = 32


def _signature(arrays: Arrays) -> tuple:
    """Names, shapes and dtypes of ``arrays`` (what a jitted program is specialised on)."""
    def dtype(v: Any) -> str:
        dt = getattr(v, "dtype", None)  # (a numpy dtype is falsy: compare with None)
        return str(dt if dt is not None else np.asarray(v).dtype)

    return tuple(sorted((k, tuple(np.shape(v)), dtype(v)) for k, v in arrays.items()))


class JaxStage(Stage):
    """A stage from a JAX function ``fn(params: dict, inputs: dict) -> dict``.

    ``params`` and ``inputs`` give example values (or ``jax.ShapeDtypeStruct``)
    fixing the declared signature; ``differentiable_inputs`` names inputs a
    gradient may flow through; ``axes`` names output axes. ``describe`` uses
    ``jax.eval_shape`` (nothing runs); derivatives use ``jax.jacfwd``/``jacrev``,
    ``jax.jvp`` and ``jax.vjp``, jitted and cached per ``wrt``.
    """

    def __init__(
        self,
        fn: Callable[[dict, dict], dict],
        params: Mapping[str, Any],
        inputs: Mapping[str, Any] | None = None,
        *,
        stage_id: str = "jax",
        differentiable_inputs: Sequence[str] = (),
        axes: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        import jax

        self._jax = jax
        self.fn = fn
        self.stage_id = stage_id
        inputs = inputs or {}
        unknown = set(differentiable_inputs) - set(inputs)
        if unknown:
            raise StageError(f"stage {stage_id!r}: differentiable_inputs {sorted(unknown)} are not inputs")
        self._param_specs = tuple(TensorSpec.of(n, v, differentiable=True) for n, v in params.items())
        self._input_specs = tuple(
            TensorSpec.of(n, v, differentiable=n in differentiable_inputs) for n, v in inputs.items()
        )
        self._axes = {k: tuple(v) for k, v in (axes or {}).items()}
        self._spec = self.describe()
        self._cache: dict[Any, Callable] = {}

    def describe(self, inputs: Mapping[str, TensorSpec] | None = None) -> StageSpec:
        jax = self._jax
        in_specs = self._input_specs
        if inputs:
            unknown = set(inputs) - {t.name for t in in_specs}
            if unknown:
                raise StageError(f"stage {self.stage_id!r} has no inputs {sorted(unknown)}")
            in_specs = tuple(
                replace(t, shape=tuple(inputs[t.name].shape), dtype=wire_dtype(inputs[t.name].dtype)) if t.name in inputs else t
                for t in in_specs
            )
        struct = lambda specs: {t.name: jax.ShapeDtypeStruct(t.shape, t.dtype) for t in specs}  # noqa: E731
        try:
            outs = jax.eval_shape(self.fn, struct(self._param_specs), struct(in_specs))
        except Exception as exc:  # a user function failing abstract evaluation
            raise StageError(f"stage {self.stage_id!r}: abstract evaluation failed: {exc}") from exc
        if not isinstance(outs, Mapping):
            raise StageError(f"stage {self.stage_id!r} must return a dict of arrays, got {type(outs).__name__}")
        out_specs = tuple(TensorSpec.of(n, v, axes=self._axes.get(n)) for n, v in outs.items())
        return StageSpec(self.stage_id, self._param_specs, in_specs, out_specs)

    def _compiled(self, key: Any, build: Callable[[], Callable], *args: Arrays) -> Callable:
        """The jitted program for ``key`` and the shapes/dtypes of ``args``: one program per
        signature, at most :data:`COMPILE_CACHE_SIZE` kept (least recently used dropped, and with
        it its compiled code), so callers varying shapes cannot grow memory without bound."""
        key = (key, *(_signature(a) for a in args))
        fn = self._cache.pop(key, None)
        if fn is None:
            fn = self._jax.jit(build())
            while len(self._cache) >= COMPILE_CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)), None)
        self._cache[key] = fn
        return fn

    def _split(self, wrt: Sequence[str]) -> Callable:
        """g(x, params, inputs) -> fn output, with the wrt arguments taken from x."""
        pnames = set(self._spec.param_names)

        def g(x, params, inputs):
            p = {**params, **{k: v for k, v in x.items() if k in pnames}}
            i = {**inputs, **{k: v for k, v in x.items() if k not in pnames}}
            return dict(self.fn(p, i))

        return g

    def _check(self, params: Arrays, inputs: Arrays) -> None:
        for kind, names, given in (("parameter", self._spec.param_names, params), ("input", self._spec.input_names, inputs)):
            missing = [n for n in names if n not in given]
            extra = [n for n in given if n not in names]
            if missing or extra:
                raise StageError(f"stage {self.stage_id!r}: missing {kind}s {missing}, unexpected {extra}")

    @staticmethod
    def _np(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in tree.items()}

    def apply(self, params: Arrays, inputs: Arrays) -> dict[str, np.ndarray]:
        self._check(params, inputs)
        f = self._compiled("apply", lambda: lambda p, i: dict(self.fn(p, i)), params, inputs)
        return self._np(f(dict(params), dict(inputs)))

    def jacobian(self, params, inputs, wrt=None):
        self._check(params, inputs)
        spec = self._spec
        wrt = spec.check_wrt(wrt)
        cols = sizes(spec, wrt)
        n_in = cols[-1][2].stop if cols else 0
        n_out = sum(t.size for t in spec.outputs)

        def build():
            jax, jnp = self._jax, self._jax.numpy
            g = self._split(wrt)
            jac_fn = jax.jacfwd if n_in <= n_out else jax.jacrev

            def run(params, inputs):
                x = {n: (params[n] if n in params else inputs[n]) for n in wrt}
                if not wrt:
                    outs = g(x, params, inputs)
                    return outs, {o: jnp.zeros(jnp.shape(v) + (0,), jnp.result_type(v)) for o, v in outs.items()}
                jac, outs = jac_fn(lambda x: (g(x, params, inputs),) * 2, has_aux=True)(x)
                packed = {
                    o: jnp.concatenate(
                        [jnp.reshape(jac[o][name], jnp.shape(v) + (math.prod(shape),)) for name, shape, _ in cols], axis=-1
                    )
                    for o, v in outs.items()
                }
                return outs, packed

            return run

        outs, jac = self._compiled(("jacobian", wrt), build, params, inputs)(dict(params), dict(inputs))
        return self._np(outs), self._np(jac)

    def jvp(self, params, inputs, tangents):
        self._check(params, inputs)
        wrt = self._spec.check_wrt(tuple(tangents))

        def build():
            jax = self._jax
            g = self._split(wrt)

            def run(params, inputs, tangents):
                x = {n: (params[n] if n in params else inputs[n]) for n in wrt}
                t = {n: tangents[n].astype(x[n].dtype) for n in wrt}
                return jax.jvp(lambda x: g(x, params, inputs), (x,), (t,))

            return run

        outs, touts = self._compiled(("jvp", wrt), build, params, inputs, tangents)(
            dict(params), dict(inputs), dict(tangents))
        return self._np(outs), self._np(touts)

    def vjp(self, params, inputs, cotangents, wrt=None):
        self._check(params, inputs)
        wrt = self._spec.check_wrt(wrt)
        unknown = set(cotangents) - set(self._spec.output_names)
        if unknown:
            raise StageError(f"stage {self.stage_id!r}: cotangents for unknown outputs {sorted(unknown)}")

        def build():
            jax, jnp = self._jax, self._jax.numpy
            g = self._split(wrt)

            def run(params, inputs, cotangents):
                x = {n: (params[n] if n in params else inputs[n]) for n in wrt}
                outs, pullback = jax.vjp(lambda x: g(x, params, inputs), x)
                cts = {o: (cotangents[o].astype(v.dtype) if o in cotangents else jnp.zeros_like(v)) for o, v in outs.items()}
                return pullback(cts)[0]

            return run

        key = ("vjp", wrt, tuple(sorted(cotangents)))
        fn = self._compiled(key, build, params, inputs, cotangents)
        return self._np(fn(dict(params), dict(inputs), dict(cotangents)))


def load_stage(ref: str, **kwargs: Any) -> Stage:
    """Load a stage from ``"package.module:factory"`` (``factory(**kwargs)`` returns a Stage,
    or the attribute is a Stage). Only importable module paths; nothing is evaluated."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise StageError(f"stage reference {ref!r} is not 'module:callable'")
    module_name, attr = ref.split(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise StageError(f"cannot load stage {ref!r}: {exc}") from exc
    if isinstance(obj, Stage):
        if kwargs:
            raise StageError(f"{ref!r} is a stage, not a factory: it takes no arguments ({sorted(kwargs)})")
        stage = obj
    else:
        try:
            stage = obj(**kwargs)
        except TypeError as exc:
            raise StageError(f"cannot build stage {ref!r} with {sorted(kwargs)}: {exc}") from exc
    if not isinstance(stage, Stage):
        raise StageError(f"{ref!r} did not give a Stage (got {type(stage).__name__})")
    return stage


__all__ = [
    "Stage",
    "StageSpec",
    "TensorSpec",
    "JaxStage",
    "load_stage",
    "pack",
    "unpack",
    "sizes",
    "contract_columns",
    "ProtocolError",
]
