"""``jacana scan``: the landscape of the real (hard-cut) analysis over one or two parameters.

Each grid point is the conventional hard analysis on held-out events (by default the embedded
validation samples) with pyhf's expected uncertainty on the POI, the number
:func:`jacana.analysis.evaluate.hard_evaluation` reports as ``expected.sigma_mu``. The columns
are read once (:class:`~jacana.analysis.studies.hardobjective.HardObjective`); every further point is
one pass over the cached events. ``scan.json`` is rewritten atomically after every point, and a
scan into the same folder reuses the points already there (same config, fileset and fixed
parameters), so an interrupted scan resumes and a refined grid only computes what is new.

The landscape plot (``plots/scan.png``: a curve, or a heat map for two parameters) marks the
AGC point (the config's values) and, with ``--gradient-result``, each gradient optimum given (a
``jacana optimize`` result, or every start of a ``jacana optimize --starts`` run); all are also
evaluated on the same events, so their sigma_mu is comparable to the grid's, and each is judged
against the grid's best (grid steps away, ratio, and with replicas the paired noise).

With ``--bootstrap B`` every point is also evaluated on B Poisson-bootstrap replicas of the
simulated events, in the same pass (:func:`~jacana.stages.columns.bootstrap_multipliers`: the same
replicas at every point). The spread is the Monte Carlo statistical noise of the landscape; the
*paired* difference of a point to the grid's best (replica by replica) says whether the best is
really better or only luckier: points within ``NOISE_Z`` robust standard deviations of it (1.4826
x the median absolute deviation: the replicas have a heavy upper tail) are listed as
``within_noise_of_best`` and outlined in the plot.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from jacana.analysis.results import GradientOptimum, OptimizationResult, read_json
from jacana.analysis.studies.hardobjective import HardObjective, check_names
from jacana.facility.atomic import write_json
from jacana.facility.hardrun import DEFAULT_CHUNK_SIZE
from jacana.stages.errors import ConfigError
from jacana.stages.fileset import Fileset
from jacana.stages.spec import AnalysisSpec

SCAN_VERSION = 1
MAX_AXES = 2
#: points per axis when ``name=lo:hi`` gives none: 9 x 9 = 81 hard passes over the 1M held-out events
#: (their measured time: docs/trust.md)
DEFAULT_POINTS = 9
#: grid points within this fraction of the best are listed as near-optimal (``near_best``)
NEAR_BEST = 0.01
#: a point is within the noise of the grid's best when its sigma_mu exceeds the best's by at most
#: this many standard deviations of their paired bootstrap difference
NOISE_Z = 2.0


@dataclasses.dataclass(frozen=True)
class Axis:
    """One scanned parameter: ``n`` evenly spaced values from ``lo`` to ``hi`` (both included)."""

    name: str
    lo: float
    hi: float
    n: int

    @property
    def values(self) -> list[float]:
        return [float(v) for v in np.linspace(self.lo, self.hi, self.n)]

    @property
    def step(self) -> float:
        return (self.hi - self.lo) / (self.n - 1) if self.n > 1 else 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "lo": self.lo, "hi": self.hi, "n": self.n, "values": self.values}


def parse_axis(text: str, spec: AnalysisSpec) -> Axis:
    """``name=lo:hi:n`` (or ``name=lo:hi``: :data:`DEFAULT_POINTS` points) -> :class:`Axis`; errors name the
    parameter and its bounds."""
    if "=" not in text:
        raise ConfigError(f"scan parameter {text!r} must look like name=lo:hi:n (e.g. jet_pt_min=20:40:9)")
    name, rng = (s.strip() for s in text.split("=", 1))
    check_names(spec, [name])
    p = spec.parameters[name]
    bounds = f"[{p.lower:g}, {p.upper:g}]"
    parts = rng.split(":")
    if len(parts) == 2:
        parts.append(str(DEFAULT_POINTS))
    if len(parts) != 3:
        raise ConfigError(f"scan parameter {name!r}: range {rng!r} must be lo:hi:n or lo:hi (its bounds are {bounds})")
    try:
        lo, hi = float(parts[0]), float(parts[1])
        n = int(parts[2])
    except ValueError:
        raise ConfigError(f"scan parameter {name!r}: range {rng!r} must be lo:hi:n with numbers lo, hi and an"
                          f" integer n (its bounds are {bounds})") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"scan parameter {name!r}: lo and hi must be finite, got {rng!r}")
    if n < 1:
        raise ConfigError(f"scan parameter {name!r}: n must be >= 1, got {n}")
    if lo > hi:
        raise ConfigError(f"scan parameter {name!r}: lo {lo:g} is above hi {hi:g}")
    if n == 1 and lo != hi:
        raise ConfigError(f"scan parameter {name!r}: n = 1 needs lo == hi, got {lo:g}:{hi:g}")
    if n > 1 and lo == hi:
        raise ConfigError(f"scan parameter {name!r}: lo == hi ({lo:g}) needs n = 1")
    if lo < p.lower or hi > p.upper:
        raise ConfigError(f"scan parameter {name!r}: range {lo:g}:{hi:g} leaves its bounds {bounds}"
                          f" (change the range, or the bounds with --set parameters.{name}.bounds=[lo,hi])")
    return Axis(name, lo, hi, n)


def parse_axes(texts: Sequence[str], spec: AnalysisSpec) -> list[Axis]:
    if not texts:
        raise ConfigError("give one or two scan parameters, e.g. --params jet_pt_min=20:40:9 btag_min=0.3:0.7:9")
    axes = [parse_axis(t, spec) for t in texts]
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"scan parameters must differ, got {names}")
    if len(axes) > MAX_AXES:
        raise ConfigError(f"a scan has one or two parameters, got {len(axes)}: {names}")
    return axes


def reuse_context(spec: AnalysisSpec, fileset: Fileset, n_events: int, fixed: Mapping[str, float]) -> dict:
    """What must match for stored points to be reused (the config without parameter values)."""
    raw = spec.to_dict()
    for p in raw.get("parameters", {}).values():
        p.pop("value", None)
    return {"config": raw, "fileset": fileset.source, "events": n_events, "fixed_params": dict(fixed)}


def point_at(result: Mapping, index: Sequence[int]) -> dict:
    """The point of a scan result at grid ``index``."""
    for p in result["points"]:
        if list(p["index"]) == list(index):
            return p
    raise ConfigError(f"the scan has no point at grid index {list(index)}")


def robust_sd(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the standard deviation of a normal sample, but not
    carried by one or two outliers (a bootstrap replica that draws a heavy event several times)."""
    values = np.asarray(values, dtype=float)
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def paired_noise(entry: Mapping, best: Mapping, z: float = NOISE_Z) -> dict | None:
    """Bootstrap noise of ``entry`` (a point with ``sigma_mu_replicas``) against the grid's ``best``.

    ``sigma_mu_sd``: the spread of the point's sigma_mu over the replicas; ``diff_sd``: that of its
    difference to the best, replica by replica (paired: the noise common to both cancels). Both are
    robust (:func:`robust_sd`): the replicas' sigma_mu has a heavy upper tail, and the plain standard
    deviations (``sigma_mu_std``, ``diff_std``, also given) move with single replicas.
    ``within_noise``: the point exceeds the best by at most ``z`` x ``diff_sd``. None without replicas.
    """
    a, b = entry.get("sigma_mu_replicas"), best.get("sigma_mu_replicas")
    if entry.get("sigma_mu") is None or not a or not b or len(a) != len(b):
        return None
    pairs = np.array([(x, y) for x, y in zip(a, b) if x is not None and y is not None], dtype=float)
    if len(pairs) < 2:
        return None
    diff = entry["sigma_mu"] - best["sigma_mu"]
    diffs = pairs[:, 0] - pairs[:, 1]
    diff_sd = robust_sd(diffs)
    return {"replicas": len(pairs), "sigma_mu_sd": robust_sd(pairs[:, 0]), "diff_to_best": diff, "diff_sd": diff_sd,
            "within_noise": bool(diff <= z * diff_sd), "sigma_mu_std": float(np.std(pairs[:, 0], ddof=1)),
            "diff_std": float(np.std(diffs, ddof=1))}


def load_gradient_result(path: str | Path) -> GradientOptimum:
    """The optimum of a ``jacana optimize`` run (its result.json, or the folder holding it; see
    :class:`~jacana.analysis.results.GradientOptimum`): the named cuts, what else it optimised
    (from the ``params.json`` beside it when there is one) and the config overrides it needs."""
    return GradientOptimum.load(path)


def load_gradient_results(paths: str | Path | Sequence[str | Path]) -> list[GradientOptimum]:
    """Every optimum to judge, each a :func:`load_gradient_result` with a ``label`` (none for no paths).

    A path is a ``jacana optimize`` result (``result.json`` or its folder) or a multi-start run
    (``multistart.json`` or its folder): that gives every start that succeeded. Labels are the
    result's folder name (its file name when not ``result.json``; ``start <k>`` for a start,
    after its run's folder name when several paths are given), made unique with the full path.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found: list[tuple[str, str, GradientOptimum]] = []  # (short label, long label, optimum)
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not (path / "result.json").is_file():
            if not (path / "multistart.json").is_file():
                raise ConfigError(f"gradient result folder {str(path)!r} has neither a result.json (jacana optimize)"
                                  " nor a multistart.json (jacana optimize --starts)")
            path = path / "multistart.json"
        if path.name != "multistart.json":
            g = load_gradient_result(path)
            file = Path(g.path)
            short = file.parent.name if file.name == "result.json" else file.stem
            found.append((short or str(file.parent), g.path, g))
            continue
        doc = read_json(path, "multi-start result")
        runs = [r for r in (doc.get("runs") if isinstance(doc, dict) else None) or [] if r.get("final_params")]
        if not runs:
            raise ConfigError(f"multi-start result {str(path)!r} has no start that finished (nothing to judge)")
        for run in runs:
            k = run.get("start")
            folder = Path(run.get("out") or "")  # written where the run was made; fall back to beside this file
            if not (folder / "result.json").is_file():
                folder = path.parent / f"start_{k}"
            prefix = f"{path.parent.name} " if len(paths) > 1 else ""
            found.append((f"{prefix}start {k}", f"{path.parent} start {k}", load_gradient_result(folder)))
    shorts = [short for short, _, _ in found]
    return [dataclasses.replace(g, label=short if shorts.count(short) == 1 else long) for short, long, g in found]


def grid_points(axes: Sequence[Axis]) -> list[tuple[tuple[int, ...], dict[str, float]]]:
    """Every (index tuple, {name: value}) of the grid, the last axis fastest."""
    return [(idx, {a.name: a.values[i] for a, i in zip(axes, idx)})
            for idx in itertools.product(*(range(a.n) for a in axes))]


def run_scan(spec: AnalysisSpec, fileset: Fileset, axes: Sequence[Axis], out_dir: str | Path,
             gradient_results: Sequence[str | Path] = (), hold: str = "config", progress: bool = True,
             plots: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE, on_bad_file: str = "fail",
             objective: HardObjective | None = None, bootstrap: int = 0, bootstrap_seed: int = 0) -> dict:
    """Scan the hard expected sigma_mu over ``axes`` on ``fileset``; writes ``scan.json`` (and the plot).

    ``gradient_results``: optimisation results to judge on the same events (see
    :func:`load_gradient_results`). ``hold``: the value of the parameters not scanned: ``"config"``
    (the config's, i.e. the AGC point) or ``"gradient"`` (the gradient optimum's: one result).
    ``bootstrap``: replicas for the landscape's Monte Carlo noise (see the module docstring).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    axes = list(axes)
    if hold not in ("config", "gradient"):
        raise ConfigError(f"hold must be 'config' or 'gradient', got {hold!r}")
    # named cuts this config tunes; bin edges / network weights apply as they are
    gradients = [g.for_parameters(spec.parameters) for g in load_gradient_results(gradient_results)]
    if hold == "gradient" and len(gradients) != 1:
        raise ConfigError("holding the other parameters at the gradient optimum needs one gradient result,"
                          f" got {len(gradients)}" + (" (a multi-start run gives one per start)" if gradients else ""))
    agc = spec.param_values()
    scanned = [a.name for a in axes]
    fixed = {k: v for k, v in agc.items() if k not in scanned}
    if hold == "gradient":
        fixed.update({k: v for k, v in gradients[0].params.items() if k in fixed})
    if objective is not None and (bootstrap, bootstrap_seed) not in ((0, 0), (objective.bootstrap,
                                                                         objective.bootstrap_seed)):
        raise ConfigError("give the bootstrap replicas to the objective passed in, not to run_scan")
    obj = objective or HardObjective(spec, fileset, chunk_size=chunk_size, on_bad_file=on_bad_file,
                                     bootstrap=bootstrap, bootstrap_seed=bootstrap_seed)
    context = reuse_context(spec, fileset, obj.n_events, fixed)
    replicas = {"replicas": obj.bootstrap, "seed": obj.bootstrap_seed} if obj.bootstrap else None
    path = out / "scan.json"
    reused = 0
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if isinstance(old, dict) and old.get("version") == SCAN_VERSION and old.get("context") == context:
            if replicas and old.get("bootstrap") != replicas:
                if progress:  # sigma_mu could be reused, but every point needs its replicas: one pass each anyway
                    print(f"jacana scan: {path} was made without these bootstrap replicas; recomputing every point")
            else:  # the same replicas, or none wanted (the stored sigma_mu are the same either way)
                reused = obj.seed([p for p in old.get("points", [])
                                   if p.get("sigma_mu") is not None or "error" in p])
                judged = [old.get("agc"), old.get("gradient"), *(old.get("gradients") or [])]  # "gradient": older scans
                reused += obj.seed([e for e in judged if e and not e.get("also_set")])
        elif progress:
            print(f"jacana scan: {path} was made with another config, fileset or fixed parameters; starting afresh")

    grid = grid_points(axes)
    points: list[dict] = []
    result = {"version": SCAN_VERSION, "parameters": [a.to_dict() for a in axes], "fixed_params": fixed,
              "hold": hold, "context": context, "bootstrap": replicas, "fileset": fileset.source,
              "events": obj.n_events, "points": points, "complete": False}

    def save() -> None:
        result["passes"] = obj.passes
        result["seconds"] = time.perf_counter() - t_start
        write_json(path, result)

    bar = tqdm(grid, desc="hard scan", unit="point", disable=not progress)
    best = math.inf
    for idx, values in bar:
        entry = obj.evaluate({**fixed, **values})
        entry = {"index": list(idx), **{k: v for k, v in entry.items() if k != "cached"}}
        points.append(entry)
        if entry["sigma_mu"] is not None:
            best = min(best, entry["sigma_mu"])
        save()
        bar.set_postfix_str(" ".join(f"{k}={v:.4g}" for k, v in values.items())
                            + (f" sigma_mu={entry['sigma_mu']:.5g}" if entry["sigma_mu"] else " failed")
                            + f" best={best:.5g}")
    bar.close()

    shape = [a.n for a in axes]
    values_grid = np.full(shape, np.nan)
    for p in points:
        if p["sigma_mu"] is not None:
            values_grid[tuple(p["index"])] = p["sigma_mu"]
    result["sigma_mu"] = values_grid.tolist()
    ok = [p for p in points if p["sigma_mu"] is not None]
    if not ok:
        save()
        raise ConfigError(f"no grid point gave a finite sigma_mu (first error: {points[0].get('error')})")
    grid_best = min(ok, key=lambda p: p["sigma_mu"])
    result["best"] = {"index": grid_best["index"], "params": grid_best["params"], "sigma_mu": grid_best["sigma_mu"]}
    # the feasible region a physicist fine-tunes in: every grid point within NEAR_BEST of the best
    result["near_best"] = {"tolerance": NEAR_BEST, "points": _listed(
        ok, axes, lambda p: p["sigma_mu"] <= grid_best["sigma_mu"] * (1 + NEAR_BEST))}
    result["agc"] = obj.evaluate(agc)
    result["agc"].pop("cached", None)
    if obj.bootstrap:
        for p in points + [result["agc"]]:
            p["bootstrap"] = paired_noise(p, grid_best)
        result["within_noise_of_best"] = {"z": NOISE_Z, "replicas": obj.bootstrap, "seed": obj.bootstrap_seed,
                                          "points": _listed(ok, axes,
                                                            lambda p: (p.get("bootstrap") or {}).get("within_noise"))}
    if gradients:
        judging = tqdm(gradients, desc="gradient optima", unit="optimum", disable=not progress)
        result["gradients"] = [_judge(obj, g, grid_best, axes, fixed) for g in judging]
        judging.close()
        result["gradients_judged"] = _verdicts(result["gradients"])
    result["reused_points"] = reused
    result["complete"] = True
    if plots:
        from jacana.analysis.studies.trustplots import scan_landscape

        result["plot"] = str(scan_landscape(result, spec, out / "plots" / "scan.png"))
    save()
    return result


def _judge(obj: HardObjective, gradient: GradientOptimum, grid_best: Mapping, axes: Sequence[Axis],
           fixed: Mapping[str, float]) -> dict:
    """A gradient optimum on the scan's events, against the grid's best: grid steps away, ratio, noise."""
    g = obj.evaluate(gradient.params, gradient.extra or None, overrides=gradient.overrides or None)
    g.pop("cached", None)
    g["label"], g["source"] = gradient.label, gradient.path
    path = _trajectory(gradient.result, [a.name for a in axes])
    if path:
        g["path"] = path
    if gradient.extra or gradient.overrides:
        g["also_set"] = sorted(gradient.extra) + list(gradient.overrides)
    steps = {a.name: abs(gradient.params[a.name] - grid_best["params"][a.name]) / a.step
             for a in axes if a.step > 0 and a.name in gradient.params}
    g["grid_steps_from_best"] = steps
    g["within_one_grid_step"] = all(s <= 1.0 + 1e-9 for s in steps.values())
    g["over_grid_best"] = g["sigma_mu"] / grid_best["sigma_mu"] if g["sigma_mu"] else None
    g["within_near_best"] = g["over_grid_best"] is not None and g["over_grid_best"] <= 1 + NEAR_BEST
    scanned = {a.name for a in axes}
    g["other_params_differ_from_grid"] = {k: v for k, v in gradient.params.items()
                                          if k not in scanned and abs(v - fixed.get(k, v)) > 1e-12}
    if obj.bootstrap:
        g["bootstrap"] = paired_noise(g, grid_best)
    return g


def _trajectory(result: OptimizationResult, names: Sequence[str]) -> dict[str, list[float]] | None:
    """The scanned parameters' values at each step of an optimisation result (its history), for the
    plot's path from start to optimum; None when the result does not record them."""
    steps = [h.get("params") for h in result.history if isinstance(h, Mapping)]
    if not steps:
        steps = [result.initial_params]
    steps = [p for p in steps if isinstance(p, Mapping) and all(isinstance(p.get(n), (int, float)) for n in names)]
    return {n: [float(p[n]) for p in steps] for n in names} if steps else None


def _verdicts(judged: Sequence[Mapping]) -> dict:
    """How many of the judged optima pass each check (``within_noise`` only with bootstrap replicas)."""
    noise = [g["bootstrap"]["within_noise"] for g in judged if g.get("bootstrap")]
    return {"n": len(judged), "within_one_grid_step": sum(bool(g["within_one_grid_step"]) for g in judged),
            "within_near_best": sum(bool(g["within_near_best"]) for g in judged),
            "both": sum(bool(g["within_one_grid_step"] and g["within_near_best"]) for g in judged),
            "within_noise": sum(noise) if noise else None}


def _listed(points: Sequence[Mapping], axes: Sequence[Axis], keep) -> list[dict]:
    """The scanned values and sigma_mu of the ``points`` that ``keep`` accepts, best first."""
    return [{"params": {a.name: p["params"][a.name] for a in axes}, "sigma_mu": p["sigma_mu"]}
            for p in sorted(points, key=lambda p: p["sigma_mu"]) if keep(p)]


def format_summary(result: Mapping) -> str:
    names = [a["name"] for a in result["parameters"]]
    best = result["best"]
    lines = [(f"  {len(result['points'])} points over {' x '.join(names)} on {result['events']:,} events,"
             f" {result['passes']} passes ({result.get('reused_points', 0)} reused), {result['seconds']:.0f} s"),
             "  grid best: sigma_mu = {:.5f} at {}".format(
                 best["sigma_mu"], ", ".join(f"{k} {best['params'][k]:.4g}" for k in names))]
    agc = result["agc"]
    if agc.get("sigma_mu"):
        lines.append(f"  config point: sigma_mu = {agc['sigma_mu']:.5f}")
    for g in result.get("gradients", []):
        if g.get("sigma_mu"):
            noise = g.get("bootstrap")
            lines.append(f"  gradient optimum {g['label']}: sigma_mu = {g['sigma_mu']:.5f}"
                         f" ({g['over_grid_best']:.4f} x grid best), grid steps from the best point: "
                         + ", ".join(f"{k} {v:.2f}" for k, v in g["grid_steps_from_best"].items())
                         + ("" if not noise else f"; vs the best {noise['diff_to_best']:+.5f} +- {noise['diff_sd']:.5f}"
                            f" (paired): {'within' if noise['within_noise'] else 'NOT within'} the noise"))
        else:
            lines.append(f"  gradient optimum {g['label']}: no sigma_mu ({g.get('error')})")
    v = result.get("gradients_judged")
    if v and v["n"] > 1:
        lines.append(f"  of {v['n']} gradient optima: {v['within_one_grid_step']} within one grid step of the best,"
                     f" {v['within_near_best']} within {100 * NEAR_BEST:g} % of it, {v['both']} both"
                     + ("" if v["within_noise"] is None else f"; {v['within_noise']} within the noise"))
    noise = result.get("within_noise_of_best")
    if noise:
        best_std = (point_at(result, best["index"]).get("bootstrap") or {}).get("sigma_mu_sd")
        spread = ("cannot be estimated (too few replicas gave a sigma_mu)" if best_std is None
                  else f"varies by {best_std:.5f} ({100 * best_std / best['sigma_mu']:.1f} %)")
        lines.append(f"  bootstrap ({noise['replicas']} replicas): the grid best's sigma_mu {spread};"
                     f" {len(noise['points'])} of {len(result['points'])} points are within {noise['z']:g}"
                     " robust standard deviations of it (paired)")
    return "\n".join(lines)

