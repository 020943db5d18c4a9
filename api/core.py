"""The Python API: load an analysis and a fileset, evaluate it, optimise it.

The ``jacana evaluate`` and ``jacana optimize`` commands call :func:`evaluate` and :func:`optimize`
(one path); nothing here needs an output folder.

>>> import jacana
>>> analysis = jacana.load_analysis(jet_pt_min=30)
>>> analysis.param_values()["jet_pt_min"]
30.0
"""

from __future__ import annotations

import dataclasses
import warnings
import difflib
import tempfile
from pathlib import Path
from typing import Any, Mapping

from jacana.analysis.results import OptimizationResult as _RunResult
from jacana.stages.errors import ConfigError
from jacana.stages.fileset import Fileset
from jacana.stages.spec import AnalysisSpec


def load_analysis(config: str | Path | None = None, **overrides: Any) -> AnalysisSpec:
    """The analysis config at ``config`` (default: the embedded AGC ttbar config), validated, with
    ``overrides``: a parameter's value by its name (``jet_pt_min=30``) or any config entry by its
    dotted path (``**{"branches.jet_btag": "Jet_btagDeepFlavB"}``). An unknown name is an error
    that names it (and the closest known one).

    >>> load_analysis(jet_pt_min=30, btag_min=0.6).param_values()["btag_min"]
    0.6
    """
    from jacana.stages.spec import load_spec

    return load_spec(config, overrides=overrides or None)


def load_fileset(source: str | Path | Mapping | Fileset) -> Fileset:
    """A fileset from a JSON file, a mapping of the same shape, or a :class:`Fileset` (returned as is).

    The shapes :func:`jacana.stages.fileset.parse_fileset` reads (the AGC's ``nanoaod_inputs.json``:
    process -> variation -> ``{"files": [{"path", "nevts"}]}``, ...). Relative paths in a file are
    relative to its folder; in a mapping, to the current folder.

    >>> load_fileset({"ttbar": {"nominal": {"files": [{"path": "/data/tt.root", "nevts": 1000}]}}}).nevts_total(
    ...     "ttbar", "nominal")
    1000
    """
    from jacana.stages import fileset as fs

    if isinstance(source, Fileset):
        return source
    if isinstance(source, Mapping):
        return fs.parse_fileset(source, base=Path.cwd(), source="<dict>")
    if isinstance(source, (str, Path)):
        return fs.load_fileset(source)
    raise ConfigError(f"a fileset is a JSON file's path, a mapping or a Fileset, got {type(source).__name__}")


def _analysis(analysis: AnalysisSpec | str | Path | None) -> AnalysisSpec:
    return analysis if isinstance(analysis, AnalysisSpec) else load_analysis(analysis)


@dataclasses.dataclass(frozen=True, repr=False)
class EvaluationResult:
    """One hard evaluation of an analysis: its histograms, pyhf workspace and fit.

    ``histograms``: ``{region: hist.Hist}``, axes ``process`` and ``variation`` (categories; hist
    reserves ``sample``) and the region's observable (named, labelled), Weight storage (sumw and
    sumw2); ``workspace``: the ``pyhf.Workspace``; ``fit``: what ``result.json`` holds (the POI's fit
    with its diagnostics, ``expected`` sigma on Asimov data, the model checks, region compositions,
    the parameters, ``inputs``); ``evaluation``: the plain dicts (region -> sample -> variation ->
    edges, sumw, sumw2; the workspace's JSON; the result).
    """

    analysis: AnalysisSpec = dataclasses.field(repr=False)
    histograms: dict
    workspace: Any = dataclasses.field(repr=False)
    fit: dict = dataclasses.field(repr=False)
    fileset: str
    evaluation: Mapping = dataclasses.field(repr=False, compare=False)

    @classmethod
    def of(cls, analysis: AnalysisSpec, evaluation: Mapping, fileset: str) -> EvaluationResult:
        """From :func:`jacana.analysis.evaluate.hard_evaluation`'s ``{"histograms", "workspace", "result"}``."""
        import pyhf

        from jacana.analysis.evaluate import histograms_to_hist

        return cls(analysis=analysis, histograms=histograms_to_hist(evaluation["histograms"], analysis.observable_axes()),
                   workspace=pyhf.Workspace(evaluation["workspace"]), fit=dict(evaluation["result"]), fileset=fileset,
                   evaluation=evaluation)

    @property
    def sigma_mu(self) -> float:
        """The expected uncertainty on the POI (pyhf, Asimov data)."""
        return self.fit["expected"]["sigma_mu"]

    def __repr__(self) -> str:
        return (f"EvaluationResult({self.analysis.name} on {self.fileset}: regions {list(self.histograms)},"
                f" expected sigma_{self.analysis.poi['name']} {self.sigma_mu:.4g})")

    def summary(self) -> str:
        """The lines ``jacana evaluate`` prints: region compositions, the fit, the checks."""
        from jacana.analysis.evaluate import format_summary

        return format_summary(self.analysis, self.fit)

    def to_dict(self) -> dict:
        """The three files' contents: ``{"histograms", "workspace", "result"}`` as plain JSON types."""
        from jacana.facility.atomic import jsonable
        from jacana.stages.stats.workspace import histograms_to_json

        return {"histograms": histograms_to_json(self.evaluation["histograms"]),
                "workspace": jsonable(self.evaluation["workspace"]), "result": jsonable(self._result_json())}

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write what ``jacana evaluate`` writes into ``out_dir`` (histograms as JSON, UHI JSON and ROOT,
        the workspace, the result); returns ``{kind: path}``."""
        from jacana.analysis.evaluate import write_evaluation

        return write_evaluation(out_dir, self.evaluation, extra=self._extra(), spec=self.analysis)

    def plot(self, out_dir: str | Path = "plots", postfit: bool = True) -> dict[str, Path]:
        """Per region, the data/MC plots physicists read (stacked samples, the total-model uncertainty
        band, the pseudo-data, a ratio panel): pre-fit and, unless the fit fails or ``postfit`` is
        False, post-fit, as PNGs in ``out_dir``; returns ``{"<region>_prefit": path, ...}``."""
        from jacana.analysis.plots import data_mc

        made = data_mc(self.analysis, self.workspace, Path(out_dir), postfit=postfit)
        if made["postfit"]:
            warnings.warn(f"no post-fit plots: {made['postfit']}", stacklevel=2)
        elif made["minuit"]:
            warnings.warn(f"post-fit plots: MINUIT printed {made['minuit']}", stacklevel=2)
        return {k: Path(v) for k, v in made["paths"].items()}

    def _extra(self) -> dict:
        return {"fileset": self.fileset, "config": self.analysis.source}

    def _result_json(self) -> dict:
        return {**self.fit, **self._extra()}


def evaluate(analysis: AnalysisSpec | str | Path | None, fileset: str | Path | Mapping | Fileset, *,
             progress: bool = True, on_bad_file: str = "fail", significance: bool = False,
             available_samples: bool = False) -> EvaluationResult:
    """The analysis with hard cuts on ``fileset``, its pyhf workspace and fit (nothing written).

    ``analysis``: an :class:`AnalysisSpec` (:func:`load_analysis`) or a config path (None: the AGC
    config); ``fileset``: anything :func:`load_fileset` takes; ``on_bad_file="skip"`` skips unreadable
    files (recorded in ``fit["inputs"]``); ``significance`` adds the expected Z0;
    ``available_samples``: run with the samples and alternative-sample systematics the fileset has
    (what is left out: ``fit["left_out"]``; the CLI's ``--available-samples``).

    >>> ev = evaluate(load_analysis(), "samples/fileset.json", progress=False)
    >>> ev.histograms["4j2b"][{"process": "ttbar", "variation": "nominal"}].values()
    """
    from jacana.analysis.evaluate import hard_evaluation

    spec, files = _analysis(analysis), load_fileset(fileset)
    left_out: list[str] = []
    if available_samples:
        from jacana.facility.hardrun import restricted_to

        spec, left_out = restricted_to(spec, files)
    evaluation = hard_evaluation(spec, files, progress=progress, on_bad_file=on_bad_file, significance=significance)
    if left_out:
        evaluation = {**evaluation, "result": {**evaluation["result"], "left_out": left_out}}
    return EvaluationResult.of(spec, evaluation, files.source)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizationResult(_RunResult):
    """One optimisation (:class:`jacana.analysis.results.OptimizationResult`, what ``result.json``
    holds) with the analysis it started from: ``params`` (the optimum), ``history`` (every step),
    ``before`` / ``after`` (the hard analysis on the held-out events: ``["expected"]["sigma_mu"]``),
    ``optimized_analysis`` (the analysis at the optimum) and :meth:`plot`."""

    analysis: AnalysisSpec | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def of_run(cls, run: _RunResult, analysis: AnalysisSpec, **changes: Any) -> OptimizationResult:
        """``run`` with ``analysis`` attached (and the fields in ``changes`` replaced)."""
        fields = {f.name: getattr(run, f.name) for f in dataclasses.fields(_RunResult)}
        return cls(**{**fields, **changes}, analysis=analysis)

    @property
    def optimized_analysis(self) -> AnalysisSpec:
        """The analysis at the optimum (its config overrides, e.g. the network's region, then the parameters)."""
        return self._analysis().with_overrides(self.overrides).with_params(self.params)

    def plot(self, out_dir: str | Path = "plots") -> dict[str, Path]:
        """The objective against the step and every parameter's trajectory, as PNGs in ``out_dir``."""
        from jacana.analysis import plots

        out = Path(out_dir)
        return {"objective": plots.objective_history(self.history, self.objective, out / "objective.png"),
                "parameters": plots.parameter_trajectories(self.history, self._analysis(), out / "parameters.png")}

    def _analysis(self) -> AnalysisSpec:
        if self.analysis is None:
            raise ConfigError("this optimisation result has no analysis attached (jacana.optimize attaches it)")
        return self.analysis


def _settings(spec: AnalysisSpec, settings, options: Mapping[str, Any]):
    """``settings`` (default: the CLI's defaults) with ``options`` replaced; unknown or bad ones are an error."""
    from jacana.analysis.optimize import OptimizeSettings, free_params

    known = [f.name for f in dataclasses.fields(OptimizeSettings)]
    unknown = [k for k in options if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, known, n=1)
            hints.append(repr(k) + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"optimize: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(hints)};"
                          f" the options are {', '.join(known)}")
    options = dict(options)
    if options.get("free") is not None:
        options["free"] = free_params(spec, options["free"])  # canonical order; unknown cuts named here
    result = dataclasses.replace(settings or OptimizeSettings(), **options)
    result.validate()
    result.free_cuts(spec)
    result.analysis_spec(spec)  # e.g. nn_region must be a region: all before any data is read
    return result


def optimize(analysis: AnalysisSpec | str | Path | None, fileset: str | Path | Mapping | Fileset,
             validation: str | Path | Mapping | Fileset | None = None, *, settings=None,
             out: str | Path | None = None, resume: bool = False, progress: bool = True, plots: bool | None = None,
             impacts: bool = True, on_bad_file: str = "fail", client=None, workers: int | None = None,
             scheduler: str | None = None, profile: str | None = None, remote: Mapping[str, str] | None = None,
             token_file: str | None = None, coffea: str | None = None, available_samples: bool = False,
             **options: Any) -> OptimizationResult:
    """Optimise ``analysis`` end to end on ``fileset``, validating before and after with the hard analysis
    and pyhf on ``validation`` (None: every other file of ``fileset`` is held out).

    ``options`` set :class:`jacana.analysis.optimize.OptimizeSettings` (``steps``, ``objective``,
    ``free``, ``binning``, ``nn``, ...), on top of ``settings`` if given. ``out``: a folder for
    ``result.json``, ``params.json``, the workspace, histograms, checkpoint and (``plots``, default on
    with a folder) plots; None: nothing is kept (a temporary folder holds the checkpoint). ``client``,
    ``workers``, ``scheduler``, ``profile``: run on dask; ``coffea="iterative"|"futures"|"dask"``: every
    step through coffea's Runner (:func:`jacana.facility.factory.make_executor`); ``available_samples``:
    only the samples and alternative-sample systematics the filesets have (see :func:`evaluate`).

    >>> result = optimize(load_analysis(), "samples/fileset.json", steps=5, progress=False)
    >>> result.params["jet_pt_min"], result.sigma_mu_after / result.sigma_mu_before
    """
    from jacana.analysis.optimize import run_optimize

    spec = _analysis(analysis)
    run_settings = _settings(spec, settings, options)  # bad options fail before any data is read
    if out is None and (resume or plots):
        raise ConfigError(f"optimize: {'resume' if resume else 'plots'} needs an output folder (out=...);"
                          " without one, result.plot(folder) draws the objective and the parameters")
    train = load_fileset(fileset)
    held_out = load_fileset(validation) if validation is not None else None
    if held_out is None:
        train, held_out = train.split_alternate()
    if available_samples:  # only what both filesets have (as evaluate(available_samples=True))
        from jacana.facility.hardrun import restricted_to

        spec, _ = restricted_to(spec, train, held_out)
    run = dict(resume=resume, progress=progress, on_bad_file=on_bad_file, impacts=impacts, workers=workers,
               scheduler=scheduler, client=client, profile=profile, remote=remote, token_file=token_file, coffea=coffea)
    if out is not None:
        result = run_optimize(spec, train, held_out, out, run_settings, plots=True if plots is None else plots, **run)
        return OptimizationResult.of_run(result, spec)
    with tempfile.TemporaryDirectory(prefix="jacana-optimize-") as tmp:
        result = run_optimize(spec, train, held_out, tmp, run_settings, plots=False, **run)
    return OptimizationResult.of_run(result, spec, source=None)  # its folder is gone
