"""``jacana optimize``: the whole AGC analysis optimised end to end for its expected sensitivity.

One step: the executor returns the soft yields of every (sample, file variation) with their
Jacobians in the cut parameters (forward mode, one pass over the cached events); the driver
evaluates the objective on the pyhf model built from those yields, takes its gradient with
respect to the yields, and contracts it with the Jacobians. optax (Adam, per-parameter step
sizes in physical units, projected onto the parameter bounds) updates the parameters; the
relaxation (cut temperatures, trijet softmax, histogram bandwidth) is annealed toward the hard
limit on a geometric schedule. Every step is checkpointed atomically; ``resume`` continues
from the checkpoint and reaches the same final parameters as an uninterrupted run.

Before and after, the conventional hard analysis runs on *independent* events (the validation
fileset) and pyhf's own numpy inference reports the expected uncertainty: the honest figure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jacana.facility.atomic import write_json
from jacana.facility.executor import contract_all
from jacana.facility.hardrun import DEFAULT_CHUNK_SIZE, ColumnStore, InputReport, analysis_chunks
from jacana.stages.analysis import PARAM_NAMES, default_relax, hard_relax
from jacana.stages.errors import ConfigError, JacanaError
from jacana.stages.fileset import Fileset
from jacana.stages.sensitivity import Sensitivity
from jacana.stages.spec import AnalysisSpec

CHECKPOINT = "checkpoint.json"
CHECKPOINT_VERSION = 1


class OptimizationError(JacanaError, RuntimeError):
    """The optimisation stopped (NaN or diverging objective); the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class OptimizeSettings:
    """How the optimisation runs (everything that must match for ``--resume``)."""

    steps: int = 60
    objective: str = "sigma_mu"
    relax_start: float = 1.0  # relaxation scale at step 0 (1 = the config's temperatures)
    relax_end: float = 0.1  # scale reached at the end of annealing
    anneal_fraction: float = 0.75  # fraction of the steps over which the relaxation anneals
    hard_every: int = 10  # evaluate the hard-limit objective every this many steps
    patience: int = 20  # early stopping: steps after annealing without improvement
    min_improvement: float = 1e-4  # relative improvement that counts
    diverge_factor: float = 10.0  # loss above this multiple of the first step's stops the run
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def relax_scale(self, step: int) -> float:
        n = max(1, int(round(self.anneal_fraction * self.steps)))
        t = min(step, n) / n
        return float(self.relax_start * (self.relax_end / self.relax_start) ** t)

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if not 0 < self.relax_end <= self.relax_start:
            raise ConfigError(f"need 0 < relax_end <= relax_start, got {self.relax_end}, {self.relax_start}")
        if not 0 < self.anneal_fraction <= 1:
            raise ConfigError(f"anneal_fraction must be in (0, 1], got {self.anneal_fraction}")


def _optimizer(spec: AnalysisSpec) -> optax.GradientTransformation:
    """Adam normalises each gradient; the step in physical units is the parameter's learning rate."""
    rates = {k: spec.parameters[k].learning_rate for k in PARAM_NAMES}

    def update(updates, state, params=None):
        return {k: -rates[k] * u for k, u in updates.items()}, state

    return optax.chain(optax.scale_by_adam(), optax.GradientTransformation(lambda p: optax.EmptyState(), update))


def _project(params: Mapping, spec: AnalysisSpec) -> dict:
    return {k: float(np.clip(v, spec.parameters[k].lower, spec.parameters[k].upper)) for k, v in params.items()}


def _as_jax(params: Mapping) -> dict:
    return {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}


def _finite(x) -> bool:
    return all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(x))


class Optimizer:
    """The optimisation loop over an executor's cached events (see the module docstring)."""

    def __init__(self, spec: AnalysisSpec, executor, settings: OptimizeSettings, out_dir: str | Path,
                 progress: bool = True):
        settings.validate()
        self.spec, self.executor, self.settings = spec, executor, settings
        self.out = Path(out_dir)
        self.progress = progress
        self.tx = _optimizer(spec)
        self._value_and_grad: Callable | None = None
        self.objective: Sensitivity | None = None

    # -- one evaluation -------------------------------------------------------------------
    def _yields(self, params: Mapping, relax: Mapping) -> dict:
        # The Jacobian path serves forward evaluations too: one compiled program per shape, not two.
        return self.executor.yields_and_jacobian(_as_jax(params), relax)[0]

    def _ensure_objective(self, params: Mapping) -> None:
        if self.objective is None:
            template = self._yields(params, default_relax(self.spec, self.settings.relax_start))
            self.objective = Sensitivity(self.spec, self.executor.config, template, self.settings.objective)
            self._value_and_grad = jax.jit(jax.value_and_grad(self.objective))
            self._value = jax.jit(self.objective)

    def value_and_grad(self, params: Mapping, relax: Mapping) -> tuple[float, dict]:
        """Loss and d(loss)/d(params) at ``params`` (Jacobian mode: one pass over the events)."""
        self._ensure_objective(params)
        ylds, jacs = self.executor.yields_and_jacobian(_as_jax(params), relax)
        value, cotangents = self._value_and_grad(ylds)
        grad = contract_all(jacs, cotangents)
        return float(value), {k: float(grad[k]) for k in PARAM_NAMES}

    def loss(self, params: Mapping, relax: Mapping) -> float:
        self._ensure_objective(params)
        return float(self._value(self._yields(params, relax)))

    def hard_loss(self, params: Mapping) -> float:
        """The loss in the exact hard limit on the optimisation events (same pipeline, zero temperatures)."""
        return self.loss(params, hard_relax())

    # -- the loop -------------------------------------------------------------------------
    def run(self, initial: Mapping[str, float], resume: bool = False,
            on_step: Callable[[dict], None] | None = None) -> dict:
        s = self.settings
        state = self._load_checkpoint() if resume else None
        if state is None:
            params = _project(initial, self.spec)
            opt_state = self.tx.init(_as_jax(params))
            history: list[dict] = []
            start, best, stale, first_loss = 0, math.inf, 0, None
        else:
            params, history = state["params"], state["history"]
            opt_state = jax.tree.unflatten(jax.tree.structure(self.tx.init(_as_jax(params))),
                                           [jnp.asarray(x) for x in state["opt_state"]])
            start, best, stale, first_loss = state["step"] + 1, state["best"], state["stale"], state["first_loss"]
        stopped = "steps"
        bar = tqdm(range(start, s.steps), initial=start, total=s.steps, desc=f"optimize {s.objective}",
                   disable=not self.progress, unit="step")
        for step in bar:
            scale = s.relax_scale(step)
            t0 = time.perf_counter()
            value, grad = self.value_and_grad(params, default_relax(self.spec, scale))
            if not (math.isfinite(value) and all(math.isfinite(g) for g in grad.values())):
                raise OptimizationError(
                    f"step {step}: objective or gradient is not finite (loss={value}, grad={grad}); stopped, the last"
                    f" good state is in {self.out / CHECKPOINT}")
            first_loss = value if first_loss is None else first_loss
            if abs(value) > s.diverge_factor * abs(first_loss) + 1e-12 and step > 0:
                raise OptimizationError(
                    f"step {step}: the objective diverged ({value:.4g} vs {first_loss:.4g} at the start); stopped,"
                    f" the last good state is in {self.out / CHECKPOINT}")
            entry = {"step": step, "params": dict(params), "objective": self.objective.physical(value),
                     "loss": value, "grad": grad, "relax_scale": scale, "seconds": time.perf_counter() - t0,
                     "hard_objective": None}
            if s.hard_every and (step % s.hard_every == 0 or step == s.steps - 1):
                entry["hard_objective"] = self.objective.physical(self.hard_loss(params))
            history.append(entry)
            annealed = step >= int(round(s.anneal_fraction * s.steps))
            if annealed:
                if value < best * (1 - s.min_improvement) if best > 0 else value < best - s.min_improvement:
                    best, stale = value, 0
                else:
                    stale += 1
            updates, opt_state = self.tx.update({k: jnp.asarray(v) for k, v in grad.items()}, opt_state)
            params = _project({k: params[k] + float(updates[k]) for k in params}, self.spec)
            self._save_checkpoint(step, params, opt_state, history, best, stale, first_loss)
            bar.set_postfix_str(f"{s.objective}={entry['objective']:.5g} " + " ".join(
                f"{k}={v:.3g}" for k, v in params.items()))
            if on_step is not None:
                on_step(entry)
            if annealed and stale >= s.patience:
                stopped = "early_stopping"
                break
        bar.close()
        return {"params": params, "history": history, "stopped": stopped}

    # -- checkpoints ----------------------------------------------------------------------
    def _save_checkpoint(self, step, params, opt_state, history, best, stale, first_loss) -> None:
        write_json(self.out / CHECKPOINT, {
            "version": CHECKPOINT_VERSION, "step": step, "params": params,
            "opt_state": [np.asarray(x).tolist() for x in jax.tree.leaves(opt_state)],
            "history": history, "best": best if math.isfinite(best) else None, "stale": stale,
            "first_loss": first_loss, "settings": dataclasses.asdict(self.settings),
            "spec": self.spec.to_dict(),
        }, indent=None)

    def _load_checkpoint(self) -> dict | None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as exc:  # atomic writes make this a foreign or damaged file
            raise OptimizationError(f"checkpoint {path} is not valid JSON ({exc}); remove it to start afresh") from None
        if state.get("version") != CHECKPOINT_VERSION:
            raise OptimizationError(f"checkpoint {path} has version {state.get('version')}, expected {CHECKPOINT_VERSION}")
        saved = dict(state["settings"])
        current = dataclasses.asdict(self.settings)
        differ = [k for k in current if k != "steps" and saved.get(k) != current[k]]
        if differ or state["spec"] != self.spec.to_dict():
            what = ", ".join(differ) or "the analysis config"
            raise OptimizationError(f"checkpoint {path} was made with different settings ({what}); cannot resume")
        state["best"] = math.inf if state["best"] is None else state["best"]
        return state


def run_optimize(spec: AnalysisSpec, train: Fileset, validation: Fileset, out_dir: str | Path,
                 settings: OptimizeSettings, resume: bool = False, progress: bool = True,
                 on_bad_file: str = "fail", plots: bool = True, impacts: bool = True,
                 workers: int | None = None, scheduler: str | None = None, client=None,
                 profile: str | None = None) -> dict:
    """The main job: optimise on ``train``, validate before and after on ``validation``, write everything.

    ``workers`` / ``scheduler`` / ``client`` / ``profile`` choose a dask executor (see
    :func:`jacana.facility.dask_executor.make_executor`); none of them runs in this process.
    """
    from jacana.facility.dask_executor import make_executor

    from jacana.analysis.evaluate import hard_evaluation
    from jacana.stages.workspace import histograms_to_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train_report, val_report = InputReport(on_bad_file), InputReport(on_bad_file)
    executor = make_executor(spec, analysis_chunks(spec, train, settings.chunk_size), workers=workers,
                             scheduler=scheduler, client=client, profile=profile, progress=progress,
                             report=train_report)
    store = ColumnStore(spec)

    def validate(params: Mapping[str, float]) -> dict:
        return hard_evaluation(spec.with_params(params), validation, store=store, chunk_size=settings.chunk_size,
                               on_bad_file=on_bad_file)

    initial = spec.param_values()
    before = validate(initial)
    opt = Optimizer(spec, executor, settings, out, progress=progress)
    try:
        outcome = opt.run(initial, resume=resume)
        final = outcome["params"]
        relax_end = default_relax(spec, settings.relax_scale(settings.steps))
        relaxed_end = opt.objective.physical(opt.loss(final, relax_end))
        hard_end = opt.objective.physical(opt.hard_loss(final))
    finally:
        executor.close()
    after = validate(final)
    b, a = before["result"]["expected"]["sigma_mu"], after["result"]["expected"]["sigma_mu"]
    result = {
        "objective": settings.objective,
        "initial_params": initial,
        "final_params": final,
        "stopped": outcome["stopped"],
        "history": outcome["history"],
        "final_objective": {"relaxed": relaxed_end, "hard_limit": hard_end,
                            "relaxed_over_hard": relaxed_end / hard_end if hard_end else None},
        "validation": {"before": before["result"], "after": after["result"],
                       "sigma_mu_ratio_after_over_before": a / b},
        "settings": dataclasses.asdict(settings),
        "events": {"train": executor.n_events, "validation_fileset": validation.source,
                   "train_fileset": train.source},
        "inputs": {"train": train_report.to_dict(), "validation": val_report.to_dict()},
        "seconds": time.perf_counter() - t_start,
    }
    write_json(out / "params.json", {"params": final})
    write_json(out / "workspace.json", after["workspace"])
    write_json(out / "histograms.json", histograms_to_json(after["histograms"]), indent=None)
    if plots:
        result["plots"] = make_plots(spec, out, result, before, after, impacts=impacts)
    write_json(out / "result.json", result)
    return result


def make_plots(spec: AnalysisSpec, out: Path, result: Mapping, before: Mapping, after: Mapping,
               impacts: bool = True) -> dict[str, str]:
    from jacana.analysis import plots
    from jacana.stages.inference import impacts as np_impacts
    from jacana.stages.workspace import pseudo_data

    d = out / "plots"
    paths = {
        "objective": plots.objective_history(result["history"], result["objective"], d / "objective.png"),
        "parameters": plots.parameter_trajectories(result["history"], spec, d / "parameters.png"),
        "before": plots.stacked_histograms(spec, before["histograms"], d / "histograms_before.png",
                                           "(AGC cuts)", pseudo_data(spec, before["histograms"])),
        "after": plots.stacked_histograms(spec.with_params(result["final_params"]), after["histograms"],
                                          d / "histograms_after.png", "(optimised)",
                                          pseudo_data(spec, after["histograms"])),
    }
    if impacts:
        paths["impacts"] = plots.impact_ranking(np_impacts(after["workspace"]), spec.poi["name"], d / "impacts.png")
    return {k: str(v) for k, v in paths.items()}
