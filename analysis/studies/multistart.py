"""``jacana optimize --starts K``: K gradient optimisations from spread starting points.

An ensemble view of the optimum: start 0 is the config's point (the AGC cuts), starts 1..K-1
are a Latin hypercube (scipy.stats.qmc, seeded) over a box around it: each parameter within
``spread`` x (its bound range) of its config value, clipped to its bounds (``spread`` = 1
covers the whole bounds). Every start is an ordinary ``jacana optimize`` run
(:func:`jacana.analysis.optimize.run_optimize` with ``spec.with_params(start)``) into
``OUT/start_<k>/``; a start whose ``result.json`` is already there with the same starting
point and settings is reused, not rerun.

With a dask client, scheduler, profile or ``workers`` the starts run in parallel, one task per
start (each on one worker, in that worker's process); without, one after the other here.
``OUT/multistart.json`` reports each start and the spread (mean, std, min, max) of the final
parameters and of the held-out sigma_mu; ``OUT/plots/multistart.png`` plots them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np

from jacana.analysis.results import OptimizationResult
from jacana.analysis.studies.hardobjective import check_names
from jacana.facility.atomic import write_json
from jacana.stages.errors import ConfigError, JacanaError
from jacana.stages.fileset import Fileset
from jacana.stages.spec import AnalysisSpec

DEFAULT_SPREAD = 0.25


def start_points(spec: AnalysisSpec, starts: int, seed: int = 0, spread: float = DEFAULT_SPREAD,
                 names: Sequence[str] | None = None) -> list[dict[str, float]]:
    """``starts`` parameter points: the config's, then a seeded Latin hypercube around it (inside the bounds)."""
    from scipy.stats import qmc

    from jacana.analysis.studies.baselines import default_names

    if starts < 1:
        raise ConfigError(f"starts must be >= 1, got {starts}")
    if not 0 < spread <= 1:
        raise ConfigError(f"the start spread must be in (0, 1] (a fraction of each parameter's bound range),"
                          f" got {spread}")
    names = list(names or default_names(spec))
    check_names(spec, names)
    base = spec.param_values()
    points = [dict(base)]
    if starts == 1:
        return points
    lo, hi = [], []
    for n in names:
        p = spec.parameters[n]
        width = spread * (p.upper - p.lower)
        lo.append(max(p.lower, p.value - width))
        hi.append(min(p.upper, p.value + width))
    u = qmc.LatinHypercube(d=len(names), seed=seed).random(starts - 1)
    for row in qmc.scale(u, lo, hi):
        points.append({**base, **{n: float(v) for n, v in zip(names, row)}})
    return points


def _summary(k: int, point: Mapping, out: Path, result: OptimizationResult | None, error: str | None) -> dict:
    entry = {"start": k, "out": str(out), "initial_params": dict(point)}
    if result is None:
        return {**entry, "error": error}
    return {**entry, "final_params": result.final_params,
            "heldout_sigma_mu_initial": result.sigma_mu_before,
            "heldout_sigma_mu": result.sigma_mu_after,
            "train_hard_objective": result.hard_limit,
            "objective": result.objective, "stopped": result.stopped, "steps": len(result.history),
            "passes": result.train_passes, "seconds": result.seconds}


def _reusable(out: Path, point: Mapping, settings) -> OptimizationResult | None:
    path = out / "result.json"
    if not path.is_file():
        return None
    try:
        result = OptimizationResult.load(path)
    except ConfigError:  # not valid JSON, or not a jacana optimize result
        return None
    initial = result.initial_params or {}
    same_start = all(math.isclose(float(initial.get(k, math.nan)), float(v), rel_tol=1e-12, abs_tol=1e-12)
                     for k, v in point.items())
    return result if same_start and result.settings == settings.to_json() else None


def run_start(k: int, spec_dict: Mapping, point: Mapping, train: Fileset, validation: Fileset, out: str,
              settings, options: Mapping) -> dict:
    """One start (module level: it is also the dask task). Returns its summary; a failed run is reported, not raised."""
    from jacana.analysis.optimize import run_optimize

    out = Path(out)
    spec = AnalysisSpec(spec_dict, source=options.get("source", "<multistart>")).with_params(point)
    result = _reusable(out, point, settings)
    if result is not None:
        return {**_summary(k, point, out, result, None), "reused": True}
    try:
        result = run_optimize(spec, train, validation, out, settings, **options.get("run", {}))
    except JacanaError as exc:
        return _summary(k, point, out, None, f"{type(exc).__name__}: {exc}")
    return _summary(k, point, out, OptimizationResult.of(result, out / "result.json"), None)


def _stats(values: Sequence[float]) -> dict:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if a.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def spread(starts: Sequence[Mapping]) -> dict:
    """mean, std (sample), min, max of the final parameters and objectives over the successful starts."""
    ok = [s for s in starts if s.get("final_params")]
    names = [k for k, v in ok[0]["final_params"].items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)] if ok else []  # the named cuts
    return {"params": {n: _stats([s["final_params"][n] for s in ok
                                  if isinstance(s["final_params"].get(n), (int, float))]) for n in names},
            "heldout_sigma_mu": _stats([s["heldout_sigma_mu"] for s in ok]),
            "train_hard_objective": _stats([s["train_hard_objective"] for s in ok]),
            "succeeded": len(ok), "failed": len(starts) - len(ok)}


def _dask_client(client, workers, scheduler, profile):
    """(client, things to close) for the parallel mode; the jacana worker plugin is registered."""
    from jacana.facility.plugin import JacanaWorkerPlugin
    from jacana.facility.errors import FacilityError
    from jacana.facility.profiles import connect, connect_scheduler, load_profile, plugin_for

    closers: list = []
    prof = None
    if client is None:
        if scheduler is not None:
            client = connect_scheduler(scheduler)
        else:
            prof = load_profile(profile or "local", workers=workers)
            client, cluster = connect(prof)
            if cluster is not None:
                closers.append(cluster)
        closers.insert(0, client)
    try:
        client.register_plugin(plugin_for(prof) if prof else JacanaWorkerPlugin(), name="jacana")
    except FacilityError:
        raise
    except Exception as exc:
        for c in closers:
            c.close()
        raise FacilityError(f"setting up the dask workers failed: {type(exc).__name__}: {exc}") from exc
    return client, closers


def run_multistart(spec: AnalysisSpec, train: Fileset, validation: Fileset, out_dir: str | Path, settings,
                   starts: int, seed: int = 0, spread_fraction: float = DEFAULT_SPREAD,
                   names: Sequence[str] | None = None, workers: int | None = None, scheduler: str | None = None,
                   client=None, profile: str | None = None, progress: bool = True, on_bad_file: str = "fail",
                   plots: bool = True, impacts: bool = False, resume: bool = False) -> dict:
    """K optimisations from :func:`start_points`, sequential here or parallel on dask; writes ``multistart.json``."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if names is None and settings.free is not None:  # only the free cuts are spread; the others stay
        names = list(settings.free)
    points = start_points(spec, starts, seed=seed, spread=spread_fraction, names=names)
    parallel = any(x is not None for x in (client, scheduler, profile)) or bool(workers)
    run_opts = {"resume": resume, "on_bad_file": on_bad_file, "plots": plots, "impacts": impacts,
                "progress": progress and not parallel}
    options = {"run": run_opts, "source": spec.source}
    spec_dict = spec.to_dict()
    doc = {"starts": starts, "seed": seed, "spread": spread_fraction, "parallel": parallel,
           "settings": settings.to_json(), "start_points": points, "runs": []}
    dirs = [str(out / f"start_{k}") for k in range(starts)]
    if parallel:
        dask_client, closers = _dask_client(client, workers, scheduler, profile)
        try:
            from distributed import as_completed
            from tqdm.auto import tqdm

            futures = [dask_client.submit(run_start, k, spec_dict, points[k], train, validation, dirs[k], settings,
                                          options, pure=False, key=f"jacana-multistart-{k}-{time.time_ns()}")
                       for k in range(starts)]
            for _ in tqdm(as_completed(futures, loop=dask_client.loop), total=starts, desc="multistart", unit="start",
                          disable=not progress):
                pass
            runs = dask_client.gather(futures)
        finally:
            for c in closers:
                c.close()
    else:
        runs = []
        for k in range(starts):
            if progress:
                print(f"jacana optimize: start {k + 1}/{starts} from "
                      + ", ".join(f"{n} {v:.4g}" for n, v in points[k].items()), flush=True)
            runs.append(run_start(k, spec_dict, points[k], train, validation, dirs[k], settings, options))
            doc["runs"] = runs
            write_json(out / "multistart.json", doc)  # partial: a reader sees the starts done so far
    runs = sorted(runs, key=lambda r: r["start"])
    doc["runs"] = runs
    doc["spread"] = spread(runs)
    ok = [r for r in runs if r.get("heldout_sigma_mu") is not None]
    if ok:
        best = min(ok, key=lambda r: r["heldout_sigma_mu"])
        doc["best_start"] = {"start": best["start"], "heldout_sigma_mu": best["heldout_sigma_mu"],
                             "final_params": best["final_params"]}
    doc["passes"] = {"train": sum(r.get("passes", 0) for r in runs)}
    doc["seconds"] = time.perf_counter() - t0
    if plots:
        from jacana.analysis.studies.trustplots import multistart_spread

        doc["plot"] = str(multistart_spread(runs, spec, out / "plots" / "multistart.png"))
    write_json(out / "multistart.json", doc)
    return doc


def format_summary(doc: Mapping) -> str:
    s = doc["spread"]
    lines = [(f"  {s['succeeded']} of {doc['starts']} starts succeeded ({doc['seconds']:.0f} s,"
             f" {doc['passes']['train']} training passes in all)")]
    for name, st in s["params"].items():
        if st["n"]:
            lines.append(f"  {name}: mean {st['mean']:.4g}, std {st['std']:.3g},"
                         f" range [{st['min']:.4g}, {st['max']:.4g}]")
    h = s["heldout_sigma_mu"]
    if h["n"]:
        lines.append(f"  held-out sigma_mu: mean {h['mean']:.5f}, std {h['std']:.2g},"
                     f" range [{h['min']:.5f}, {h['max']:.5f}]")
    for r in doc["runs"]:
        if r.get("error"):
            lines.append(f"  start {r['start']} FAILED: {r['error']}")
    return "\n".join(lines)


def cli_multistart(args, spec: AnalysisSpec, train: Fileset, validation: Fileset, settings) -> int:
    """``jacana optimize --starts K`` (called by :func:`jacana.cli.main.cmd_optimize`)."""
    doc = run_multistart(spec, train, validation, args.out, settings, starts=args.starts,
                         seed=getattr(args, "start_seed", 0),
                         spread_fraction=getattr(args, "start_spread", DEFAULT_SPREAD),
                         workers=args.workers, scheduler=args.scheduler, profile=args.profile,
                         progress=not args.quiet, on_bad_file=args.on_bad_file, plots=not args.no_plots,
                         resume=args.resume)
    out = Path(args.out).resolve()
    how = "parallel on dask" if doc["parallel"] else "one after the other"
    print(f"jacana optimize: {doc['starts']} starts ({how})")
    print(format_summary(doc))
    print(f"jacana: results in {out} (multistart.json, start_<k>/)" + ("" if args.no_plots else
                                                                      f"; plot {out / 'plots' / 'multistart.png'}"))
    if doc["spread"]["succeeded"]:
        print(f"jacana: to see every start on the hard landscape: jacana scan --params NAME=LO:HI:N [NAME=LO:HI:N]"
              f" --gradient-result {out} --out SCAN_DIR")
    return 0 if doc["spread"]["succeeded"] else 1
