"""The per-chunk soft analysis as a protocol :class:`~jacana.protocol.stage.Stage`.

Parameters: the analysis parameters by name (cuts; ``edges_<region>`` with binning; the
network's weights as ``nn.<weight>``). Inputs: the relaxation, ``relax.<name>`` (not
differentiable). Outputs: the soft yields of every (sample, file variation) the analysis needs,
``yields.<sample>.<variation>.<region>.<sumw|sumw2>`` with shape ``[variations, bins]``.

The stage holds the dense event batches of the chunks it answers for; a (sample, variation)
without batches here answers zeros of the same shape, so every part of an additive sum has
the same outputs and the sum over parts is the sum over chunks. ``jacobian`` is one
forward-mode pass (``jax.jacfwd``), ``vjp`` one reverse-mode pass; in forward mode (few
parameters, :func:`jacana.protocol.pipeline.gradient_mode`) ``apply`` runs the Jacobian's
compiled program too, so a hard-limit check costs no second compilation.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jacana.protocol.pipeline import gradient_mode
from jacana.protocol.stage import Arrays, Stage, StageSpec, TensorSpec
from jacana.protocol.tree import flatten, join, unflatten
from jacana.stages.analysis import SoftConfig, soft_yields
from jacana.stages.jacobian import yields_and_jacobian_call, yields_vjp_call
from jacana.stages.keyed import Key, KeyedBatch, call_keys, split_by_key
from jacana.stages.spec import NOMINAL

STAGE_ID = "jacana.soft_yields"
YIELDS = "yields"
RELAX = "relax"
KINDS = ("sumw", "sumw2")

#: How ``apply`` computes values: "auto" runs the Jacobian's compiled program in forward mode (an
#: optimisation compiles one program per call shape, not two); "forward" always the plain forward pass.
APPLY_PROGRAMS = ("auto", "forward")

#: What an executor runs on each part of the data: ``factory(config, keys, params_like, batches)``
#: returns the additive :class:`Stage` over those batches (``batches`` omitted: the signature
#: only). :class:`SoftYieldsStage` is the analysis' own; any stage with ``relax.*`` inputs and
#: additive outputs can take its place. On dask it must be importable on the workers (a
#: module-level class or function).
ChunkStageFactory = Callable[..., Stage]


def yields_name(key: Key, region: str, kind: str) -> str:
    """Tensor name of one yields histogram."""
    return join(YIELDS, key[0], key[1], region, kind)


def yields_specs(config: SoftConfig, keys: Sequence[Key]) -> tuple[TensorSpec, ...]:
    """The declared yields tensors of ``keys`` (shape ``[variations, bins]``, float64, differentiable)."""
    out = []
    for key in keys:
        n_var = len(config.variations(key[1] == NOMINAL))
        for region in config.regions:
            for kind in KINDS:
                out.append(TensorSpec(yields_name(key, region.name, kind), (n_var, len(region.edges) - 1), "float64",
                                      axes=("variation", "bin"), differentiable=True))
    return tuple(out)


def yields_tree(flat: Mapping) -> dict:
    """``{(sample, variation): {region: {kind: array}}}`` from yields tensors."""
    return {(s, v): by_region for s, by_var in unflatten(flat, YIELDS).items() for v, by_region in by_var.items()}


def relax_inputs(relax: Mapping) -> dict[str, np.ndarray]:
    """The relaxation as the stage's inputs (``relax.<name>``, float64 scalars; every entry of ``relax``)."""
    return {join(RELAX, k): np.asarray(v, np.float64) for k, v in relax.items()}


def params_inputs(params: Mapping) -> dict[str, np.ndarray]:
    """Analysis parameters (cuts, edges, nested network weights) as flat float64 tensors."""
    return {k: np.asarray(v, np.float64) for k, v in flatten(dict(params)).items()}


def _host_sum(a, b):
    """Sum of two host (numpy) trees; ``a`` may be None."""
    return b if a is None else jax.tree.map(np.add, a, b)


class SoftYieldsStage(Stage):
    """The soft yields of the batches held, for every key in ``keys`` (see the module docstring).

    ``params_like`` fixes the parameters' names and shapes (values are not used);
    ``batches`` maps (sample, file variation) to its fixed-shape :class:`EventBatch` calls. A
    :class:`~jacana.stages.keyed.KeyedBatch` (several keys' events in one call, on accelerators) is
    listed under any one of its keys and answers for all of them.
    """

    #: takes KeyedBatch calls (:func:`jacana.facility.executor.merges_keys`)
    accepts_keyed_batches = True

    def __init__(self, config: SoftConfig, keys: Sequence[Key], params_like: Mapping,
                 batches: Mapping[Key, Sequence] | None = None, stage_id: str = STAGE_ID,
                 apply_program: str = "auto") -> None:
        if apply_program not in APPLY_PROGRAMS:
            raise ValueError(f"apply_program must be one of {APPLY_PROGRAMS}, got {apply_program!r}")
        self.apply_program = apply_program
        self.config = config
        self.keys = tuple(tuple(k) for k in keys)
        self.batches = {tuple(k): list(v) for k, v in (batches or {}).items() if v}
        # every call once, with the keys its results belong to
        self._calls = [(call_keys(c, key), c) for key, calls in self.batches.items() for c in calls]
        unknown = {k for ks, _ in self._calls for k in ks} - set(self.keys)
        if unknown:
            raise ValueError(f"batches for {sorted(unknown)}, which are not among the stage's keys")
        self.stage_id = stage_id
        params = tuple(TensorSpec.of(n, np.asarray(v, np.float64), differentiable=True)
                       for n, v in params_inputs(params_like).items())
        inputs = tuple(TensorSpec(join(RELAX, k), (), "float64") for k in config.relax_names)
        self._spec = StageSpec(stage_id, params, inputs, yields_specs(config, self.keys))
        self.mode = gradient_mode(sum(t.size for t in params))

    def describe(self, inputs=None) -> StageSpec:
        return self._spec

    # -- helpers ---------------------------------------------------------------------------
    def _tree(self, params: Arrays, inputs: Arrays) -> tuple[dict, dict]:
        tree = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), unflatten(dict(params)))
        relax = {k: jnp.asarray(inputs[join(RELAX, k)], jnp.float64) for k in self.config.relax_names}
        return tree, relax

    def _zeros(self, key: Key, extra: tuple[int, ...] = ()) -> dict:
        n_var = len(self.config.variations(key[1] == NOMINAL))
        return {r.name: {k: np.zeros((n_var, len(r.edges) - 1) + extra) for k in KINDS} for r in self.config.regions}

    def _flat_outputs(self, per_key: Mapping[Key, Mapping]) -> dict[str, np.ndarray]:
        return {yields_name(key, region, kind): np.asarray(v, np.float64)
                for key, by_region in per_key.items() for region, by_kind in by_region.items()
                for kind, v in by_kind.items()}

    def _per_key(self, run) -> dict:
        """``run(call)`` of every call, dispatched before any result is read back (JAX runs them
        asynchronously), fetched to the host together and summed per key in call order."""
        results = jax.device_get([run(c) for _, c in self._calls])
        per_key: dict = {}
        for (keys, call), res in zip(self._calls, results):
            for key, part in zip(keys, split_by_key(call, res)):
                per_key[key] = _host_sum(per_key.get(key), part)
        return per_key

    # -- the contract ----------------------------------------------------------------------
    def apply(self, params: Arrays, inputs: Arrays) -> dict[str, np.ndarray]:
        if self.mode == "jacobian" and self.apply_program == "auto":  # one program per call shape serves both
            return self.jacobian(params, inputs, ())[0]
        tree, relax = self._tree(params, inputs)
        per_key = self._per_key(lambda c: soft_yields(tree, relax, c, self.config))
        return self._flat_outputs({key: per_key.get(key) or self._zeros(key) for key in self.keys})

    def jacobian(self, params: Arrays, inputs: Arrays, wrt: Sequence[str] | None = None):
        wrt = self._spec.check_wrt(wrt)
        tree, relax = self._tree(params, inputs)
        results = self._per_key(lambda c: yields_and_jacobian_call(tree, relax, c, self.config))
        sizes = [int(np.size(params[a])) for a in wrt]
        outs, jac = {}, {}
        for key in self.keys:
            if key not in results:
                for name, zero in self._flat_outputs({key: self._zeros(key)}).items():
                    outs[name], jac[name] = zero, np.zeros(zero.shape + (sum(sizes),))
                continue
            ylds, jtree = results[key]
            for region, by_kind in ylds.items():
                for kind, y in by_kind.items():
                    name = yields_name(key, region, kind)
                    y = np.asarray(y, np.float64)
                    cols = flatten(jtree[region][kind])
                    outs[name] = y
                    jac[name] = np.concatenate([np.asarray(cols[a], np.float64).reshape(y.shape + (n,))
                                                for a, n in zip(wrt, sizes)] or [np.zeros(y.shape + (0,))], axis=-1)
        return outs, jac

    def vjp(self, params: Arrays, inputs: Arrays, cotangents: Arrays, wrt: Sequence[str] | None = None):
        wrt = self._spec.check_wrt(wrt)
        tree, relax = self._tree(params, inputs)

        def cotangent(key):
            return {r.name: {k: jnp.asarray(cotangents[yields_name(key, r.name, k)], jnp.float64)
                             if yields_name(key, r.name, k) in cotangents else jnp.zeros_like(z)
                             for k, z in by_kind.items()} for r, by_kind in zip(self.config.regions,
                                                                                 self._zeros(key).values())}

        def run(keys, call):
            ct = jax.tree.map(lambda *a: jnp.stack(a), *[cotangent(k) for k in keys]) \
                if isinstance(call, KeyedBatch) else cotangent(keys[0])  # a KeyedBatch's: the key axis first
            return yields_vjp_call(tree, relax, call, self.config, ct)[1]

        grads = jax.device_get([run(keys, c) for keys, c in self._calls])
        # summed per key first, then over keys in the stage's order; a merged call counts as its own term
        by_owner: dict = {}
        for (keys, call), g in zip(self._calls, grads):
            owner = keys if isinstance(call, KeyedBatch) else keys[0]
            by_owner[owner] = _host_sum(by_owner.get(owner), g)
        grad = None
        for owner in [k for k in self.keys if k in by_owner] + [o for o in by_owner if o not in self.keys]:
            grad = _host_sum(grad, by_owner[owner])
        flat = flatten(grad) if grad is not None else {}
        return {a: (np.asarray(flat[a], np.float64).reshape(np.shape(params[a])) if a in flat
                    else np.zeros(np.shape(params[a]))) for a in wrt}


# -- the per-(sample, variation) view of the flat tensors, for callers that want trees ---------
def yields_by_key(flat: Mapping) -> dict:
    """``{"sample/variation": {region: {kind: array}}}`` (:func:`~jacana.stages.stats.sensitivity.yields_key`)."""
    from jacana.stages.stats.sensitivity import yields_key

    return {yields_key(*k): v for k, v in yields_tree(flat).items()}


def jacobian_by_key(jac: Mapping, params: Mapping, wrt: Sequence[str]) -> dict:
    """Packed Jacobians (``out.shape + (N,)`` over ``wrt``) as ``{key: {region: {kind: {param: array}}}}``
    with each block shaped ``[variations, bins, *param_shape]`` and network weights nested under ``nn``."""
    cols, at = [], 0
    for a in wrt:
        n = int(np.size(params[a]))
        cols.append((a, np.shape(params[a]), slice(at, at + n)))
        at += n
    split = {name: unflatten({a: np.asarray(j)[..., sl].reshape(np.shape(j)[:-1] + shape) for a, shape, sl in cols})
             for name, j in jac.items()}
    return yields_by_key(split)


def cotangents_from(by_key: Mapping) -> dict[str, np.ndarray]:
    """Cotangents given per ``"sample/variation"`` key (yields-shaped trees) as yields tensors."""
    from jacana.stages.stats.sensitivity import KEY_SEP

    return {yields_name(tuple(key.split(KEY_SEP, 1)), region, kind): np.asarray(v, np.float64)
            for key, by_region in by_key.items() for region, by_kind in by_region.items()
            for kind, v in by_kind.items()}
