"""The statistics as a protocol :class:`~jacana.protocol.stage.Stage`: yields -> objective.

Inputs: the soft yields tensors of :mod:`jacana.stages.soft_stage` (differentiable). Output:
``objective``, the loss to minimise (the expected uncertainty on the POI, or minus the expected
significance, ...: :data:`jacana.stages.stats.objectives.SENSE` gives its sign). Inside: the
HistFactory workspace, the pyhf likelihood on traced yields and the objective
(:class:`~jacana.stages.stats.sensitivity.Sensitivity`), jitted once.

The model's structure (which bins carry a staterror) is fixed by the first yields the stage
sees, or by ``template``; later yields only change numbers.

Served on its own (``jacana serve-stage``), it is the remote end of ``jacana optimize
--remote-stage objective=HOST:PORT``::

    jacana serve-stage --stage jacana.stages.stats.stage:objective_stage \\
        --stage-arg objective=sigma_mu --token-file token.txt
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jacana.protocol.stage import Arrays, Stage, StageSpec, TensorSpec
from jacana.stages.analysis import soft_config
from jacana.stages.errors import ConfigError
from jacana.stages.soft_stage import yields_specs, yields_tree
from jacana.stages.spec import AnalysisSpec, load_spec
from jacana.stages.stats.objectives import OBJECTIVES, SENSE
from jacana.stages.stats.sensitivity import Sensitivity, yields_key

STAGE_ID = "jacana.objective"
OUTPUT = "objective"


def analysis_keys(spec: AnalysisSpec) -> tuple[tuple[str, str], ...]:
    """Every (sample, file variation) whose yields the analysis needs, in the config's order."""
    return tuple((s, v) for s in spec.samples for v in spec.file_variations(s))


class ObjectiveStage(Stage):
    """``objective = f(yields)`` of ``spec``'s statistical model (see the module docstring)."""

    def __init__(self, spec: AnalysisSpec, objective: str = "sigma_mu", template: Mapping | None = None,
                 stage_id: str = STAGE_ID, device: Any = None, **objective_options: Any) -> None:
        """``device``: the JAX device the likelihood runs on (None: JAX's default device). The yields
        reach the stage as host arrays, so a CPU device costs no transfer (see
        :func:`jacana.facility.devices.likelihood_device`)."""
        if objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {objective!r}; choose from {sorted(OBJECTIVES)}")
        self.spec, self.name, self.options, self.device = spec, objective, objective_options, device
        self.config = soft_config(spec)
        self.stage_id = stage_id
        inputs = yields_specs(self.config, analysis_keys(spec))
        self._spec = StageSpec(stage_id, (), inputs, (TensorSpec(OUTPUT, (), "float64"),))
        self._names = tuple(t.name for t in inputs)
        self.sensitivity: Sensitivity | None = None
        if template is not None:
            self._build(template)

    @property
    def sense(self) -> int:
        """+1 when the objective's physical value is the loss, -1 when it is minus the loss."""
        return SENSE[self.name]

    def describe(self, inputs=None) -> StageSpec:
        return self._spec

    def _build(self, flat: Mapping) -> None:
        template = {yields_key(*k): v for k, v in yields_tree({n: np.asarray(flat[n]) for n in self._names}).items()}
        self.sensitivity = Sensitivity(self.spec, self.config, template, self.name, **self.options)

        def loss(flat_yields):
            return self.sensitivity({yields_key(*k): v for k, v in yields_tree(flat_yields).items()})

        self._value = jax.jit(loss)
        self._value_and_grad = jax.jit(jax.value_and_grad(loss))

    def _yields(self, inputs: Arrays) -> dict:
        missing = [n for n in self._names if n not in inputs]
        if missing:
            raise ConfigError(f"objective stage: missing yields {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        flat = {n: np.asarray(inputs[n], np.float64) for n in self._names}
        if self.sensitivity is None:
            self._build(flat)
        # committed to the stage's device, the jitted likelihood runs there
        return flat if self.device is None else jax.device_put(flat, self.device)

    def apply(self, params: Arrays, inputs: Arrays) -> dict[str, np.ndarray]:
        flat = self._yields(inputs)  # first: the first yields seen build the model
        return {OUTPUT: np.asarray(self._value(flat), np.float64)}

    def jacobian(self, params: Arrays, inputs: Arrays, wrt: Sequence[str] | None = None):
        wrt = self._spec.check_wrt(wrt)
        flat = self._yields(inputs)
        value, grads = self._value_and_grad(flat)
        cols = [np.asarray(grads[a], np.float64).reshape(-1) for a in wrt]
        return ({OUTPUT: np.asarray(value, np.float64)},
                {OUTPUT: np.concatenate(cols) if cols else np.zeros(0)})

    def vjp(self, params: Arrays, inputs: Arrays, cotangents: Arrays, wrt: Sequence[str] | None = None):
        wrt = self._spec.check_wrt(wrt)
        flat = self._yields(inputs)
        _, grads = self._value_and_grad(flat)
        ct = float(np.asarray(cotangents.get(OUTPUT, 0.0)))
        return {a: ct * np.asarray(grads[a], np.float64) for a in wrt}


def objective_stage(config: str | None = None, objective: str = "sigma_mu", set: str = "") -> ObjectiveStage:
    """Factory for ``jacana serve-stage``: the objective stage of an analysis config (default:
    the shipped AGC config), with ``set`` a comma-separated list of ``key=value`` overrides."""
    overrides = [s.strip() for s in (set or "").split(",") if s.strip()]
    return ObjectiveStage(load_spec(config or None, overrides), objective)
