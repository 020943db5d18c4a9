"""``jacana evaluate``: the AGC ttbar analysis in hard mode, ending in pyhf's own fit.

Writes ``histograms.json`` (region -> sample -> variation -> edges, sumw, sumw2),
``workspace.json`` (a valid pyhf workspace) and ``result.json`` (fitted ttbar_norm with the fit's
diagnostics, the expected uncertainty and significance on Asimov data, the parameters, region
compositions, the +-5 sigma validity check of the workspace (``workspace_check``), the model's
warnings before any fit (``model_warnings``) and what the rate floor clipped (``template_floor``)).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from jacana.facility.atomic import write_json
from jacana.facility.hardrun import DEFAULT_CHUNK_SIZE, ColumnStore, InputReport, analysis_chunks, hard_histograms
from jacana.stages.errors import ConfigError
from jacana.stages.fileset import Fileset
from jacana.stages.stats.health import check_workspace, histogram_warnings, prefit_warnings
from jacana.stages.stats.inference import FitError, evaluate_workspace
from jacana.stages.spec import NOMINAL, AnalysisSpec
from jacana.stages.stats.workspace import build_workspace, floored_templates, histograms_to_json, template_hygiene


def load_params_file(path: str | Path) -> tuple[dict, list[str]]:
    """Parameters and config overrides from a ``params.json`` (as ``jacana optimize`` writes it).

    Parameters are cut values (numbers), bin edges ``edges_<region>`` (lists) and the trained
    network ``nn`` (a dict of weight lists); overrides (e.g. a region's observable set to the
    network) apply to the config before the parameters. Everything is checked here, before any
    data is read: finite numbers, increasing edges, the network's six weight arrays and their
    shapes, and overrides limited to what an optimisation changes (``regions.<r>.observable``,
    ``regions.<r>.edges``, ``parameters.*``, ``nn.*``, a parameter's value), never the input
    layout (``tree``, ``branches``, samples). Every error names the file and the key.
    """
    from jacana.stages.observables.nn import FEATURES, WEIGHT_NAMES
    from jacana.stages.errors import shorten
    from jacana.stages.spec import config_schema, parse_override

    path = Path(path)
    name = f"params file {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{name} does not exist")
    if path.stat().st_size > 64 * 2**20:  # a params.json with a trained network is a few hundred KB
        raise ConfigError(f"{name} has {path.stat().st_size:,} bytes; at most 64 MiB are read")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{name} is nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    values = raw.get("params", raw) if isinstance(raw, dict) else None
    overrides = raw.get("overrides", []) if isinstance(raw, dict) and "params" in raw else []
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{name} must map parameter names to values (or hold them under 'params'),"
                          f" got {shorten(repr(values), 80)}")

    def number(key, v) -> float:
        # bool is an int in Python; json reads NaN and Infinity
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ConfigError(f"{name}: {key} must be a finite number, got {shorten(repr(v), 80)}")
        return float(v)

    def edges(key, v) -> list[float]:
        if not isinstance(v, list) or len(v) < 2:
            raise ConfigError(f"{name}: {key} must be a list of at least 2 bin edges, got {shorten(repr(v), 80)}")
        out = [number(f"{key}[{i}]", e) for i, e in enumerate(v)]
        bad = [i for i in range(1, len(out)) if not out[i] > out[i - 1]]
        if bad:
            raise ConfigError(f"{name}: {key} must be strictly increasing; edge {bad[0]} ({out[bad[0]]}) is not"
                              f" above edge {bad[0] - 1} ({out[bad[0] - 1]})")
        return out

    def network(v) -> dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{name}: nn must be a dict of weight arrays {list(WEIGHT_NAMES)}, got {shorten(repr(v), 80)}")
        missing = [k for k in WEIGHT_NAMES if k not in v]
        if missing:
            raise ConfigError(f"{name}: nn lacks the weight array(s) {missing} (it needs {list(WEIGHT_NAMES)})")
        arrays = {}
        for k in WEIGHT_NAMES:
            try:
                arrays[k] = np.asarray(v[k], dtype=np.float64)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: nn.{k} must be a (nested) list of numbers of one shape") from None
            if not np.all(np.isfinite(arrays[k])):
                raise ConfigError(f"{name}: nn.{k} has {int(np.sum(~np.isfinite(arrays[k])))} non-finite value(s)")
        h1 = arrays["w1"].shape[1] if arrays["w1"].ndim == 2 else 0
        h2 = arrays["w2"].shape[1] if arrays["w2"].ndim == 2 else 0
        want = {"w1": (len(FEATURES), h1), "b1": (h1,), "w2": (h1, h2), "b2": (h2,), "w3": (h2,), "b3": ()}
        wrong = [f"nn.{k} has shape {list(arrays[k].shape)}, expected {list(s)}" for k, s in want.items()
                 if arrays[k].shape != s]
        if wrong or not h1 or not h2:
            raise ConfigError(f"{name}: " + ("; ".join(wrong) or "nn.w1 and nn.w2 need at least one column")
                              + f" ({len(FEATURES)} features)")
        return dict(v)

    params: dict = {}
    for k, v in values.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(f"{name}: parameter names must be non-empty strings, got {k!r}")
        params[k] = network(v) if k == "nn" else edges(k, v) if k.startswith("edges_") else number(k, v)
    if not isinstance(overrides, list):
        raise ConfigError(f"{name}: overrides must be a list of 'key=value' strings, got {shorten(repr(overrides), 80)}")
    layout = set(config_schema()["properties"]) | set(config_schema(general=True)["properties"])
    for i, o in enumerate(overrides):
        if not isinstance(o, str):
            raise ConfigError(f"{name}: overrides[{i}] must be a 'key=value' string, got {shorten(repr(o), 80)}")
        key, _ = parse_override(o)  # syntax and YAML limits of the value
        parts = key.split(".")
        allowed = (parts[0] in ("parameters", "nn") and len(parts) > 1
                   or parts[0] == "regions" and len(parts) == 3 and parts[2] in ("observable", "edges")
                   or len(parts) == 1 and key not in layout)
        if not allowed:
            raise ConfigError(f"{name}: overrides[{i}] {shorten(o, 80)!r} would change {key!r}; a params file may set"
                              " only parameters, regions.<r>.observable, regions.<r>.edges and nn (the input"
                              " layout, samples and systematics come from the config: use --set for them)")
    return params, list(overrides)


def compositions(spec: AnalysisSpec, hists: Mapping) -> dict[str, dict[str, float]]:
    """Nominal expected yield per region and sample."""
    return {r: {s: float(np.sum(hists[r][s][NOMINAL]["sumw"])) for s in spec.samples} for r in spec.regions}


def check_model(spec: AnalysisSpec, hists: Mapping, workspace: Mapping) -> dict:
    """The checks before any fit: ``{"workspace_check", "model_warnings", "template_floor", "template_hygiene"}``.

    ``workspace_check`` is :func:`~jacana.stages.stats.health.check_workspace` of ``workspace``
    (the +-5 sigma grid; its warning lines are moved into ``model_warnings``), ``model_warnings``
    the lines naming empty or negative-yield regions and samples, negative bins, parameters
    without effect, bins of low MC statistics and grid problems, and ``template_floor`` what
    the rate floor clipped (:func:`~jacana.stages.stats.workspace.floored_templates`), ``template_hygiene``
    what was pruned, symmetrised and smoothed (:func:`~jacana.stages.stats.workspace.template_hygiene`). Raises
    :class:`~jacana.stages.stats.inference.FitError` naming them when an unconstrained parameter
    (the POI) has no effect: no fit could determine it.
    """
    hist_warnings = histogram_warnings(spec, hists)
    check = check_workspace(workspace)
    warnings = prefit_warnings(hist_warnings, check)
    if check["undetermined"]:
        idle = ", ".join(check["undetermined"])
        raise FitError(f"the model cannot be fitted: {idle} {'have' if len(check['undetermined']) > 1 else 'has'} "
                       f"no effect on any expected rate (its Fisher information is zero)"
                       + _context(hist_warnings, check, exclude=check["undetermined"]))
    check = {k: v for k, v in check.items() if k != "warnings"}
    floored = floored_templates(spec, hists)
    if floored:
        where: dict[str, list[str]] = {}
        for f in floored:
            label = f"{f['sample']} in {f['region']}"
            if label not in where.setdefault(f["modifier"], []):
                where[f["modifier"]].append(label)
        warnings.append(f"the rate floor clipped {len(floored)} templates (result.json: template_floor) of "
                        + ", ".join(f"{m} ({', '.join(w)})" if len(w) <= 2 else f"{m} ({len(w)} samples and regions)"
                                    for m, w in where.items()))
    # what pruning, symmetrisation and smoothing did (stages/stats/workspace.py), beside the floor
    return {"workspace_check": check, "model_warnings": warnings, "template_floor": floored,
            "template_hygiene": template_hygiene(spec, hists)}


def _context(hist_warnings: list[dict], check: Mapping, exclude=()) -> str:
    """The empty or negative regions and samples and the parameters without effect, for an error message."""
    lines = [w["message"] for w in hist_warnings if w["kind"] != "negative_bins"]
    idle = [name for name in check["no_effect"] if name not in exclude]
    if idle:
        lines.append(f"without effect on any expected rate: {', '.join(idle)}")
    return f"; {'; '.join(lines)}" if lines else ""


def hard_evaluation(spec: AnalysisSpec, fileset: Fileset, store: ColumnStore | None = None,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = False, significance: bool = False,
                    on_bad_file: str = "fail") -> dict:
    """Histograms, workspace and pyhf result of the hard analysis (nothing written): :func:`evaluate_histograms`
    of the hard histograms, with the input report in ``result["inputs"]``."""
    report = InputReport(on_bad_file)
    hists = hard_histograms(spec, analysis_chunks(spec, fileset, chunk_size), store=store, progress=progress,
                            report=report)
    evaluation = evaluate_histograms(spec, hists, significance=significance)
    evaluation["result"]["inputs"] = report.to_dict()
    return evaluation


def evaluate_histograms(spec: AnalysisSpec, hists: Mapping, significance: bool = False) -> dict:
    """Workspace and pyhf result of histograms: ``{"histograms", "workspace", "result"}``.

    The model is checked before any fit (:func:`check_model`: ``result["workspace_check"]``,
    ``"model_warnings"``, ``"template_floor"``); the fit's entry carries its diagnostics. An
    Asimov Fisher information that is singular is an error naming the parameters without effect
    and the empty or negative regions and samples.
    """
    workspace = build_workspace(spec, hists)
    checks = check_model(spec, hists, workspace)
    try:
        fit = evaluate_workspace(workspace, significance=significance)
    except FitError as exc:  # the Asimov information is singular: say what in the model is empty
        raise FitError(f"{exc}{_context(histogram_warnings(spec, hists), checks['workspace_check'])}") from None
    result = {**fit, **checks, "params": spec.param_values(), "regions": compositions(spec, hists)}
    return {"histograms": hists, "workspace": workspace, "result": result}


def write_evaluation(out_dir: str | Path, evaluation: Mapping, extra: Mapping | None = None,
                     spec: AnalysisSpec | None = None) -> dict[str, Path]:
    """Write an evaluation into ``out_dir``: ``histograms.json``, the same histograms as UHI JSON
    (``histograms.uhi.json``) and ROOT (``histograms.root``), ``workspace.json`` and ``result.json``
    (the result with ``extra`` added). ``spec`` names and labels the observable axis of the UHI and
    ROOT histograms (without it the axis is called ``observable``). Returns ``{kind: path}``.

    >>> paths = write_evaluation(out, hard_evaluation(spec, fileset), spec=spec)
    >>> sorted(p.name for p in paths.values())
    ['histograms.json', 'histograms.root', 'histograms.uhi.json', 'result.json', 'workspace.json']
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {**evaluation["result"], **(extra or {})}
    hists = histograms_to_hist(evaluation["histograms"], None if spec is None else spec.observable_axes())
    return {
        "histograms": write_json(out / "histograms.json", histograms_to_json(evaluation["histograms"]), indent=None),
        "uhi": write_uhi_json(out / UHI_FILE, hists),
        "root": write_root(out / ROOT_FILE, hists),
        "workspace": write_json(out / "workspace.json", evaluation["workspace"]),
        "result": write_json(out / "result.json", result),
    }


#: The category axes of every region's ``hist.Hist``. hist reserves the name ``sample`` (it is
#: ``Hist.fill``'s own keyword, and hist warns on such an axis), so the samples' axis is ``process``,
#: as in the AGC's own histograms; its label is "sample".
PROCESS_AXIS, VARIATION_AXIS = "process", "variation"
UHI_FILE, ROOT_FILE = "histograms.uhi.json", "histograms.root"
#: ROOT names: ``<region>/<sample>__<variation>`` (sample and variation names have single underscores)
ROOT_SEPARATOR = "__"


def histograms_to_hist(hists: Mapping, observables: Mapping[str, tuple[str, str]] | None = None) -> dict:
    """``{region: hist.Hist}`` of the histograms (region -> sample -> variation -> edges, sumw, sumw2).

    Each region's Hist has the category axes ``process`` (the samples) and ``variation``, then the
    observable (named and labelled from ``observables``, ``{region: (name, label)}``; else
    ``observable``), with Weight storage holding sumw and sumw2 exactly and no flow bins (the
    analysis has none). A variation a sample lacks (``ME_var`` of a sample without alternative
    files) stays zero; ``metadata["variations"]`` names the variations each sample has.

    >>> h = histograms_to_hist(evaluation["histograms"], spec.observable_axes())["4j2b"]
    >>> h[{"process": "ttbar", "variation": "nominal"}].values()
    """
    import hist

    out = {}
    for region, by_sample in hists.items():
        samples = list(by_sample)
        variations = list(dict.fromkeys(v for s in samples for v in by_sample[s]))
        edges = np.asarray(next(iter(by_sample[samples[0]].values()))["edges"], np.float64)
        name, label = (observables or {}).get(region, ("observable", ""))
        h = hist.Hist(hist.axis.StrCategory(samples, name=PROCESS_AXIS, label="sample", overflow=False),
                      hist.axis.StrCategory(variations, name=VARIATION_AXIS, label="variation", overflow=False),
                      hist.axis.Variable(edges, name=name, label=label, underflow=False, overflow=False),
                      storage=hist.storage.Weight(), name=region,
                      metadata={"variations": {s: list(by_sample[s]) for s in samples}})
        view = h.view()
        for i, sample in enumerate(samples):
            for variation, arrays in by_sample[sample].items():
                where = f"histogram {region}/{sample}/{variation}"
                if not np.array_equal(np.asarray(arrays["edges"], np.float64), edges):
                    raise ConfigError(f"{where}: its bin edges differ from the region's other histograms")
                sumw, sumw2 = np.asarray(arrays["sumw"], np.float64), np.asarray(arrays["sumw2"], np.float64)
                if sumw.shape != (len(edges) - 1,) or sumw2.shape != sumw.shape:
                    raise ConfigError(f"{where}: sumw and sumw2 must have one value per bin ({len(edges) - 1}),"
                                      f" got shapes {sumw.shape} and {sumw2.shape}")
                j = variations.index(variation)
                view.value[i, j] = sumw
                view.variance[i, j] = sumw2
        out[region] = h
    return out


def write_uhi_json(path: str | Path, hists: Mapping) -> Path:
    """Write ``{name: hist.Hist}`` as one UHI JSON file (``uhi.io.json``; read back by :func:`read_histograms`)."""
    import uhi.io.json

    from jacana.facility.atomic import atomic_path

    text = json.dumps(dict(hists), default=uhi.io.json.default, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return Path(path)


def write_root(path: str | Path, hists: Mapping) -> Path:
    """Write ``{region: hist.Hist}`` (as :func:`histograms_to_hist` makes them) as a ROOT file of TH1D,
    ``<region>/<sample>__<variation>`` (with sumw2; the x axis named after the observable, titled with its
    label). Only the variations each sample has (``metadata["variations"]``) are written."""
    import uproot
    from uproot.writing.identify import to_TAxis, to_TH1x

    from jacana.facility.atomic import atomic_path

    with atomic_path(path) as tmp, uproot.recreate(tmp) as f:
        for region, h in hists.items():
            names = [ax.name for ax in h.axes]
            if names[:2] != [PROCESS_AXIS, VARIATION_AXIS] or len(names) != 3:
                raise ConfigError(f"histogram {region}: needs the axes ({PROCESS_AXIS}, {VARIATION_AXIS}, observable),"
                                  f" got {tuple(names)}")
            samples, variations, observable = list(h.axes[0]), list(h.axes[1]), h.axes[2]
            present = (getattr(h, "metadata", None) or {}).get("variations") or {s: variations for s in samples}
            _check_root_names(region, samples, variations)
            edges = np.asarray(observable.edges, np.float64)
            centres = 0.5 * (edges[1:] + edges[:-1])
            view = h.view(flow=False)
            for i, sample in enumerate(samples):
                for variation in present.get(sample, ()):
                    j = variations.index(variation)
                    sumw, sumw2 = np.asarray(view.value[i, j], np.float64), np.asarray(view.variance[i, j], np.float64)
                    name = f"{sample}{ROOT_SEPARATOR}{variation}"
                    axis = to_TAxis(fName=observable.name, fTitle=observable.label, fNbins=len(centres),
                                    fXmin=edges[0], fXmax=edges[-1], fXbins=edges.astype(">f8"))
                    f[f"{region}/{name}"] = to_TH1x(
                        fName=name, fTitle=f"{region}: {sample}, {variation}", data=_with_flow(sumw),
                        fEntries=float(sumw.sum()), fTsumw=float(sumw.sum()), fTsumw2=float(sumw2.sum()),
                        fTsumwx=float(sumw @ centres), fTsumwx2=float(sumw @ centres ** 2), fSumw2=_with_flow(sumw2),
                        fXaxis=axis)
    return Path(path)


def _with_flow(values: np.ndarray) -> np.ndarray:
    """ROOT's layout of a TH1D's bins: underflow, the bins, overflow (empty: the analysis has no flow bins)."""
    out = np.zeros(len(values) + 2, ">f8")
    out[1:-1] = values
    return out


def _check_root_names(region: str, samples, variations) -> None:
    """A name ROOT could not hold, or one that would not split back into sample and variation, is an error."""
    names = [("region", region)] + [("sample", s) for s in samples] + [("variation", v) for v in variations]
    for what, name in names:
        if not name or "/" in name or ";" in name or (what == "sample" and ROOT_SEPARATOR in name):
            banned = "'/', ';'" + (f" or {ROOT_SEPARATOR!r}" if what == "sample" else "")
            raise ConfigError(f"{what} {name!r} cannot be written to ROOT as <region>/<sample>{ROOT_SEPARATOR}"
                              f"<variation>: {banned} in the name")


def read_histograms(path: str | Path) -> dict:
    """``{region: hist.Hist}`` from a file ``jacana evaluate`` writes: ``histograms.uhi.json``,
    ``histograms.root`` or ``histograms.json`` (whose observable axis is unnamed: ``observable``);
    a folder: its ``histograms.uhi.json``. Equal to the Hist objects that were written.

    >>> read_histograms("results/histograms.root")["4j2b"].axes.name
    ('process', 'variation', 'm_bjj')
    """
    path = Path(path)
    if path.is_dir():
        path = path / UHI_FILE
    if not path.is_file():
        raise ConfigError(f"histogram file {str(path)!r} does not exist")
    if path.suffix == ".root":
        return _read_root(path)
    import hist
    import uhi.io.json

    try:
        raw = json.loads(path.read_text(), object_hook=uhi.io.json.object_hook)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"histogram file {str(path)!r} is not valid JSON: {exc}") from None
    if isinstance(raw, dict) and raw and all(isinstance(v, dict) and "uhi_schema" in v for v in raw.values()):
        return {name: hist.Hist(ir) for name, ir in raw.items()}
    if isinstance(raw, dict) and raw and all(
            isinstance(v, dict) and all(isinstance(x, dict) and "sumw" in y for x in v.values() for y in x.values())
            for v in raw.values()):
        return histograms_to_hist(raw)
    raise ConfigError(f"histogram file {str(path)!r} is neither UHI JSON nor jacana's histograms.json"
                      " (region -> sample -> variation -> edges, sumw, sumw2)")


def _read_root(path: Path) -> dict:
    """:func:`read_histograms` of a ROOT file as :func:`write_root` writes it."""
    import uproot

    hists: dict = {}
    observables: dict = {}
    with uproot.open(path) as f:
        for region, kind in f.classnames(recursive=False, cycle=False).items():
            if kind != "TDirectory":
                continue
            for key, cls in f[region].classnames(recursive=False, cycle=False).items():
                sample, sep, variation = key.partition(ROOT_SEPARATOR)
                if not cls.startswith("TH1") or not sep:
                    raise ConfigError(f"{path}: {region}/{key} ({cls}) is not a TH1 named <sample>{ROOT_SEPARATOR}"
                                      "<variation>")
                th1 = f[f"{region}/{key}"]
                axis = th1.member("fXaxis")
                observables.setdefault(region, (axis.member("fName"), axis.member("fTitle")))
                hists.setdefault(region, {}).setdefault(sample, {})[variation] = {
                    "edges": np.asarray(axis.edges(), np.float64),
                    "sumw": np.asarray(th1.values(flow=False), np.float64),
                    "sumw2": np.asarray(th1.variances(flow=False), np.float64)}
    if not hists:
        raise ConfigError(f"{path}: no <region>/<sample>{ROOT_SEPARATOR}<variation> histograms in it")
    return histograms_to_hist(hists, observables)


#: Model warnings printed by :func:`format_summary` (all are in result.json).
MAX_WARNING_LINES = 10


def format_summary(spec: AnalysisSpec, result: Mapping) -> str:
    def interval_lines(interval: Mapping | None, check: Mapping | None) -> list[str]:
        """``    profile likelihood interval [0.9300, 1.0800] (-0.0700 +0.0800); finite differences agree to 0.01%``"""
        parts = []
        if interval and interval.get("error"):
            parts.append(f"profile likelihood interval not found: {interval['error']}")
        elif interval:
            ends = ", ".join("none inside the bound" if interval.get(k) is None else f"{interval[k]:.4f}"
                             for k in ("down", "up"))
            widths = " ".join(f"{sign}{interval[k]:.4f}" for k, sign in (("minus", "-"), ("plus", "+"))
                              if interval.get(k) is not None)
            parts.append(f"profile likelihood interval [{ends}]" + (f" ({widths})" if widths else ""))
        if check and check.get("relative_difference") is not None:
            parts.append(f"finite differences agree to {100 * check['relative_difference']:.2g}%")
        elif check:
            parts.append(f"finite-difference cross-check failed: {check.get('error')}")
        return [f"    {'; '.join(parts)}"] if parts else []

    poi = spec.poi["name"]
    lines = []
    for region, comp in result["regions"].items():
        total = sum(comp.values()) or 1.0
        parts = ", ".join(f"{s} {y:,.0f} ({100 * y / total:.1f}%)" for s, y in comp.items())
        lines.append(f"  {region}: total {total:,.0f}: {parts}")
    fit = result[poi]
    exp = result["expected"]
    if fit.get("value") is None:
        lines.append(f"  fit to pseudo-data FAILED: {fit.get('error')}")
    else:
        source = f" (uncertainty from {fit['uncertainty_from']})" if fit.get("uncertainty_from") else ""
        state = "" if fit.get("converged", True) else " NOT CONVERGED"
        lines.append(f"  fit to pseudo-data{state}: {poi} = {fit['value']:.4f} +/- {fit['uncertainty']:.4f}{source}")
        lines += interval_lines(fit.get("interval"), fit.get("finite_differences"))
        edm = (fit.get("fit") or {}).get("edm")
        if edm is not None:
            lines.append(f"    edm {edm:.2g}, {len(fit.get('at_bounds', []))} parameters at bounds, "
                         f"{len(fit.get('pulls', []))} pulled beyond 3 sigma")
        for warning in fit.get("warnings", []) if not fit.get("converged", True) else []:
            lines.append(f"    WARNING: {warning}")
    z0 = f", expected Z0 = {exp['z0']:.1f}" if exp.get("z0") is not None else ""
    lines.append(f"  expected (Asimov): sigma_{poi} = {exp['sigma_mu']:.4f} (exact Hessian){z0}")
    lines += interval_lines(exp.get("interval"), exp.get("finite_differences"))
    check = result.get("workspace_check")
    if check is not None:
        verdict = "passed" if check["passed"] else f"FAILED ({check['problem_count']} problems)"
        lines.append(f"  workspace check (+-{check['sigmas']:g} sigma, {check['parameters']} parameters): {verdict}")
    warnings = result.get("model_warnings", [])
    for warning in warnings[:MAX_WARNING_LINES]:
        lines.append(f"  WARNING: {warning}")
    if len(warnings) > MAX_WARNING_LINES:
        lines.append(f"  ... {len(warnings) - MAX_WARNING_LINES} more warnings in result.json (model_warnings)")
    return "\n".join(lines)
