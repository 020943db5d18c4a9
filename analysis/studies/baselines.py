"""``jacana baselines``: gradient-free optimisers of the hard analysis, with the gradient's budget accounting.

What people use today to tune cuts (a grid, random search, an evolutionary strategy) runs here
on the *same* objective the gradient optimiser is judged on: the conventional hard analysis
with pyhf's expected uncertainty on the POI (:class:`~jacana.analysis.studies.hardobjective.HardObjective`),
optimised on the training events, the best point then checked on the held-out events.

Budget accounting, shared with ``jacana optimize``: a *full pass* is one pass over the training
events. A hard evaluation is one pass; a gradient step is one pass (Jacobian mode returns
yields and their Jacobian together), and every extra evaluation the gradient run makes on its
training events (the hard-limit checks every ``hard_every`` steps, the hard objective at the
end, a template after a resume) is one more: ``jacana optimize`` counts them as it goes
(``passes`` in its result; :func:`gradient_passes`). Held-out
evaluations are reporting, not optimisation: they are counted apart, for every method alike.
With ``--scan`` of a ``jacana scan --bootstrap`` on the same held-out events, every method's
held-out point is also evaluated on the scan's bootstrap replicas and compared with the grid's
best replica by replica (``heldout_noise``: is it worse beyond the Monte Carlo noise?).

Methods
    ``random``: the AGC point, then uniform samples over the parameter bounds (seeded).
    ``cmaes``: CMA-ES (the ``cma`` package) in bound-normalised coordinates, starting at the AGC
    point; a last generation that does not fit in the budget is evaluated without updating.
    ``grid``: a grid over one or two parameters (the others at the AGC point).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from jacana.analysis.results import GradientOptimum, OptimizationResult, recorded_passes
from jacana.analysis.studies.hardobjective import HardObjective, check_names
from jacana.facility.atomic import atomic_path, write_json
from jacana.facility.hardrun import DEFAULT_CHUNK_SIZE, ColumnStore, analysis_chunks
from jacana.stages.errors import ConfigError
from jacana.stages.fileset import Fileset
from jacana.stages.spec import AnalysisSpec

METHODS = ("random", "cmaes", "grid")
DEFAULT_BUDGET = 60
DEFAULT_GRID = ("jet_pt_min=20:40:9", "btag_min=0.3:0.7:9")
#: ``within 1 %``: the tolerance for "reached the best" in the comparison table
REACH_TOLERANCE = 0.01


def default_names(spec: AnalysisSpec) -> list[str]:
    """The parameters the gradient optimiser tunes (the cut thresholds) that ``spec`` has."""
    from jacana.stages.analysis import param_names

    return [n for n in param_names(spec) if n in spec.parameters]


class _Run:
    """Book-keeping of one method: every evaluation, the best so far, held-out checks of improvements."""

    def __init__(self, method: str, objective: HardObjective, budget: int, heldout: HardObjective | None,
                 trace_heldout: bool, progress: bool):
        self.method, self.objective, self.budget = method, objective, budget
        self.heldout, self.trace_heldout = heldout, trace_heldout
        self.start = objective.passes
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_so_far: list[tuple[int, float]] = []
        self.heldout_trace: list[dict] = []
        self.heldout_evaluations = 0
        self.heldout_error: str | None = None  # e.g. pyhf's NaN where a small sample has negative yields
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=budget, desc=method, unit="pass", disable=not progress)

    @property
    def used(self) -> int:
        return self.objective.passes - self.start

    @property
    def left(self) -> int:
        return self.budget - self.used

    def __call__(self, point: Mapping[str, float]) -> float:
        entry = self.objective.evaluate(point)
        self.bar.update(0 if entry.get("cached") else 1)
        entry = {"pass": self.used, **{k: entry[k] for k in ("params", "sigma_mu") if k in entry},
                 **({"error": entry["error"]} if "error" in entry else {})}
        self.history.append(entry)
        s = entry["sigma_mu"]
        if s is not None and (self.best is None or s < self.best["sigma_mu"]):
            self.best = entry
            self.best_so_far.append((self.used, s))
            if self.trace_heldout and self.heldout is not None:
                self.heldout_trace.append({"pass": self.used, "heldout_sigma_mu": self._heldout(entry["params"])})
            self.bar.set_postfix_str(f"best sigma_mu={s:.5g}")
        return math.inf if s is None else s

    def _heldout(self, params: Mapping[str, float]) -> float | None:
        self.heldout_evaluations += 1
        entry = self.heldout.evaluate(params)
        if entry.get("error"):
            self.heldout_error = entry["error"]
        return entry["sigma_mu"]

    def finish(self, **extra) -> dict:
        self.bar.close()
        if self.best is None:
            raise ConfigError(f"{self.method}: no evaluated point gave a finite sigma_mu")
        held = None
        if self.heldout is not None:
            traced = [t for t in self.heldout_trace if t["pass"] == self.best["pass"]]
            held = traced[-1]["heldout_sigma_mu"] if traced else self._heldout(self.best["params"])
        return {"method": self.method, "passes": self.used, "budget": self.budget,
                "events_per_pass": self.objective.n_events, "params": self.best["params"],
                "train_sigma_mu": self.best["sigma_mu"], "best_at_pass": self.best["pass"],
                "heldout_sigma_mu": held, "heldout_evaluations": self.heldout_evaluations,
                **({"heldout_error": self.heldout_error} if held is None and self.heldout_error else {}),
                "best_so_far": self.best_so_far, "heldout_trace": self.heldout_trace, "history": self.history,
                "seconds": time.perf_counter() - self.t0, **extra}


def _bounds(spec: AnalysisSpec, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([spec.parameters[n].lower for n in names]), np.array([spec.parameters[n].upper for n in names]))


def random_search(objective: HardObjective, budget: int, names: Sequence[str] | None = None, seed: int = 0,
                  heldout: HardObjective | None = None, trace_heldout: bool = False, progress: bool = False) -> dict:
    """The AGC point, then points drawn uniformly over the bounds of ``names`` (reproducible with ``seed``)."""
    spec = objective.spec
    names = list(names or default_names(spec))
    check_names(spec, names)
    if budget < 1:
        raise ConfigError(f"budget must be >= 1 full pass, got {budget}")
    lo, hi = _bounds(spec, names)
    rng = np.random.default_rng(seed)
    run = _Run("random", objective, budget, heldout, trace_heldout, progress)
    run({n: spec.parameters[n].value for n in names})
    while run.left > 0:
        x = lo + rng.random(len(names)) * (hi - lo)
        run(dict(zip(names, map(float, x))))
    return run.finish(seed=seed, names=names)


def cma_es(objective: HardObjective, budget: int, names: Sequence[str] | None = None, seed: int = 0,
           sigma0: float = 0.2, popsize: int | None = None, heldout: HardObjective | None = None,
           trace_heldout: bool = False, progress: bool = False) -> dict:
    """CMA-ES on the bound-normalised parameters (each in [0, 1]), from the AGC point, step ``sigma0``."""
    import cma

    spec = objective.spec
    names = list(names or default_names(spec))
    check_names(spec, names)
    if budget < 1:
        raise ConfigError(f"budget must be >= 1 full pass, got {budget}")
    lo, hi = _bounds(spec, names)
    x0 = (np.array([spec.parameters[n].value for n in names]) - lo) / (hi - lo)
    opts = {"bounds": [0.0, 1.0], "seed": int(seed) + 1,  # cma: seed 0 means "from the clock"
            "verbose": -9, "maxfevals": budget, "tolx": 1e-6, "tolfun": 1e-9}
    if popsize:
        opts["popsize"] = int(popsize)
    es = cma.CMAEvolutionStrategy(np.clip(x0, 1e-9, 1 - 1e-9).tolist(), sigma0, opts)
    run = _Run("cmaes", objective, budget, heldout, trace_heldout, progress)
    worst = 1.0

    def f(u) -> float:
        nonlocal worst
        x = lo + np.clip(np.asarray(u, dtype=float), 0.0, 1.0) * (hi - lo)
        value = run(dict(zip(names, map(float, x))))
        if math.isfinite(value):
            worst = max(worst, value)
            return value
        return 10.0 * worst  # a failed point is worse than any computed one

    generations = 0
    stop: dict = {}
    while run.left > 0:
        xs = es.ask()
        if len(xs) > run.left:  # the budget ends inside this generation: spend it, update nothing
            for u in xs[:run.left]:
                f(u)
            stop = {"budget": budget}
            break
        es.tell(xs, [f(u) for u in xs])
        generations += 1
        stop = dict(es.stop())
        if stop:
            break
    return run.finish(seed=seed, names=names, sigma0=sigma0, popsize=es.popsize, generations=generations,
                      stopped=stop or {"budget": budget})


def grid_search(objective: HardObjective, axes: Sequence, heldout: HardObjective | None = None,
                trace_heldout: bool = False, progress: bool = False) -> dict:
    """Every point of a grid (:class:`jacana.analysis.studies.scan.Axis`), the other parameters at the config's values."""
    from jacana.analysis.studies.scan import grid_points

    points = grid_points(axes)
    run = _Run("grid", objective, len(points), heldout, trace_heldout, progress)
    for _, values in points:
        run(values)
    return run.finish(grid=[a.to_dict() for a in axes])


def gradient_passes(result: OptimizationResult | Mapping) -> dict:
    """Full passes over the training events a ``jacana optimize`` result used (see the module docstring);
    for a result.json made before the count was recorded, reconstructed
    (:func:`~jacana.analysis.results.recorded_passes`)."""
    return dict(result.passes) if isinstance(result, OptimizationResult) else recorded_passes(result)


def gradient_row(gradient: str | Path | GradientOptimum, heldout: HardObjective | None = None,
                 spec: AnalysisSpec | None = None, grid_best: Mapping | None = None,
                 method: str = "gradient (jacana)") -> dict:
    """The comparison row of a gradient run (its result.json, or it loaded by
    :func:`~jacana.analysis.studies.scan.load_gradient_result`); re-evaluated on ``heldout`` when given (and,
    with the held-out ``grid_best`` point of a bootstrap scan, judged against it: ``heldout_noise``).
    ``train_fileset``: the events it was trained on."""
    from jacana.analysis.studies.scan import load_gradient_result

    g = gradient if isinstance(gradient, GradientOptimum) else load_gradient_result(gradient)
    if spec is not None:
        g = g.for_parameters(spec.parameters)
    result = g.result
    passes = result.passes
    own = result.sigma_mu_after
    entry = (heldout.evaluate(g.params, g.extra or None, overrides=g.overrides or None)
             if heldout is not None else {"sigma_mu": own})
    held = entry["sigma_mu"]
    trace, best, used = [], math.inf, 1  # older results: template, then per step 1 or 2 (+1 with a hard check)
    for h in result.history:
        used = h.get("passes", used + result.passes_per_step + (h.get("hard_objective") is not None))
        if h.get("hard_objective") is not None and h["hard_objective"] < best:
            best = h["hard_objective"]
            trace.append((used, best))
    final_hard = result.hard_limit
    if final_hard is not None and final_hard < best:
        trace.append((result.train_passes, final_hard))
    events = result.events or {}
    return {"method": method, "passes": result.train_passes, "passes_detail": dict(passes),
            "events_per_pass": events.get("train"), "train_fileset": events.get("train_fileset"), "params": g.params,
            "train_sigma_mu": final_hard, "heldout_sigma_mu": held, "heldout_sigma_mu_own_validation": own,
            "best_so_far": trace, "seconds": result.seconds, "source": g.path,
            "objective": result.objective, "heldout_noise": _noise(entry, grid_best)}


def _same_fileset(a: str, b: str) -> bool:
    """Two fileset sources (paths, or names of embedded samples) name the same events."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


def _noise(entry: Mapping, best: Mapping | None) -> dict | None:
    from jacana.analysis.studies.scan import paired_noise

    return paired_noise(entry, best) if best is not None else None


def scan_bootstrap(scan: str | Path | None, spec: AnalysisSpec, validation: Fileset,
                   n_events: int) -> tuple[dict | None, str | None]:
    """(``{"replicas", "seed", "z", "best", "points"}``, None) of a finished bootstrap scan of the same
    config on the same held-out events, so each method's held-out point can be judged against the
    grid's best replica by replica (and the scan's points cost no pass); else (None, why not)."""
    from jacana.analysis.studies.scan import point_at, reuse_context

    if not scan:
        return None, None
    doc = _scan_doc(scan)
    noise = doc.get("within_noise_of_best")
    if not noise:
        why = "it was made without --bootstrap"
    elif doc.get("fileset") != validation.source:
        why = f"it scanned {doc.get('fileset')}, not the held-out {validation.source}"
    elif doc.get("events") != n_events:
        why = f"it had {doc.get('events')} events, the held-out fileset {n_events}"
    elif (doc.get("context") or {}).get("config") != reuse_context(spec, validation, n_events, {})["config"]:
        why = "it was made with another config"
    else:
        why = None
    if why:
        return None, f"the scan's bootstrap replicas are not used: {why}"
    points = [p for p in doc["points"] + [doc.get("agc")] if p and p.get("sigma_mu_replicas")]
    return {"replicas": int(noise["replicas"]), "seed": int(noise.get("seed", 0)), "z": noise["z"],
            "best": point_at(doc, doc["best"]["index"]), "points": points}, None


def scan_row(path: str | Path) -> dict:
    """A row for a finished ``jacana scan`` (scan.json): selected on the held-out events themselves."""
    scan = _scan_doc(path)
    path = scan["_path"]
    names = " x ".join(f"{a['name']}[{a['n']}]" for a in scan["parameters"])
    return {"method": f"grid scan {names} (held-out, optimistic)", "passes": len(scan["points"]),
            "events_per_pass": scan["events"], "params": scan["best"]["params"], "train_sigma_mu": None,
            "heldout_sigma_mu": scan["best"]["sigma_mu"], "source": str(path),
            "note": "chosen on the held-out events themselves: an optimistic reference, not a fair competitor"}


def _scan_doc(path: str | Path) -> dict:
    """A finished scan.json (or the folder holding it), with ``_path``."""
    path = Path(path)
    if path.is_dir():
        path = path / "scan.json"
    if not path.is_file():
        raise ConfigError(f"scan result {str(path)!r} does not exist")
    scan = json.loads(path.read_text())
    if not scan.get("complete"):
        raise ConfigError(f"scan {str(path)!r} is not complete; finish it first (jacana scan resumes)")
    return {**scan, "_path": str(path)}


def _noise_cell(noise: Mapping | None) -> str:
    if not noise:
        return "-"
    verdict = "within" if noise["within_noise"] else "**beyond**"
    return f"{noise['diff_to_best']:+.5f} +- {noise['diff_sd']:.5f} ({verdict})"


def _fmt(x, spec="{:.5f}") -> str:
    return "-" if x is None else spec.format(x)


def comparison_table(rows: Sequence[Mapping], agc_heldout: float | None = None) -> tuple[list[dict], str]:
    """(rows without histories, markdown table): method, passes, held-out sigma_mu and how it compares."""
    held = [r["heldout_sigma_mu"] for r in rows if r.get("heldout_sigma_mu") is not None]
    best_held = min(held) if held else None
    # a run trained on other events has its own training sigma_mu: no race to the best of these
    trained = [r for r in rows if r.get("best_so_far") and not r.get("other_training_events")]
    racing = {id(r) for r in trained}
    best_train = min((r["train_sigma_mu"] for r in trained if r.get("train_sigma_mu") is not None), default=None)
    out = []
    for r in rows:
        row = {k: v for k, v in r.items() if k not in ("history", "best_so_far", "heldout_trace")}
        if agc_heldout and r.get("heldout_sigma_mu") is not None:
            row["heldout_over_agc"] = r["heldout_sigma_mu"] / agc_heldout
        if best_held and r.get("heldout_sigma_mu") is not None:
            row["heldout_over_best"] = r["heldout_sigma_mu"] / best_held
        if best_train is not None and id(r) in racing:
            reach = [p for p, s in r["best_so_far"] if s <= best_train * (1 + REACH_TOLERANCE)]
            row["passes_to_reach_best_train"] = reach[0] if reach else None
        out.append(row)
    noisy = any(r.get("heldout_noise") for r in out)
    lines = [("| method | full passes | events / pass | best training sigma_mu | passes to within 1 % of the best"
             " training sigma_mu | held-out sigma_mu | vs AGC | vs best held-out |"
              + (" minus the held-out grid's best (paired bootstrap; within its noise?) |" if noisy else "")
              + " parameters |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if noisy else "") + "---|"]
    for r in out:
        params = ", ".join(f"{k} {v:.4g}" for k, v in (r.get("params") or {}).items())
        ev = r.get("events_per_pass")
        lines.append(
            f"| {r['method']} | {r['passes']} | {'-' if ev is None else f'{ev:,}'} | {_fmt(r.get('train_sigma_mu'))}"
            f" | {_fmt(r.get('passes_to_reach_best_train'), '{}')} | {_fmt(r.get('heldout_sigma_mu'))}"
            f" | {_fmt(r.get('heldout_over_agc'), '{:.3f}')} | {_fmt(r.get('heldout_over_best'), '{:.3f}')}"
            + (f" | {_noise_cell(r.get('heldout_noise'))}" if noisy else "") + f" | {params} |")
    if agc_heldout is not None:
        lines.append(f"\nAGC cuts (no optimisation): held-out sigma_mu {agc_heldout:.5f}.")
    for r in out:
        if r.get("other_training_events"):
            lines.append(f"\n{r['method']} was trained on other events ({r['other_training_events']}): its training"
                         " sigma_mu is on those, not comparable with the other rows'; its held-out one is.")
    return out, "\n".join(lines) + "\n"


def train_and_validation(fileset: str | None, validation_fileset: str | None, events: int | None,
                         progress: bool = True) -> tuple[Fileset, Fileset]:
    """The training and held-out filesets, chosen as ``jacana optimize`` chooses them."""
    from jacana.samples.datasets import DEFAULT_EVENTS, DEFAULT_TRAIN_EVENTS, default_fileset
    from jacana.stages.fileset import load_fileset

    if fileset:
        train = load_fileset(fileset)
        if validation_fileset:
            return train, load_fileset(validation_fileset)
        return train.split_alternate()
    train = load_fileset(default_fileset("optimize", events=events or DEFAULT_TRAIN_EVENTS, progress=progress))
    validation = load_fileset(validation_fileset or default_fileset("validate", events=events or DEFAULT_EVENTS,
                                                                    progress=progress))
    return train, validation


def run_baselines(spec: AnalysisSpec, train: Fileset, validation: Fileset, out_dir: str | Path,
                  methods: Sequence[str] = ("random", "cmaes"), budget: int = DEFAULT_BUDGET, seed: int = 0,
                  names: Sequence[str] | None = None, grid: Sequence[str] = DEFAULT_GRID,
                  gradient_results: Sequence[str | Path] = (), scan: str | Path | None = None,
                  trace_heldout: bool = False, progress: bool = True, plots: bool = True,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, on_bad_file: str = "fail",
                  on_method: Callable[[dict], None] | None = None) -> dict:
    """Run ``methods`` on ``train``, check each best point on ``validation``, write the comparison.

    ``gradient_results``: gradient runs to add as rows (result.json files or folders, multi-start
    folders: see :func:`~jacana.analysis.studies.scan.load_gradient_results`), on the same held-out events.

    Writes ``baselines.json`` (every evaluation of every method, rewritten after each method),
    ``comparison.json`` and ``comparison.md`` (the table) and ``plots/convergence.png``.
    """
    from jacana.analysis.studies.scan import load_gradient_results, parse_axes

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"methods must be some of {', '.join(METHODS)}, got {list(methods)}")
    if budget < 1:
        raise ConfigError(f"budget must be >= 1 full pass, got {budget}")
    axes = parse_axes(list(grid), spec) if "grid" in methods else None
    if names is not None:
        check_names(spec, list(names))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = ColumnStore(spec)  # training columns, read once, shared by every method (each counts its own passes)
    n_heldout = sum(c.n_events for c in analysis_chunks(spec, validation, chunk_size))
    ref, why_not = scan_bootstrap(scan, spec, validation, n_heldout)  # judge every held-out point on its replicas
    if why_not and progress:
        print(f"jacana baselines: {why_not}")
    heldout = HardObjective(spec, validation, chunk_size=chunk_size, on_bad_file=on_bad_file,
                            bootstrap=ref["replicas"] if ref else 0, bootstrap_seed=ref["seed"] if ref else 0)
    if ref:  # the scan's evaluations (its grid and the AGC point) cost no pass
        heldout.seed(ref["points"])
    agc = heldout.evaluate(spec.param_values())["sigma_mu"]
    rows: list[dict] = []
    doc = {"budget": budget, "seed": seed, "train_fileset": train.source, "validation_fileset": validation.source,
           "validation_events": heldout.n_events, "agc": {"params": spec.param_values(), "heldout_sigma_mu": agc},
           "methods": rows}

    def objective() -> HardObjective:
        return HardObjective(spec, train, chunk_size=chunk_size, on_bad_file=on_bad_file, store=store)

    for method in methods:
        common = {"heldout": heldout, "trace_heldout": trace_heldout, "progress": progress}
        if method == "random":
            row = random_search(objective(), budget, names, seed=seed, **common)
        elif method == "cmaes":
            row = cma_es(objective(), budget, names, seed=seed, **common)
        else:
            row = grid_search(objective(), axes, **common)
        if ref and row.get("heldout_sigma_mu") is not None:  # the point was evaluated: answered from memory
            row["heldout_noise"] = _noise(heldout.evaluate(row["params"]), ref["best"])
        rows.append(row)
        write_json(out / "baselines.json", doc)
        if on_method is not None:
            on_method(row)
    rows = list(rows)  # baselines.json keeps the methods run here; the table adds the references
    gradients = load_gradient_results(gradient_results)
    for g in gradients:
        row = gradient_row(g, heldout=heldout, spec=spec, grid_best=ref["best"] if ref else None,
                           method="gradient (jacana)" if len(gradients) == 1 else f"gradient (jacana, {g.label})")
        if row["train_fileset"] and not _same_fileset(row["train_fileset"], train.source):
            row["other_training_events"] = row["train_fileset"]
        rows.append(row)
    if scan:
        rows.append(scan_row(scan))
    table_rows, markdown = comparison_table(rows, agc)
    doc["seconds"] = time.perf_counter() - t0
    comparison = {"rows": table_rows, "agc_heldout_sigma_mu": agc, "validation_fileset": validation.source,
                  "validation_events": heldout.n_events, "train_fileset": train.source,
                  "reach_tolerance": REACH_TOLERANCE,
                  "bootstrap": {k: ref[k] for k in ("replicas", "seed", "z")} if ref else None,
                  "bootstrap_not_used": why_not}
    if plots:
        from jacana.analysis.studies.trustplots import baseline_convergence

        comparison["plot"] = str(baseline_convergence(rows, out / "plots" / "convergence.png"))
    write_json(out / "baselines.json", doc)
    write_json(out / "comparison.json", comparison)
    with atomic_path(out / "comparison.md") as tmp:
        tmp.write_text(markdown)
    return {"rows": table_rows, "markdown": markdown, "agc_heldout_sigma_mu": agc, "doc": doc}
