"""The analysis' figure of merit as a differentiable function of the soft yields.

Composes the pieces in one pure function: per-(sample, file variation) soft yields ->
histograms in jacana's layout -> the AGC HistFactory model (cabinetry conventions,
:mod:`.workspace`) -> pyhf likelihood on traced yields (:mod:`.likelihood`) -> an
expected-sensitivity objective on Asimov data (:mod:`.objectives`).

Example (needs template yields)::

    objective = Sensitivity(spec, config, template_yields, "sigma_mu")
    value, cotangent = jax.value_and_grad(objective)(yields)   # d(objective)/d(yields)
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jacana.stages.analysis import SoftConfig
from jacana.stages.errors import ConfigError
from jacana.stages.stats.likelihood import TracedModel
from jacana.stages.stats.objectives import OBJECTIVES, SENSE
from jacana.stages.stats.objectives import loss as objective_loss
from jacana.stages.spec import NOMINAL, AnalysisSpec
from jacana.stages.stats.workspace import build_channels, build_workspace, channels_to_yields, pruning_decisions

KEY_SEP = "/"


def yields_key(sample: str, file_variation: str) -> str:
    """Pytree key of the soft yields of one (sample, file variation)."""
    return f"{sample}{KEY_SEP}{file_variation}"


def histograms(yields: Mapping, config: SoftConfig, xp=jnp) -> dict:
    """``{region: {sample: {variation: {"sumw", "sumw2"}}}}`` from per-(sample, file variation) yields.

    ``yields[yields_key(sample, file_variation)] = {region: {"sumw": [V, bins], "sumw2": [V, bins]}}``
    as :func:`jacana.stages.analysis.chunk_yields` returns them (summed over chunks).
    """
    out: dict = {r.name: {} for r in config.regions}
    for key, by_region in yields.items():
        sample, file_var = key.split(KEY_SEP, 1)
        names = config.variations(True) if file_var == NOMINAL else (file_var,)
        for region, h in by_region.items():
            slot = out[region].setdefault(sample, {})
            for i, name in enumerate(names):
                slot[name] = {"sumw": h["sumw"][i], "sumw2": h["sumw2"][i]}
    return out


class Sensitivity:
    """``objective(yields) -> scalar`` to minimise (see :data:`jacana.stages.stats.objectives.SENSE`).

    The pyhf model is built once from ``template`` yields (its structure: which bins carry
    staterror); later yields only change numbers. Pure and jit-able in ``yields``.
    """

    def __init__(self, spec: AnalysisSpec, config: SoftConfig, template: Mapping, objective: str = "sigma_mu",
                 **objective_options):
        if objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {objective!r}; choose from {sorted(OBJECTIVES)}")
        self.spec, self.config, self.name = spec, config, objective
        hists = histograms(jax.tree.map(np.asarray, dict(template)), config, xp=np)
        # the template hygiene's pruning is decided once, here: fixed structure, differentiable objective
        self.pruned = pruning_decisions(spec, hists)
        self.model = TracedModel.from_workspace(build_workspace(spec, hists, pruned=self.pruned))
        self._loss = objective_loss(objective, **objective_options)
        self.sense = SENSE[objective]

    def model_yields(self, yields: Mapping) -> dict:
        """The likelihood's yields pytree for these soft yields."""
        return channels_to_yields(build_channels(self.spec, histograms(yields, self.config), xp=jnp,
                                                 pruned=self.pruned))

    def __call__(self, yields: Mapping):
        return self._loss(self.model, self.model_yields(yields))

    def physical(self, loss_value) -> float:
        """The objective's physical value (e.g. Z0 > 0) from the minimised loss."""
        return float(self.sense * loss_value)
