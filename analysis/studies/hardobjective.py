"""The hard analysis as an objective: expected sigma_mu at a parameter point, columns read once.

:class:`HardObjective` is what the scan (:mod:`jacana.analysis.studies.scan`) and the gradient-free
baselines (:mod:`jacana.analysis.studies.baselines`) evaluate: the conventional hard-cut analysis
(:func:`jacana.facility.hardrun.hard_histograms`), the pyhf workspace, and pyhf's own numpy
inference for the expected (Asimov) uncertainty on the POI, exactly as
:func:`jacana.analysis.evaluate.hard_evaluation` computes ``result["expected"]["sigma_mu"]``
(the fit to the pseudo-data, which the figure of merit does not need, is skipped).

Every evaluation is one *full pass* over the events (the budget unit shared with the gradient
optimiser); the columns stay in a :class:`~jacana.facility.hardrun.ColumnStore`, so only the
first pass reads files. A point evaluated before is answered from memory without a pass.
"""

from __future__ import annotations

import difflib
import json
import math
import time
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from jacana.facility.hardrun import DEFAULT_CHUNK_SIZE, ColumnStore, InputReport, analysis_chunks, hard_histograms
from jacana.stages.errors import ConfigError, JacanaError
from jacana.stages.fileset import Fileset
from jacana.stages.spec import AnalysisSpec


def expected_sigma_mu(workspace: Mapping) -> float:
    """pyhf's expected (Asimov, POI = 1) uncertainty on the POI: the ``expected.sigma_mu`` of
    :func:`jacana.stages.stats.inference.evaluate_workspace`, computed the same way, without the observed fit."""
    from jacana.stages.stats.inference import asimov_point, asimov_uncertainties, model_and_data, numpy_backend

    with numpy_backend():
        model, _ = model_and_data(workspace)
        return float(asimov_uncertainties(model, asimov_point(model, 1.0))[model.config.poi_index])


def _sigma_or_error(spec: AnalysisSpec, hists: Mapping) -> tuple[float | None, str | None]:
    """(expected sigma_mu of the hard histograms, None), or (None, why pyhf could not give a finite one)."""
    from jacana.stages.stats.workspace import build_workspace

    try:
        sigma = expected_sigma_mu(build_workspace(spec, hists))
    except (JacanaError, ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if math.isfinite(sigma) and sigma > 0:
        return sigma, None
    return None, f"pyhf gave sigma_mu = {sigma}"


def replica_histograms(hists: Mapping, r: int) -> dict:
    """Replica ``r`` of :func:`~jacana.facility.hardrun.hard_histograms` made with replicas (rows of ``sumw``)."""
    return {region: {sample: {var: {"edges": h["edges"], "sumw": h["sumw"][r], "sumw2": h["sumw2"][r]}
                              for var, h in by_var.items()}
                     for sample, by_var in by_sample.items()}
            for region, by_sample in hists.items()}


def check_bootstrap(replicas: int) -> None:
    """A usable number of bootstrap replicas (0: none), else a :class:`ConfigError`."""
    from jacana.stages.columns import check_bootstrap as check

    try:
        check(replicas)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_names(spec: AnalysisSpec, names: Sequence[str]) -> None:
    """Every name is a tunable parameter of ``spec`` (an error names the closest one otherwise)."""
    for name in names:
        if name not in spec.parameters:
            close = difflib.get_close_matches(name, list(spec.parameters), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown parameter {name!r}{hint}; tunable parameters: {', '.join(spec.parameters)}")


def check_point(spec: AnalysisSpec, values: Mapping[str, float]) -> dict[str, float]:
    """The full parameter point (``spec``'s values, updated by ``values``), every value inside its bounds."""
    check_names(spec, list(values))
    point = spec.param_values()
    for name, value in values.items():
        p = spec.parameters[name]
        value = float(value)
        if not math.isfinite(value) or not p.lower <= value <= p.upper:
            raise ConfigError(f"parameter {name!r} = {value:g} is outside its bounds [{p.lower:g}, {p.upper:g}]")
        point[name] = value
    return point


def _key(point: Mapping[str, float], extra: Mapping | None = None, overrides: Sequence[str] | None = None) -> tuple:
    key = tuple(sorted((k, round(float(v), 12)) for k, v in point.items()))
    if extra or overrides:
        from jacana.facility.atomic import jsonable

        key += (json.dumps(jsonable(dict(extra or {})), sort_keys=True), tuple(overrides or ()))
    return key


def split_params(spec: AnalysisSpec, values: Mapping) -> tuple[dict[str, float], dict]:
    """(named scalar cuts, everything else ``spec.with_params`` takes: ``edges_<region>``, ``nn``)."""
    scalars = {k: float(v) for k, v in values.items() if k in spec.parameters}
    return scalars, {k: v for k, v in values.items() if k not in spec.parameters}


class HardObjective:
    """Hard-analysis expected sigma_mu on one fileset, as a function of the tunable parameters.

    >>> obj = HardObjective(spec, fileset)                  # doctest: +SKIP
    >>> obj({"jet_pt_min": 35.0}), obj.passes               # doctest: +SKIP
    (0.0931..., 1)
    """

    def __init__(self, spec: AnalysisSpec, fileset: Fileset, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 on_bad_file: str = "fail", store: ColumnStore | None = None, bootstrap: int = 0,
                 bootstrap_seed: int = 0):
        check_bootstrap(bootstrap)
        self.spec = spec
        self.bootstrap = int(bootstrap)
        self.bootstrap_seed = int(bootstrap_seed)
        self._multipliers: dict[tuple, np.ndarray] = {}
        self.fileset = fileset
        self.chunk_size = chunk_size
        self.chunks = analysis_chunks(spec, fileset, chunk_size)
        self.n_events = sum(c.n_events for c in self.chunks)
        self.store = store if store is not None and store.compatible(spec) else ColumnStore(spec)
        self.report = InputReport(on_bad_file)
        self.passes = 0
        self.seconds = 0.0
        self._cache: dict[tuple, dict] = {}

    def evaluate(self, values: Mapping[str, float], extra: Mapping | None = None,
                 overrides: Sequence[str] | None = None) -> dict:
        """``{"params", "sigma_mu", "seconds", "pass"}`` at ``values`` (``sigma_mu`` None and ``error`` set
        where pyhf cannot compute it, e.g. a cut that empties a region).

        With ``bootstrap`` replicas, also ``sigma_mu_replicas``: sigma_mu of each Poisson-bootstrap
        replica of the events (the same replicas at every point; None where one fails), in the same pass.

        ``extra``: other settings :meth:`AnalysisSpec.with_params` takes (bin edges ``edges_<region>``,
        network weights ``nn``) and ``overrides``: config overrides applied first (e.g. a region's
        observable set to the network), both e.g. those of a gradient optimum.
        """
        point = check_point(self.spec, values)
        key = _key(point, extra, overrides)
        if key in self._cache:
            return dict(self._cache[key], cached=True)
        t0 = time.perf_counter()
        spec = self.spec.with_overrides(list(overrides)) if overrides else self.spec
        spec = spec.with_params({**point, **(extra or {})})
        hists = hard_histograms(spec, self.chunks, store=self.store, report=self.report,
                                replicas=self._replicas if self.bootstrap else None)
        self.passes += 1
        entry = {"params": point, "sigma_mu": None, "pass": self.passes}
        if self.bootstrap:
            sigmas = [_sigma_or_error(spec, replica_histograms(hists, r))[0] for r in range(1, self.bootstrap + 1)]
            entry["sigma_mu_replicas"] = sigmas
            hists = replica_histograms(hists, 0)  # row 0: exactly the histograms without replicas
        entry["sigma_mu"], error = _sigma_or_error(spec, hists)
        if error:
            entry["error"] = error
        entry["seconds"] = time.perf_counter() - t0
        self.seconds += entry["seconds"]
        self._cache[key] = entry
        return dict(entry)

    def _replicas(self, chunk) -> np.ndarray:
        """The bootstrap multipliers of ``chunk``'s events, drawn once and kept (uint8: 1 byte per event and
        replica, for the whole fileset)."""
        from jacana.stages.columns import bootstrap_multipliers

        key = chunk.store_key
        if key not in self._multipliers:
            # the sample and variation go into the seed: files of two samples may share a name
            seed = self.bootstrap_seed ^ zlib.crc32(f"{chunk.sample}/{chunk.variation}".encode())
            self._multipliers[key] = bootstrap_multipliers(chunk.path, chunk.entry_start, chunk.n_events,
                                                           self.bootstrap, seed)
        return self._multipliers[key]

    def __call__(self, values: Mapping[str, float]) -> float:
        """sigma_mu at ``values``; ``inf`` where it cannot be computed (an optimiser moves away)."""
        sigma = self.evaluate(values)["sigma_mu"]
        return math.inf if sigma is None else sigma

    def seed(self, entries: Sequence[Mapping]) -> int:
        """Reuse earlier evaluations (e.g. a partial ``scan.json``): they cost no pass. Returns how many.

        The caller checks that they were made on the same events with the same config (and, for
        their replicas, the same bootstrap seed); entries without this objective's replicas are skipped."""
        n = 0
        for e in entries:
            if "params" in e and "sigma_mu" in e:
                replicas = e.get("sigma_mu_replicas")
                if self.bootstrap and (e.get("sigma_mu") is not None
                                       and (replicas is None or len(replicas) != self.bootstrap)):
                    continue  # made without (these) replicas
                keep = ("params", "sigma_mu", "seconds", "error", "pass")
                keep += ("sigma_mu_replicas",) if self.bootstrap else ()
                self._cache[_key(e["params"])] = {k: e[k] for k in keep if k in e}
                n += 1
        return n
