"""``jacana evaluate``: the AGC ttbar analysis in hard mode, ending in pyhf's own fit.

Writes ``histograms.json`` (region -> sample -> variation -> edges, sumw, sumw2),
``workspace.json`` (a valid pyhf workspace) and ``result.json`` (fitted ttbar_norm, the
expected uncertainty and significance on Asimov data, the parameters, region compositions).
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
from jacana.stages.stats.inference import evaluate_workspace
from jacana.stages.spec import NOMINAL, AnalysisSpec
from jacana.stages.stats.workspace import build_workspace, histograms_to_json


def load_params_file(path: str | Path) -> tuple[dict, list[str]]:
    """Parameters and config overrides from a ``params.json`` (as ``jacana optimize`` writes it).

    Parameters are cut values (numbers), bin edges ``edges_<region>`` (lists) and the trained
    network ``nn`` (a dict of weight lists); overrides (e.g. a region's observable set to the
    network) apply to the config before the parameters.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"params file {str(path)!r} is not valid JSON: {exc}") from None
    values = raw.get("params", raw) if isinstance(raw, dict) else None
    overrides = raw.get("overrides", []) if isinstance(raw, dict) and "params" in raw else []

    def valid(k, v):
        if k == "nn":
            return isinstance(v, dict)
        if k.startswith("edges_"):
            return isinstance(v, list) and all(isinstance(e, (int, float)) for e in v)
        return isinstance(v, (int, float))

    if not isinstance(values, dict) or not isinstance(overrides, list):
        raise ConfigError(f"params file {str(path)!r} must map parameter names to values")
    bad = [k for k, v in values.items() if not valid(k, v)]
    if bad:
        raise ConfigError(f"params file {str(path)!r}: bad values for {bad} (cuts are numbers, edges_<region>"
                          " lists of numbers, nn a dict of weights)")
    return {k: (v if k == "nn" else list(map(float, v)) if isinstance(v, list) else float(v))
            for k, v in values.items()}, [str(o) for o in overrides]


def compositions(spec: AnalysisSpec, hists: Mapping) -> dict[str, dict[str, float]]:
    """Nominal expected yield per region and sample."""
    return {r: {s: float(np.sum(hists[r][s][NOMINAL]["sumw"])) for s in spec.samples} for r in spec.regions}


def hard_evaluation(spec: AnalysisSpec, fileset: Fileset, store: ColumnStore | None = None,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = False, significance: bool = False,
                    on_bad_file: str = "fail") -> dict:
    """Histograms, workspace and pyhf result of the hard analysis (nothing written)."""
    report = InputReport(on_bad_file)
    hists = hard_histograms(spec, analysis_chunks(spec, fileset, chunk_size), store=store, progress=progress,
                            report=report)
    workspace = build_workspace(spec, hists)
    fit = evaluate_workspace(workspace, significance=significance)
    result = {**fit, "params": spec.param_values(), "regions": compositions(spec, hists), "inputs": report.to_dict()}
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


def format_summary(spec: AnalysisSpec, result: Mapping) -> str:
    poi = spec.poi["name"]
    lines = []
    for region, comp in result["regions"].items():
        total = sum(comp.values()) or 1.0
        parts = ", ".join(f"{s} {y:,.0f} ({100 * y / total:.1f}%)" for s, y in comp.items())
        lines.append(f"  {region}: total {total:,.0f}: {parts}")
    fit = result[poi]
    exp = result["expected"]
    if fit.get("converged", True):
        lines.append(f"  fit to pseudo-data: {poi} = {fit['value']:.4f} +/- {fit['uncertainty']:.4f}")
    else:
        lines.append(f"  fit to pseudo-data FAILED: {fit['error']}")
    z0 = f", expected Z0 = {exp['z0']:.1f}" if exp.get("z0") is not None else ""
    lines.append(f"  expected (Asimov): sigma_{poi} = {exp['sigma_mu']:.4f}{z0}")
    return "\n".join(lines)
