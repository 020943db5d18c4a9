"""What ``jacana optimize`` returns, and what the studies judge: typed records of ``result.json``.

:class:`OptimizationResult` is one optimisation run: :func:`jacana.analysis.optimize.run_optimize`
returns it and writes :meth:`OptimizationResult.to_json` as ``result.json``;
:meth:`OptimizationResult.load` reads a ``result.json`` back (with the ``params.json`` beside it:
the complete optimum, network weights included). :meth:`OptimizationResult.from_json` is the one
place that knows the older layouts of ``result.json`` (no ``passes``, no ``free_params``, no
``selected``, ...), so the CLI, ``jacana scan``, ``jacana baselines`` and ``--starts`` read
attributes, not ``.get`` chains.

:class:`GradientOptimum` is what ``jacana scan`` and ``jacana baselines`` judge: a run's optimum
split into the named cuts and the rest (bin edges, network weights), with the config overrides it
needs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from jacana.stages.errors import ConfigError

RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"
#: passes a result made before the count was recorded spent outside its steps and checks: the
#: template, then the relaxed and the hard objective at the end
_UNCOUNTED_EXTRA = 1 + 2


def pass_count(total: int, history, per_step: int) -> dict:
    """The ``total`` full passes over the training events a run made, by kind (``jacana baselines``
    counts these); ``per_step``: passes per step (:attr:`OptimizeSettings.passes_per_step`)."""
    hard = sum(1 for h in history if h.get("hard_objective") is not None)
    return {"train": int(total), "steps": len(history), "passes_per_step": per_step, "hard_evaluations": hard,
            "other": int(total) - per_step * len(history) - hard}


def recorded_passes(raw: Mapping) -> dict:
    """The passes a ``result.json`` (as a dict) records, or for a result made before they were
    counted, the passes it made reconstructed from its history and settings."""
    if isinstance(raw.get("passes"), Mapping) and "train" in raw["passes"]:
        return dict(raw["passes"])
    history = raw.get("history") or []
    settings = raw.get("settings") or {}
    # Jacobian mode (the cuts): yields and Jacobian in one pass; VJP mode (bin edges, NN): yields, then the VJP
    per_step = 2 if settings.get("binning") or settings.get("nn") else 1
    hard = sum(1 for h in history if h.get("hard_objective") is not None)
    return pass_count(per_step * len(history) + hard + _UNCOUNTED_EXTRA, history, per_step)


def read_json(path: str | Path, what: str) -> Any:
    """The JSON in ``path``, or a :class:`ConfigError` naming ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None


def _sigma_mu(validation: Mapping | None) -> float | None:
    return ((validation or {}).get("expected") or {}).get("sigma_mu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizationResult:
    """One ``jacana optimize`` run: every entry of its ``result.json``, by name.

    Parameters are in their JSON form: named cuts as floats, bin edges ``edges_<region>`` as
    lists, network weights ``nn`` as ``{name: nested lists}``. Entries a result made by an older
    jacana lacks are None (``history``: empty); ``passes`` is always there (reconstructed for
    older results, see :func:`recorded_passes`). ``before`` and ``after`` are the conventional
    hard analysis on the held-out events (``validation`` in ``result.json``, pyhf's expected
    uncertainty in ``["expected"]["sigma_mu"]``).
    """

    final_params: dict[str, Any]
    objective: str | None = None
    initial_params: dict[str, Any] | None = None
    stopped: str | None = None
    free_params: list[str] | None = None
    selected: dict | None = None  # the kept point (keep-best); None with --last-point
    history: list[dict] = dataclasses.field(default_factory=list)
    final_objective: dict | None = None
    passes: dict = dataclasses.field(default_factory=dict)
    before: dict | None = None
    after: dict | None = None
    sigma_mu_ratio: float | None = None  # held-out sigma_mu after / before
    settings: dict | None = None  # OptimizeSettings.to_json()
    events: dict | None = None
    inputs: dict | None = None
    seconds: float | None = None
    plots: dict[str, str] | None = None
    # the soft objective's model structure: the template hygiene's pruning, decided once at the start
    soft_model: dict | None = None
    # not in result.json: params.json's (the complete optimum, with the network weights) and where it came from
    complete_params: dict[str, Any] | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)
    source: str | None = dataclasses.field(default=None, compare=False)

    # -- derived ----------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any]:
        """The optimum: ``final_params`` completed by ``params.json``'s (network weights) where known."""
        return {**self.final_params, **(self.complete_params or {})}

    @property
    def sigma_mu_before(self) -> float | None:
        """pyhf's expected sigma_mu on the held-out events at the start (None if not recorded)."""
        return _sigma_mu(self.before)

    @property
    def sigma_mu_after(self) -> float | None:
        """pyhf's expected sigma_mu on the held-out events at the optimum (None if not recorded)."""
        return _sigma_mu(self.after)

    @property
    def hard_limit(self) -> float | None:
        """The hard-limit objective at the end, on the training events (None if not recorded)."""
        return (self.final_objective or {}).get("hard_limit")

    @property
    def passes_per_step(self) -> int:
        return self.passes.get("passes_per_step", 1)

    @property
    def train_passes(self) -> int:
        """Full passes over the training events the run made (``jacana baselines``' budget axis)."""
        return self.passes["train"]

    # -- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """``result.json``'s content (entries that are None are left out)."""
        out: dict[str, Any] = {}
        for key, value in (("objective", self.objective), ("initial_params", self.initial_params),
                           ("final_params", self.final_params), ("stopped", self.stopped),
                           ("free_params", self.free_params), ("selected", self.selected),
                           ("history", self.history), ("final_objective", self.final_objective),
                           ("passes", self.passes)):
            if value is not None:
                out[key] = value
        if self.before is not None or self.after is not None:
            out["validation"] = {"before": self.before, "after": self.after,
                                 "sigma_mu_ratio_after_over_before": self.sigma_mu_ratio}
        for key, value in (("settings", self.settings), ("events", self.events), ("inputs", self.inputs),
                           ("seconds", self.seconds), ("soft_model", self.soft_model), ("plots", self.plots)):
            if value is not None:
                out[key] = value
        return out

    def params_json(self) -> dict:
        """``params.json``'s content: the complete optimum and the config overrides it needs."""
        return {"params": self.complete_params if self.complete_params is not None else dict(self.final_params),
                "overrides": list(self.overrides)}

    @classmethod
    def from_json(cls, raw: Any, source: str | Path | None = None, what: str = "optimisation result",
                  complete: Mapping | None = None) -> OptimizationResult:
        """A ``result.json`` (as a dict, of any jacana version) read from ``source``; ``complete``: the
        ``params.json`` beside it (as a dict). A :class:`ConfigError` names the file and the missing entry."""
        where = repr(str(source)) if source is not None else "(not from a file)"
        # final_params is required; a params.json given instead has its optimum under "params"
        params = (raw.get("final_params") or raw.get("params")) if isinstance(raw, Mapping) else None
        if not isinstance(params, Mapping):
            raise ConfigError(f"{what} {where} has no final_params (a jacana optimize result.json)")
        validation = raw.get("validation") or {}
        before, after = validation.get("before"), validation.get("after")
        ratio = validation.get("sigma_mu_ratio_after_over_before")
        if ratio is None and _sigma_mu(before) and _sigma_mu(after) is not None:  # recorded since the start
            ratio = _sigma_mu(after) / _sigma_mu(before)
        complete_params, overrides = None, []
        if isinstance(complete, Mapping) and isinstance(complete.get("params"), Mapping):
            complete_params = dict(complete["params"])
            overrides = [str(o) for o in complete.get("overrides", [])]
        return cls(final_params=dict(params), objective=raw.get("objective"), initial_params=raw.get("initial_params"),
                   stopped=raw.get("stopped"), free_params=raw.get("free_params"), selected=raw.get("selected"),
                   history=list(raw.get("history") or []), final_objective=raw.get("final_objective"),
                   passes=recorded_passes(raw), before=before, after=after, sigma_mu_ratio=ratio,
                   settings=raw.get("settings"), events=raw.get("events"), inputs=raw.get("inputs"),
                   seconds=raw.get("seconds"), soft_model=raw.get("soft_model"), plots=raw.get("plots"),
                   complete_params=complete_params,
                   overrides=overrides, source=None if source is None else str(source))

    @classmethod
    def load(cls, path: str | Path, what: str = "optimisation result") -> OptimizationResult:
        """A run's ``result.json`` (or the folder holding it), with the ``params.json`` beside it when
        there is one (the complete optimum: network weights, and the config overrides it needs)."""
        path = Path(path)
        if path.is_dir():
            path = path / RESULT_FILE
        raw = read_json(path, what)
        beside = path.parent / PARAMS_FILE
        complete = None
        if path.name != PARAMS_FILE and beside.is_file():
            complete = read_json(beside, "params file")
        return cls.from_json(raw, source=path, what=what, complete=complete)

    @classmethod
    def of(cls, result: OptimizationResult | Mapping, source: str | Path | None = None) -> OptimizationResult:
        """``result`` itself, or a ``result.json`` dict read into one (e.g. from a stand-in for run_optimize)."""
        return result if isinstance(result, cls) else cls.from_json(result, source=source)


@dataclasses.dataclass(frozen=True)
class GradientOptimum:
    """A gradient optimum to judge (``jacana scan`` / ``jacana baselines --gradient-result``).

    ``params``: the named cuts; ``extra``: what else it optimised (bin edges ``edges_<region>``,
    network weights ``nn``; from the ``params.json`` beside the result when there is one);
    ``overrides``: config overrides the optimum needs (e.g. a region's observable set to the
    network); ``path``: the file it was read from; ``result``: the whole run; ``label``: its name
    in tables and plots. Also readable by key, like the dict it replaces (``g["params"]``).
    """

    params: dict[str, float]
    extra: dict[str, Any]
    overrides: list[str]
    path: str
    result: OptimizationResult
    label: str | None = None

    @classmethod
    def of(cls, result: OptimizationResult, path: str | Path | None = None) -> GradientOptimum:
        p = result.params
        scalars = {k: float(v) for k, v in p.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        extra = {k: v for k, v in p.items() if k not in scalars}  # bin edges, network weights
        return cls(scalars, extra, list(result.overrides), str(path if path is not None else result.source), result)

    @classmethod
    def load(cls, path: str | Path) -> GradientOptimum:
        """The optimum of a ``jacana optimize`` run (its result.json, or the folder holding it)."""
        result = OptimizationResult.load(path, what="gradient result")
        return cls.of(result, result.source)

    def for_parameters(self, names: Collection[str]) -> GradientOptimum:
        """Only the named cuts in ``names`` (a config's parameters) as ``params``; the others move to ``extra``."""
        return dataclasses.replace(self, params={k: v for k, v in self.params.items() if k in names},
                                   extra={**self.extra, **{k: v for k, v in self.params.items() if k not in names}})

    def __getitem__(self, key: str) -> Any:
        if key in {f.name for f in dataclasses.fields(self)}:
            return getattr(self, key)
        raise KeyError(key)
