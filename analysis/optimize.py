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
import hashlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jacana.facility.atomic import write_json
from jacana.analysis.chain import AnalysisChain, analysis_chain
from jacana.analysis.results import OptimizationResult, pass_count
from jacana.facility.hardrun import DEFAULT_CHUNK_SIZE, ColumnStore, InputReport, analysis_chunks
from jacana.stages.analysis import default_relax, hard_relax, param_names
from jacana.stages.errors import ConfigError, JacanaError
from jacana.stages.fileset import Fileset
from jacana.stages.stats.objectives import SENSE
from jacana.stages.shapes import BATCH_DTYPES
from jacana.stages.spec import AnalysisSpec

CHECKPOINT = "checkpoint.json"
CHECKPOINT_VERSION = 1


class OptimizationError(JacanaError, RuntimeError):
    """The optimisation stopped (NaN or diverging objective); the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class OptimizeSettings:
    """How the optimisation runs (everything that must match for ``--resume``)."""

    steps: int = 40
    objective: str = "sigma_mu"
    relax_start: float = 1.0  # relaxation scale at step 0 (1 = the config's temperatures)
    relax_end: float = 0.1  # scale reached at the end of annealing
    anneal_fraction: float = 0.75  # fraction of the steps over which the relaxation anneals
    hard_every: int = 5  # evaluate the hard-limit objective every this many steps (and at the last)
    patience: int = 20  # early stopping: steps after annealing without improvement
    min_improvement: float = 1e-4  # relative improvement that counts
    diverge_factor: float = 10.0  # loss above this multiple of the first step's stops the run
    chunk_size: int = DEFAULT_CHUNK_SIZE
    binning: bool = False  # optimise the interior bin edges of every region too
    edge_step: float = 0.005  # Adam step of a bin edge, as a fraction of its region's range
    min_bin_fraction: float = 0.25  # narrowest bin, as a fraction of the initial narrowest bin
    nn: bool = False  # replace the observable of ``nn_region`` by a neural network trained in place
    nn_region: str = "4j1b"
    nn_step: float = 0.02  # Adam step of a network weight
    nn_bins: int = 10  # bins of the NN observable over (0, 1)
    free: tuple[str, ...] | None = None  # the cuts optimised (None: all); the others stay at their start values
    step_fraction: float | None = 0.025  # Adam step of a cut as a fraction of its bound range (None: its learning_rate)
    step_schedule: str = "cosine"  # "cosine": the step decays to step_end x its start by the last step; or "constant"
    step_end: float = 0.1  # with the cosine schedule: the last step's size over the first's
    keep_best: bool = True  # end at the best hard-limit point (training events) among the checks and the last point
    dtype: str = "float64"  # the event batches' precision; "float32": mixed precision (float32 events, float64 sums)

    @property
    def mode(self) -> str:
        """How the gradient is computed: forward-mode Jacobians for the 4 cuts, else a VJP (2 passes)."""
        return "vjp" if self.binning or self.nn else "jacobian"

    @property
    def passes_per_step(self) -> int:
        """Full passes over the events per step: 1 in Jacobian mode, 2 (forward, then VJP) otherwise."""
        return 2 if self.mode == "vjp" else 1

    def relax_scale(self, step: int) -> float:
        n = max(1, int(round(self.anneal_fraction * self.steps)))
        t = min(step, n) / n
        return float(self.relax_start * (self.relax_end / self.relax_start) ** t)

    def step_multiplier(self, count):
        """The factor on every parameter's step at update ``count`` (0-based; traced by optax)."""
        if self.step_schedule == "constant":
            return jnp.ones_like(count, dtype=jnp.float64)
        t = jnp.minimum(count, max(1, self.steps - 1)) / max(1, self.steps - 1)
        return self.step_end + (1.0 - self.step_end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if not 0 < self.relax_end <= self.relax_start:
            raise ConfigError(f"need 0 < relax_end <= relax_start, got {self.relax_end}, {self.relax_start}")
        if not 0 < self.anneal_fraction <= 1:
            raise ConfigError(f"anneal_fraction must be in (0, 1], got {self.anneal_fraction}")
        if self.nn_bins < 2:
            raise ConfigError(f"nn_bins must be >= 2, got {self.nn_bins}")
        if self.hard_every < 0:
            raise ConfigError(f"hard_every must be >= 0 (0: no hard-limit checks), got {self.hard_every}")
        if self.step_schedule not in ("constant", "cosine"):
            raise ConfigError(f"step_schedule must be 'constant' or 'cosine', got {self.step_schedule!r}")
        if not 0 < self.step_end <= 1:
            raise ConfigError(f"step_end must be in (0, 1], got {self.step_end}")
        if self.step_fraction is not None and not 0 < self.step_fraction <= 1:
            raise ConfigError(f"step_fraction must be in (0, 1] (of each cut's bound range), got {self.step_fraction}")
        if self.free is not None and not self.free:
            raise ConfigError("free must name at least one cut parameter (or be None: all of them)")
        if self.dtype not in BATCH_DTYPES:
            raise ConfigError(f"dtype must be one of {BATCH_DTYPES}, got {self.dtype!r}")

    def free_cuts(self, spec: AnalysisSpec) -> tuple[str, ...]:
        """The cut parameters that move (checked against ``spec``; every cut when ``free`` is None)."""
        return tuple(spec.parameters) if self.free is None else free_params(spec, self.free)

    def to_json(self) -> dict:
        """The settings as they read back from JSON (tuples as lists): what checkpoints and results compare."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def analysis_spec(self, spec: AnalysisSpec) -> AnalysisSpec:
        """The spec that is optimised: with ``nn``, ``nn_region``'s observable becomes the network."""
        if not self.nn or spec.regions.get(self.nn_region, None) is not None and \
                spec.regions[self.nn_region].observable == "nn":
            return spec
        if self.nn_region not in spec.regions:
            raise ConfigError(f"nn_region {self.nn_region!r} is not one of the regions {sorted(spec.regions)}")
        return spec.with_overrides(nn_overrides(self.nn_region, self.nn_bins))


def free_params(spec: AnalysisSpec, names) -> tuple[str, ...]:
    """``names`` as the canonical tuple of cut parameters to optimise (in the config's order).

    Unknown names are an error naming every one of them (with the closest known name) and the
    cuts that can be optimised; an empty selection is an error too.
    """
    import difflib

    names = [str(n) for n in names]
    if not names:
        raise ConfigError("--free needs at least one cut parameter; tunable: " + ", ".join(spec.parameters))
    unknown = [n for n in dict.fromkeys(names) if n not in spec.parameters]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, list(spec.parameters), n=1)
            hints.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown parameter{'s' if len(unknown) > 1 else ''} in free: {', '.join(hints)};"
                          f" the cut parameters are {', '.join(spec.parameters)}")
    return tuple(n for n in spec.parameters if n in set(names))


def nn_overrides(region: str, bins: int) -> list[str]:
    """Config overrides that make ``region`` histogram the NN observable over (0, 1)."""
    return [f"regions.{region}.observable=nn", f"regions.{region}.edges={{low: 0.0, high: 1.0, bins: {bins}}}"]


def initial_params(spec: AnalysisSpec, settings: OptimizeSettings) -> dict:
    """The starting point: the spec's cuts, its bin edges (with ``binning``) and NN weights (with ``nn``)."""
    params: dict = dict(spec.param_values())
    if settings.binning:
        params.update({f"edges_{r}": np.asarray(reg.edges, np.float64) for r, reg in spec.regions.items()})
    if spec.uses_nn():
        params["nn"] = spec.nn_weights()
    return params


def params_summary(params: Mapping) -> dict:
    """JSON-friendly parameters without the network weights (cuts as floats, edges as lists)."""
    return {k: (float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64).tolist())
            for k, v in params.items() if k != "nn"}


def params_to_json(params: Mapping) -> dict:
    from jacana.stages.observables.nn import weights_to_json

    out = params_summary(params)
    if "nn" in params:
        out["nn"] = weights_to_json(params["nn"])
    return out


def params_from_json(raw: Mapping) -> dict:
    return {k: ({kk: np.asarray(vv, np.float64) for kk, vv in v.items()} if isinstance(v, dict)
                else float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64)) for k, v in raw.items()}


def _rate(name: str, spec: AnalysisSpec, settings: OptimizeSettings) -> float:
    if name in spec.parameters:
        p = spec.parameters[name]
        return p.learning_rate if settings.step_fraction is None else settings.step_fraction * (p.upper - p.lower)
    if name.startswith("edges_"):
        edges = spec.regions[name[len("edges_"):]].edges
        return settings.edge_step * float(edges[-1] - edges[0])
    return settings.nn_step


def _optimizer(spec: AnalysisSpec, settings: OptimizeSettings) -> optax.GradientTransformation:
    """Adam normalises each gradient; the step in physical units is the parameter's learning rate
    (zero for a cut that is not free), times the step schedule."""
    frozen = set(spec.parameters) - set(settings.free_cuts(spec))

    def update(updates, state, params=None):
        return {k: jax.tree.map(lambda u, r=0.0 if k in frozen else _rate(k, spec, settings): -r * u, v)
                for k, v in updates.items()}, state

    return optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(settings.step_multiplier),
                       optax.GradientTransformation(lambda p: optax.EmptyState(), update))


def _project_edges(edges: np.ndarray, initial: np.ndarray, min_fraction: float) -> np.ndarray:
    """Outer edges stay; interior edges ordered, inside the range, at least a minimum width apart."""
    e = np.asarray(edges, np.float64).copy()
    lo, hi = float(initial[0]), float(initial[-1])
    width = min_fraction * float(np.min(np.diff(initial)))
    e[0], e[-1] = lo, hi
    inner = np.sort(e[1:-1])
    for i in range(len(inner)):  # forward then backward sweep: a feasible, nearest-in-order layout
        inner[i] = max(inner[i], (lo if i == 0 else inner[i - 1]) + width)
    for i in reversed(range(len(inner))):
        inner[i] = min(inner[i], (hi if i == len(inner) - 1 else inner[i + 1]) - width)
    e[1:-1] = inner
    return e


def _project(params: Mapping, spec: AnalysisSpec, settings: OptimizeSettings | None = None) -> dict:
    out: dict = {}
    for k, v in params.items():
        if k in spec.parameters:
            out[k] = float(np.clip(v, spec.parameters[k].lower, spec.parameters[k].upper))
        elif k.startswith("edges_"):
            min_fraction = settings.min_bin_fraction if settings else 0.25
            out[k] = _project_edges(v, spec.regions[k[len("edges_"):]].edges, min_fraction)
        else:
            out[k] = jax.tree.map(lambda a: np.asarray(a, np.float64), v)
    return out


def _as_jax(params: Mapping) -> dict:
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), dict(params))


def _finite(x) -> bool:
    return all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(x))


class Optimizer:
    """The optimisation loop over an executor's cached events (see the module docstring).

    One step is one call of the analysis chain (:mod:`jacana.analysis.chain`):
    ``value_and_grad(params, relax)``; ``remote`` replaces chain stages by served ones
    (``{"objective": "HOST:PORT"}``, with ``token_file``)."""

    def __init__(self, spec: AnalysisSpec, executor, settings: OptimizeSettings, out_dir: str | Path,
                 progress: bool = True, remote: Mapping[str, str] | None = None, token_file: str | None = None,
                 inputs: Mapping | None = None):
        settings.validate()
        self.spec, self.executor, self.settings = spec, executor, settings
        # digests of the fileset, config and settings: a checkpoint is resumed only with the same
        self.inputs = dict(inputs) if inputs is not None else input_digests(spec, settings)
        self.out = Path(out_dir)
        self.progress = progress
        self.free = settings.free_cuts(spec)  # unknown names fail here, before any pass
        self.tx = _optimizer(spec, settings)
        self.remote, self.token_file = dict(remote or {}), token_file
        self.chain: AnalysisChain | None = None
        self.sense = SENSE[settings.objective] if settings.objective in SENSE else 1
        self.passes = 0  # full passes over the training events so far (steps, hard checks, templates)

    def physical(self, loss: float) -> float:
        """The objective's physical value (e.g. sigma_mu, or Z0 > 0) from the minimised loss."""
        return float(self.sense * loss)

    def _chain(self, params: Mapping) -> AnalysisChain:
        if self.chain is None:
            self.chain = analysis_chain(self.executor, self.settings.objective, params, remote=self.remote,
                                        token_file=self.token_file)
        return self.chain

    @property
    def passes_per_step(self) -> int:
        """Full passes over the events per step: 1 in forward mode, 2 (forward, then VJP) in reverse mode."""
        mode = self.chain.mode if self.chain is not None else self.settings.mode
        return 1 if mode == "jacobian" else 2

    # -- one evaluation -------------------------------------------------------------------
    def value_and_grad(self, params: Mapping, relax: Mapping) -> tuple[float, dict]:
        """Loss and d(loss)/d(params) at ``params``: one call of the chain (one pass over the
        events in forward mode, two in reverse mode; the chain chooses)."""
        value, grad = self._chain(params).value_and_grad(params, relax)
        self.passes += self.passes_per_step
        grad = {k: jax.tree.map(lambda g: np.array(g, np.float64), grad[k]) for k in params}
        for k in grad:  # the outer bin edges are fixed (the histogram's range)
            if k.startswith("edges_"):
                grad[k][[0, -1]] = 0.0
        return value, grad

    def loss(self, params: Mapping, relax: Mapping) -> float:
        self.passes += 1
        return self._chain(params).loss(params, relax)

    def hard_loss(self, params: Mapping) -> float:
        """The loss in the exact hard limit on the optimisation events (same pipeline, zero temperatures)."""
        return self.loss(params, hard_relax(self.spec))

    # -- the loop -------------------------------------------------------------------------
    def run(self, initial: Mapping[str, float], resume: bool = False,
            on_step: Callable[[dict], None] | None = None) -> dict:
        s = self.settings
        state = self._load_checkpoint() if resume else None
        if state is None:
            params = _project(initial, self.spec, s)
            opt_state = self.tx.init(_as_jax(params))
            history: list[dict] = []
            start, best, stale, first_loss = 0, math.inf, 0, None
            best_point = None
        else:
            params, history = params_from_json(state["params"]), state["history"]
            fresh = self.tx.init(_as_jax(params))  # restored leaves keep its dtypes (int32 counts): bit-exact resume
            opt_state = jax.tree.unflatten(jax.tree.structure(fresh), [
                jnp.asarray(x, dtype=jnp.asarray(f).dtype) for x, f in zip(state["opt_state"], jax.tree.leaves(fresh))])
            start, best, stale, first_loss = state["step"] + 1, state["best"], state["stale"], state["first_loss"]
            best_point = state.get("best_point")
            # a checkpoint from before the count: its template pass, steps and checks
            self.passes = state.get("passes", 1 + sum(s.passes_per_step + (h.get("hard_objective") is not None)
                                                      for h in history))
            # The template as a fresh run takes it (at relax_start), not from a later, narrower step.
            self._chain(params).template(params, default_relax(self.spec, s.relax_start))
            self.passes += 1
        stopped = "steps"
        first = None
        if start < s.steps:  # compilation is its own phase: the bar's time estimate starts after it
            t0 = time.perf_counter()
            if self.progress:
                tqdm.write(f"jacana optimize: compiling the analysis and the first step over"
                           f" {self.executor.n_events:,} events (one program per event shape)...")
            first = self.value_and_grad(params, default_relax(self.spec, s.relax_scale(start)))
            first_seconds = time.perf_counter() - t0
            if self.progress:
                tqdm.write(f"jacana optimize: compiled and ran step {start} in {first_seconds:.0f} s")
        bar = tqdm(range(start, s.steps), initial=start, total=s.steps, desc=f"optimize {s.objective}",
                   disable=not self.progress, unit="step")
        for step in bar:
            scale = s.relax_scale(step)
            t0 = time.perf_counter()
            if first is not None:
                (value, grad), first = first, None
                t0 -= first_seconds
            else:
                value, grad = self.value_and_grad(params, default_relax(self.spec, scale))
            if not (math.isfinite(value) and _finite(grad)):
                raise OptimizationError(
                    f"step {step}: objective or gradient is not finite (loss={value}, grad={params_summary(grad)});"
                    f" stopped, the last good state is in {self.out / CHECKPOINT}")
            first_loss = value if first_loss is None else first_loss
            if abs(value) > s.diverge_factor * abs(first_loss) + 1e-12 and step > 0:
                raise OptimizationError(
                    f"step {step}: the objective diverged ({value:.4g} vs {first_loss:.4g} at the start); stopped,"
                    f" the last good state is in {self.out / CHECKPOINT}")
            entry = {"step": step, "params": params_summary(params), "objective": self.physical(value),
                     "loss": value, "grad": params_summary(grad), "relax_scale": scale,
                     "seconds": time.perf_counter() - t0, "hard_objective": None}
            if s.hard_every and (step % s.hard_every == 0 or step == s.steps - 1):
                hard = self.hard_loss(params)
                entry["hard_objective"] = self.physical(hard)
                if math.isfinite(hard) and (best_point is None or hard < best_point["loss"]):
                    best_point = {"step": step, "loss": hard, "params": params_to_json(params)}
            entry["passes"] = self.passes  # so far, this step's included: the budget axis of `jacana baselines`
            history.append(entry)
            annealed = step >= int(round(s.anneal_fraction * s.steps))
            if annealed:
                if value < best * (1 - s.min_improvement) if best > 0 else value < best - s.min_improvement:
                    best, stale = value, 0
                else:
                    stale += 1
            updates, opt_state = self.tx.update(_as_jax(grad), opt_state)  # a cut not free has a zero step
            params = _project(jax.tree.map(lambda p, u: np.asarray(p) + np.asarray(u), params,
                                           jax.tree.map(np.asarray, updates)), self.spec, s)
            self._save_checkpoint(step, params, opt_state, history, best, stale, first_loss, best_point)
            bar.set_postfix_str(f"{s.objective}={entry['objective']:.5g} " + " ".join(
                f"{k}={params[k]:.3g}" for k in param_names(self.spec) if k in params))
            if on_step is not None:
                on_step(entry)
            if annealed and stale >= s.patience:
                stopped = "early_stopping"
                break
        bar.close()
        outcome = {"params": params, "history": history, "stopped": stopped, "hard_loss": None}
        if s.keep_best:  # the last point's hard-limit check, then the best of all checks (training events)
            last = self.hard_loss(params)
            outcome["hard_loss"] = last
            chosen = {"step": len(history), "loss": last, "point": "last"}
            if best_point is not None and (not math.isfinite(last) or best_point["loss"] < last):
                outcome["params"] = _project(params_from_json(best_point["params"]), self.spec, s)
                outcome["hard_loss"] = best_point["loss"]
                chosen = {"step": best_point["step"], "loss": best_point["loss"], "point": "hard-limit check"}
            chosen["hard_objective"] = self.physical(chosen["loss"])
            chosen["last_point_hard_objective"] = self.physical(last)
            outcome["selected"] = chosen
        return outcome

    # -- checkpoints ----------------------------------------------------------------------
    def _save_checkpoint(self, step, params, opt_state, history, best, stale, first_loss, best_point=None) -> None:
        write_json(self.out / CHECKPOINT, {
            "version": CHECKPOINT_VERSION, "step": step, "params": params_to_json(params),
            "opt_state": [np.asarray(x).tolist() for x in jax.tree.leaves(opt_state)],
            "history": history, "best": best if math.isfinite(best) else None, "stale": stale,
            "first_loss": first_loss, "best_point": best_point, "passes": self.passes,
            "settings": self.settings.to_json(),
            "spec": self.spec.to_dict(),
            "inputs": self.inputs,
        }, indent=None)

    def _load_checkpoint(self) -> dict | None:
        return read_checkpoint(self.out / CHECKPOINT, self.spec, self.settings, self.inputs, self.tx)


def input_digests(spec: AnalysisSpec, settings: OptimizeSettings, fileset: Fileset | None = None) -> dict:
    """SHA-256 digests of what a checkpoint's history depends on: the training fileset (its files and
    event counts), the analysis config and the settings (``steps`` aside: a resume may extend a run)."""
    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

    settings_json = {k: v for k, v in settings.to_json().items() if k != "steps"}
    out = {"config": digest(spec.to_dict()), "settings": digest(settings_json)}
    if fileset is not None:
        out.update(fileset=digest(fileset.to_dict()), fileset_source=str(fileset.source))
    return out


#: What every checkpoint holds, and the type each must have.
_CHECKPOINT_KEYS = {"version": int, "step": int, "params": dict, "opt_state": list, "history": list,
                    "stale": int, "settings": dict, "spec": dict}


def read_checkpoint(path: Path, spec: AnalysisSpec, settings: OptimizeSettings, inputs: Mapping | None = None,
                    tx: optax.GradientTransformation | None = None) -> dict | None:
    """The checkpoint at ``path`` checked in full before any other work (None when there is none).

    Refused with an :class:`OptimizationError` naming the file and the entry: not a JSON object,
    an entry missing or of the wrong type, another version, settings, config or (``inputs``, from
    :func:`input_digests`) fileset than this run's, parameters that are not finite or outside their
    bounds, an optimiser state of another structure. A checkpoint without digests (older jacana)
    is resumed with a warning that its fileset cannot be checked.
    """
    path = Path(path)
    if not path.is_file():
        return None

    def refuse(why: str) -> OptimizationError:
        return OptimizationError(f"checkpoint {path} {why}; remove it to start afresh, or resume with what made it")

    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:  # atomic writes make this a foreign or damaged file
        raise OptimizationError(f"checkpoint {path} is not valid JSON ({exc}); remove it to start afresh") from None
    except (RecursionError, UnicodeDecodeError) as exc:
        raise refuse(f"cannot be read ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise refuse(f"is a JSON {type(state).__name__}, not the object jacana optimize writes")
    if state.get("version") != CHECKPOINT_VERSION:
        raise OptimizationError(f"checkpoint {path} has version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
    for key, kind in _CHECKPOINT_KEYS.items():
        if key not in state:
            raise refuse(f"lacks {key!r} (damaged, or not written by jacana optimize)")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise refuse(f"has {key!r} of type {type(state[key]).__name__}, expected {kind.__name__}")
    for key in ("best", "first_loss"):
        v = state.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise refuse(f"has {key!r} = {v!r}, expected a finite number or null")
    if state["step"] < 0 or state["stale"] < 0:
        raise refuse(f"has step {state['step']} and stale {state['stale']}; both must be >= 0")
    if len(state["history"]) != state["step"] + 1 or not all(isinstance(h, dict) for h in state["history"]):
        raise refuse(f"has {len(state['history'])} history entries for step {state['step']} (expected"
                     f" {state['step'] + 1} objects)")

    saved = dict(state["settings"])
    current, defaults = settings.to_json(), OptimizeSettings().to_json()
    # a setting newer than the checkpoint had its default value then
    differ = [k for k in current if k != "steps" and saved.get(k, defaults.get(k)) != current[k]]
    what = [f"different settings ({', '.join(differ)})"] if differ else []
    if state["spec"] != spec.to_dict():
        what.append("a different analysis config")
    old = state.get("inputs")
    if isinstance(old, dict) and inputs and old.get("fileset") and inputs.get("fileset") \
            and old["fileset"] != inputs["fileset"]:
        what.append(f"a different fileset (then {old.get('fileset_source')}, now {inputs.get('fileset_source')}:"
                    " other files or event counts)")
    if what:
        raise OptimizationError(f"checkpoint {path} was made with {'; '.join(what)}; cannot resume (its history"
                                " would mix two analyses): use the same inputs, or another --out")
    if old is None and inputs and inputs.get("fileset"):
        warnings.warn(f"checkpoint {path} predates input digests: whether it was made with the fileset"
                      f" {inputs.get('fileset_source')} cannot be checked", stacklevel=2)

    params = _checked_params(state["params"], spec, refuse)
    leaves = jax.tree.leaves((tx or _optimizer(spec, settings)).init(_as_jax(params)))
    if len(state["opt_state"]) != len(leaves):
        raise refuse(f"has {len(state['opt_state'])} optimiser-state arrays; these parameters need {len(leaves)}")
    for i, (x, leaf) in enumerate(zip(state["opt_state"], leaves)):
        try:
            a = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError):
            raise refuse(f"has opt_state[{i}] that is not an array of numbers") from None
        if a.shape != np.shape(leaf) or not np.all(np.isfinite(a)):
            raise refuse(f"has opt_state[{i}] of shape {list(a.shape)} (finite: {bool(np.all(np.isfinite(a)))}),"
                         f" expected shape {list(np.shape(leaf))}, finite")
    if state.get("best_point") is not None:
        bp = state["best_point"]
        if not isinstance(bp, dict) or not {"step", "loss", "params"} <= set(bp):
            raise refuse("has a best_point without step, loss and params")
        _checked_params(bp["params"], spec, lambda why: refuse(f"best_point: {why}"))
    state["best"] = math.inf if state.get("best") is None else state["best"]
    return state


def _checked_params(raw: Mapping, spec: AnalysisSpec, refuse: Callable[[str], Exception]) -> dict:
    """A checkpoint's parameters as arrays, each finite and inside the spec's bounds (a cut), strictly
    increasing with the region's edge count (edges) or of finite weights (nn)."""
    if not isinstance(raw, Mapping):
        raise refuse("has params that are not an object")
    missing = [k for k in spec.parameters if k not in raw]
    if missing:
        raise refuse(f"lacks the parameter(s) {missing}")
    try:
        params = params_from_json(raw)
    except (TypeError, ValueError):
        raise refuse("has parameters that are not numbers or arrays of numbers") from None
    for k, v in params.items():
        if not _finite(v):
            raise refuse(f"has a non-finite value in parameter {k!r}")
        if k in spec.parameters:
            p = spec.parameters[k]
            if np.ndim(v) != 0 or not p.lower <= float(v) <= p.upper:
                raise refuse(f"has {k} = {_short(v)}, outside its bounds [{p.lower:g}, {p.upper:g}]")
        elif k.startswith("edges_") and k[len("edges_"):] in spec.regions:
            want = len(spec.regions[k[len("edges_"):]].edges)
            if np.ndim(v) != 1 or len(v) != want or np.any(np.diff(v) <= 0):
                raise refuse(f"has {k} = {_short(v)}; expected {want} strictly increasing edges")
        elif k != "nn":
            raise refuse(f"has an unknown parameter {k!r}")
    return params


def _short(v) -> str:
    text = repr(np.asarray(v).tolist())
    return text if len(text) <= 120 else text[:120] + "..."


def relaxation_gap(history) -> dict:
    """The relaxed objective against the hard limit at the same point: the last step with a
    hard-limit check (the last step itself unless ``hard_every`` is 0). Costs no pass."""
    last = history[-1] if history else {}
    checked = [h for h in history if h.get("hard_objective") is not None]
    if not checked:
        return {"relaxed": last.get("objective"), "relaxed_over_hard": None, "relaxed_over_hard_step": None}
    h = checked[-1]
    return {"relaxed": last.get("objective"),
            "relaxed_over_hard": h["objective"] / h["hard_objective"] if h["hard_objective"] else None,
            "relaxed_over_hard_step": h["step"]}


def run_optimize(spec: AnalysisSpec, train: Fileset, validation: Fileset, out_dir: str | Path,
                 settings: OptimizeSettings, resume: bool = False, progress: bool = True,
                 on_bad_file: str = "fail", plots: bool = True, impacts: bool = True,
                 workers: int | None = None, scheduler: str | None = None, client=None,
                 profile: str | None = None, remote: Mapping[str, str] | None = None,
                 token_file: str | None = None, coffea: str | None = None) -> OptimizationResult:
    """The main job: optimise on ``train``, validate before and after on ``validation``, write everything
    (``result.json`` is the returned result's :meth:`~OptimizationResult.to_json`).

    ``workers`` / ``scheduler`` / ``client`` / ``profile`` choose a dask executor, ``coffea``
    (``"iterative"``, ``"futures"``, ``"dask"``) coffea's Runner (see
    :func:`jacana.facility.factory.make_executor`); none of them runs in this process.
    """
    from jacana.facility.factory import make_executor

    from jacana.analysis.evaluate import hard_evaluation
    from jacana.stages.stats.workspace import histograms_to_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    reference_spec, spec = spec, settings.analysis_spec(spec)
    inputs = input_digests(spec, settings, train)
    if resume:  # a damaged or foreign checkpoint is refused before any event is read
        read_checkpoint(out / CHECKPOINT, spec, settings, inputs)
    train_report, val_report = InputReport(on_bad_file), InputReport(on_bad_file)
    executor = make_executor(spec, analysis_chunks(spec, train, settings.chunk_size), workers=workers,
                             scheduler=scheduler, client=client, profile=profile, progress=progress,
                             report=train_report, coffea=coffea, fileset=train, chunk_size=settings.chunk_size,
                             dtype=settings.dtype)
    store = ColumnStore(spec)

    def validate(analysis: AnalysisSpec, what: str) -> dict:
        if progress:  # no silent stretch: the held-out pass, its fit and checks take a while on 1M events
            tqdm.write(f"jacana optimize: {what} on the held-out events (hard analysis, pyhf fit, workspace check)...")
        return hard_evaluation(analysis, validation, store=store, chunk_size=settings.chunk_size,
                               on_bad_file=on_bad_file, progress=progress)

    initial = initial_params(spec, settings)
    before = validate(reference_spec, "the configured cuts")  # as configured (cuts, binning, observables)
    opt = Optimizer(spec, executor, settings, out, progress=progress, remote=remote, token_file=token_file,
                    inputs=inputs)
    try:
        outcome = opt.run(initial, resume=resume)
        final = outcome["params"]
        hard_end = opt.physical(outcome["hard_loss"] if outcome["hard_loss"] is not None
                                          else opt.hard_loss(final))
    finally:
        executor.close()
    final_spec = spec.with_params(final)
    after = validate(final_spec, "the optimised cuts")
    b, a = before["result"]["expected"]["sigma_mu"], after["result"]["expected"]["sigma_mu"]
    result = OptimizationResult(
        objective=settings.objective,
        initial_params=params_summary(initial),
        final_params=params_summary(final),
        stopped=outcome["stopped"],
        free_params=list(opt.free),
        selected=outcome.get("selected"),
        history=outcome["history"],
        final_objective={"hard_limit": hard_end, **relaxation_gap(outcome["history"])},
        passes=pass_count(opt.passes, outcome["history"], opt.passes_per_step),
        before=before["result"], after=after["result"], sigma_mu_ratio=a / b,
        settings=settings.to_json(),
        events={"train": executor.n_events, "validation_fileset": validation.source, "train_fileset": train.source},
        inputs={"train": train_report.to_dict(), "validation": val_report.to_dict()},
        seconds=time.perf_counter() - t_start,
        soft_model=opt.chain.soft_model if opt.chain is not None else None,
        complete_params=params_to_json(final),
        overrides=nn_overrides(settings.nn_region, settings.nn_bins) if settings.nn else [],
        source=str(out / "result.json"),
    )
    write_json(out / "params.json", result.params_json())
    write_json(out / "workspace.json", after["workspace"])
    write_json(out / "histograms.json", histograms_to_json(after["histograms"]), indent=None)
    if plots:
        if progress:
            tqdm.write("jacana optimize: plots" + (" and impacts (one fit per nuisance parameter)..." if impacts else "..."))
        result = dataclasses.replace(result, plots=make_plots(reference_spec, final_spec, out, result, before, after,
                                                              impacts=impacts))
    write_json(out / "result.json", result.to_json())
    return result


def make_plots(spec: AnalysisSpec, final_spec: AnalysisSpec, out: Path, result: OptimizationResult, before: Mapping,
               after: Mapping, impacts: bool = True) -> dict[str, str]:
    from jacana.analysis import plots
    from jacana.stages.stats.inference import impacts as np_impacts
    from jacana.stages.stats.workspace import pseudo_data

    d = out / "plots"
    paths = {
        "objective": plots.objective_history(result.history, result.objective, d / "objective.png",
                                             selected=result.selected, poi=spec.poi["name"],
                                             held_out=(result.sigma_mu_before, result.sigma_mu_after)
                                             if result.objective == "sigma_mu" else None),
        "parameters": plots.parameter_trajectories(result.history, spec, d / "parameters.png"),
        "before": plots.stacked_histograms(spec, before["histograms"], d / "histograms_before.png",
                                           "(AGC cuts)", pseudo_data(spec, before["histograms"])),
        "after": plots.stacked_histograms(final_spec, after["histograms"], d / "histograms_after.png",
                                          "(optimised)", pseudo_data(final_spec, after["histograms"])),
    }
    fitted = plots.data_mc(final_spec, after["workspace"], d)  # held-out, optimised: pre- and post-fit
    paths.update({f"data_mc_{k}": v for k, v in fitted["paths"].items()})
    if impacts:
        paths["impacts"] = plots.impact_ranking(np_impacts(after["workspace"]), spec.poi["name"], d / "impacts.png")
    return {k: str(v) for k, v in paths.items()}
