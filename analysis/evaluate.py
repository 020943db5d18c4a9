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
from jacana.stages.stats.workspace import build_workspace, floored_templates, histograms_to_json


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
    from jacana.stages.spec import _cut, _parse_override, _schema

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
                          f" got {_cut(repr(values), 80)}")

    def number(key, v) -> float:
        # bool is an int in Python; json reads NaN and Infinity
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ConfigError(f"{name}: {key} must be a finite number, got {_cut(repr(v), 80)}")
        return float(v)

    def edges(key, v) -> list[float]:
        if not isinstance(v, list) or len(v) < 2:
            raise ConfigError(f"{name}: {key} must be a list of at least 2 bin edges, got {_cut(repr(v), 80)}")
        out = [number(f"{key}[{i}]", e) for i, e in enumerate(v)]
        bad = [i for i in range(1, len(out)) if not out[i] > out[i - 1]]
        if bad:
            raise ConfigError(f"{name}: {key} must be strictly increasing; edge {bad[0]} ({out[bad[0]]}) is not"
                              f" above edge {bad[0] - 1} ({out[bad[0] - 1]})")
        return out

    def network(v) -> dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{name}: nn must be a dict of weight arrays {list(WEIGHT_NAMES)}, got {_cut(repr(v), 80)}")
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
        raise ConfigError(f"{name}: overrides must be a list of 'key=value' strings, got {_cut(repr(overrides), 80)}")
    layout = set(_schema()["properties"]) | set(_schema(general=True)["properties"])
    for i, o in enumerate(overrides):
        if not isinstance(o, str):
            raise ConfigError(f"{name}: overrides[{i}] must be a 'key=value' string, got {_cut(repr(o), 80)}")
        key, _ = _parse_override(o)  # syntax and YAML limits of the value
        parts = key.split(".")
        allowed = (parts[0] in ("parameters", "nn") and len(parts) > 1
                   or parts[0] == "regions" and len(parts) == 3 and parts[2] in ("observable", "edges")
                   or len(parts) == 1 and key not in layout)
        if not allowed:
            raise ConfigError(f"{name}: overrides[{i}] {_cut(o, 80)!r} would change {key!r}; a params file may set"
                              " only parameters, regions.<r>.observable, regions.<r>.edges and nn (the input"
                              " layout, samples and systematics come from the config: use --set for them)")
    return params, list(overrides)


def compositions(spec: AnalysisSpec, hists: Mapping) -> dict[str, dict[str, float]]:
    """Nominal expected yield per region and sample."""
    return {r: {s: float(np.sum(hists[r][s][NOMINAL]["sumw"])) for s in spec.samples} for r in spec.regions}


def check_model(spec: AnalysisSpec, hists: Mapping, workspace: Mapping) -> dict:
    """The checks before any fit: ``{"workspace_check", "model_warnings", "template_floor"}``.

    ``workspace_check`` is :func:`~jacana.stages.stats.health.check_workspace` of ``workspace``
    (the +-5 sigma grid; its warning lines are moved into ``model_warnings``), ``model_warnings``
    the lines naming empty or negative-yield regions and samples, negative bins, parameters
    without effect, bins of low MC statistics and grid problems, and ``template_floor`` what
    the rate floor clipped (:func:`~jacana.stages.stats.workspace.floored_templates`). Raises
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
    return {"workspace_check": check, "model_warnings": warnings, "template_floor": floored}


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


def write_evaluation(out_dir: str | Path, evaluation: Mapping, extra: Mapping | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {**evaluation["result"], **(extra or {})}
    return {
        "histograms": write_json(out / "histograms.json", histograms_to_json(evaluation["histograms"]), indent=None),
        "workspace": write_json(out / "workspace.json", evaluation["workspace"]),
        "result": write_json(out / "result.json", result),
    }


#: Model warnings printed by :func:`format_summary` (all are in result.json).
MAX_WARNING_LINES = 10


def format_summary(spec: AnalysisSpec, result: Mapping) -> str:
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
        edm = (fit.get("fit") or {}).get("edm")
        if edm is not None:
            lines.append(f"    edm {edm:.2g}, {len(fit.get('at_bounds', []))} parameters at bounds, "
                         f"{len(fit.get('pulls', []))} pulled beyond 3 sigma")
        for warning in fit.get("warnings", []) if not fit.get("converged", True) else []:
            lines.append(f"    WARNING: {warning}")
    z0 = f", expected Z0 = {exp['z0']:.1f}" if exp.get("z0") is not None else ""
    lines.append(f"  expected (Asimov): sigma_{poi} = {exp['sigma_mu']:.4f}{z0}")
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
