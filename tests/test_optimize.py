"""``jacana optimize`` end to end on small samples: outputs, validation, exact resume, clean stops."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jacana.cli.main import main
from jacana.analysis.optimize import OptimizationError, Optimizer, OptimizeSettings, params_summary
from jacana.facility.executor import InProcessExecutor
from jacana.facility.hardrun import analysis_chunks
from jacana.stages.errors import ConfigError
from jacana.stages.fileset import load_fileset
from jacana.stages.spec import load_spec

STEPS = 4


@pytest.fixture(scope="module")
def tiny_filesets(tmp_path_factory):
    """20k events to optimise on and 20k held-out events. Not conftest.py's train_validate_20k: the
    post-fit impact plot of test_outputs refits pyhf models of the held-out events, and with those held-out
    events test_outputs' setup took 50 s instead of 30 s (the refits' cost varies several-fold between samples)."""
    from jacana.samples.synthetic import generate

    out = tmp_path_factory.mktemp("tiny")
    return generate(out / "train", events=20_000, seed=11, progress=False), \
        generate(out / "validate", events=20_000, seed=12, progress=False)


@pytest.fixture(scope="module")
def optimized(tiny_filesets, tmp_path_factory):
    train, validate = tiny_filesets
    out = tmp_path_factory.mktemp("opt")
    code = main(["optimize", "--fileset", str(train), "--validation-fileset", str(validate), "--steps", str(STEPS),
                 "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_outputs(optimized):
    result = json.loads((optimized / "result.json").read_text())
    assert set(result) >= {"initial_params", "final_params", "history", "validation", "final_objective"}
    assert len(result["history"]) == STEPS
    assert result["history"][0]["hard_objective"] is not None
    # hard-limit checks at steps 0 and 3 (the last), one at the end; the template is step 0's pass
    assert result["passes"] == {"train": STEPS + 2 + 1, "steps": STEPS, "passes_per_step": 1,
                                "hard_evaluations": 2, "other": 1}
    gap = result["final_objective"]
    assert gap["relaxed_over_hard_step"] == STEPS - 1
    last = result["history"][-1]
    assert gap["relaxed_over_hard"] == pytest.approx(last["objective"] / last["hard_objective"], rel=1e-12)
    for key in ("before", "after"):
        v = result["validation"][key]
        assert set(v) >= {"ttbar_norm", "expected", "params", "regions"}  # the keys of jacana evaluate
        assert v["expected"]["sigma_mu"] > 0
    assert result["validation"]["before"]["params"] == result["initial_params"]
    assert result["validation"]["after"]["params"] == pytest.approx(result["final_params"])
    assert result["final_params"] != result["initial_params"]
    soft = result["soft_model"]  # the soft objective's fixed pruning decision is recorded
    assert "first pass" in soft["decided_from"]
    spec = load_spec()
    for m in soft["pruned"]:
        assert m["region"] in spec.regions and m["sample"] in spec.samples and m["type"] in ("normsys", "histosys")
    for name, value in result["final_params"].items():
        p = load_spec().parameters[name]
        assert p.lower <= value <= p.upper
    for png in ("objective", "parameters", "histograms_before", "histograms_after", "impacts"):
        assert (optimized / "plots" / f"{png}.png").stat().st_size > 10_000
    import pyhf

    pyhf.Workspace(json.loads((optimized / "workspace.json").read_text()))


def test_params_json_loads_into_evaluate(optimized, tiny_filesets, tmp_path):
    _, validate = tiny_filesets
    assert main(["evaluate", "--fileset", str(validate), "--params", str(optimized / "params.json"),
                 "--out", str(tmp_path), "--quiet"]) == 0
    again = json.loads((tmp_path / "result.json").read_text())
    result = json.loads((optimized / "result.json").read_text())
    assert again["expected"]["sigma_mu"] == pytest.approx(result["validation"]["after"]["expected"]["sigma_mu"],
                                                          rel=1e-9)


class CountingExecutor(InProcessExecutor):
    """Counts the passes over the events (each call of its stage is one)."""

    calls = 0

    def stage(self, params_like=None, apply_program="auto"):
        stage, executor = super().stage(params_like, apply_program), self
        if "counted" not in stage.__dict__:
            stage.counted, depth = True, [0]
            for name in ("apply", "jacobian", "vjp"):
                def counted(*a, _f=getattr(stage, name), **k):
                    executor.calls += depth[0] == 0  # a call from inside another call is the same pass
                    depth[0] += 1
                    try:
                        return _f(*a, **k)
                    finally:
                        depth[0] -= 1
                setattr(stage, name, counted)
        return stage


@pytest.fixture(scope="module")
def counting_executor(tiny_filesets):
    """One executor over the training events for every run below (its count is reset per run)."""
    spec = load_spec()
    executor = CountingExecutor(spec, analysis_chunks(spec, load_fileset(tiny_filesets[0])))
    yield executor
    executor.close()


def _run(spec, executor, out, steps, resume=False, hard_every=0, on_step=None):
    """(optimizer, outcome) of one run on ``executor``, whose pass count starts again at zero."""
    executor.calls = 0
    opt = Optimizer(spec, executor, OptimizeSettings(steps=steps, hard_every=hard_every), out, progress=False)
    return opt, opt.run(spec.param_values(), resume=resume, on_step=on_step)


@pytest.fixture(scope="module")
def runs(counting_executor, tmp_path_factory):
    """One run of STEPS steps with a hard-limit check every 2 steps, and its checkpoint as written after
    step 1 (in ``part``: what a run stopped there leaves, the checkpoint being written before anything
    else happens after a step): the resume, keep-best and refused-resume tests read them."""
    spec = load_spec()
    base = tmp_path_factory.mktemp("runs")
    part = base / "part"

    def keep_checkpoint_of_step_one(entry):
        if entry["step"] == 1:
            part.mkdir()
            shutil.copy(base / "full" / "checkpoint.json", part / "checkpoint.json")

    opt, full = _run(spec, counting_executor, base / "full", STEPS, hard_every=2, on_step=keep_checkpoint_of_step_one)
    return {"spec": spec, "executor": counting_executor, "full_opt": opt, "full": full, "full_passes": opt.passes,
            "full_calls": counting_executor.calls, "part": part}


def test_resume_reproduces_the_uninterrupted_run_and_counts_every_pass(runs, tmp_path):
    """Bit-exact resume; the pass count is what the executor did: the objective's template comes
    from step 0 (no pass of its own), steps, hard-limit checks (steps 0, 2 and the last) and the
    end's check are counted, and a resume goes on counting."""
    spec, executor, full = runs["spec"], runs["executor"], runs["full"]
    assert STEPS == 4 and runs["full_passes"] == runs["full_calls"] == 4 + 3 + 1
    assert [h["passes"] for h in full["history"]] == [2, 3, 5, 7]
    part_dir = tmp_path / "part"
    shutil.copytree(runs["part"], part_dir)
    checkpoint = json.loads((part_dir / "checkpoint.json").read_text())
    assert checkpoint["step"] == 1
    opt, resumed = _run(spec, executor, part_dir, STEPS, resume=True, hard_every=2)
    assert resumed["params"] == full["params"]  # bit for bit
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert executor.calls == 1 + 2 + 2 + 1  # the template, steps 2 and 3 with their checks, the end
    assert opt.passes == 3 + executor.calls
    # a checkpoint written before the count: estimated as runs then went (a template pass of its own);
    # resumed with no step left (steps=2), the run is the template and the end's check
    del checkpoint["passes"]
    (part_dir / "checkpoint.json").write_text(json.dumps(checkpoint))
    opt, _ = _run(spec, executor, part_dir, 2, resume=True, hard_every=2)
    assert executor.calls == 1 + 1
    assert opt.passes == 4 + executor.calls


def test_resume_refuses_a_checkpoint_of_other_settings(runs, tmp_path):
    spec = runs["spec"]
    shutil.copytree(runs["part"], tmp_path / "part")
    opt = Optimizer(spec, runs["executor"], OptimizeSettings(steps=3, objective="z0", hard_every=2), tmp_path / "part",
                    progress=False)
    with pytest.raises(OptimizationError, match="different settings.*objective"):
        opt.run(spec.param_values(), resume=True)


def test_precision_is_a_setting_checked_on_resume(runs, tmp_path):
    """dtype (mixed precision) must match on resume; a checkpoint from before the setting existed
    counts as the default, float64; an unknown precision is refused before any work."""
    spec = runs["spec"]
    with pytest.raises(ConfigError, match="dtype"):
        OptimizeSettings(dtype="float16").validate()
    shutil.copytree(runs["part"], tmp_path / "part")
    opt = Optimizer(spec, runs["executor"], OptimizeSettings(steps=3, hard_every=2, dtype="float32"),
                    tmp_path / "part", progress=False)
    with pytest.raises(OptimizationError, match=r"different settings \(dtype\)"):
        opt.run(spec.param_values(), resume=True)
    checkpoint = json.loads((tmp_path / "part" / "checkpoint.json").read_text())
    del checkpoint["settings"]["dtype"]  # written by a jacana without the setting
    (tmp_path / "part" / "checkpoint.json").write_text(json.dumps(checkpoint))
    _, resumed = _run(spec, runs["executor"], tmp_path / "part", 2, resume=True, hard_every=2)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in runs["full"]["history"][:2]]


def test_nan_objective_stops_cleanly_and_keeps_the_last_good_checkpoint(counting_executor, tmp_path):
    spec = load_spec()
    opt = Optimizer(spec, counting_executor, OptimizeSettings(steps=5, hard_every=0), tmp_path, progress=False)
    real = opt.value_and_grad
    calls = {"n": 0}

    def poisoned(params, relax):
        calls["n"] += 1
        value, grad = real(params, relax)
        return (float("nan"), grad) if calls["n"] == 3 else (value, grad)

    opt.value_and_grad = poisoned
    with pytest.raises(OptimizationError, match="step 2: objective or gradient is not finite"):
        opt.run(spec.param_values())
    checkpoint = json.loads((tmp_path / "checkpoint.json").read_text())
    assert checkpoint["step"] == 1 and len(checkpoint["history"]) == 2
    assert all(np.isfinite(v) for v in checkpoint["params"].values())


@pytest.mark.slow  # three `jacana optimize` processes: minutes on 2 cores
def test_sigkill_then_resume_loses_nothing(tiny_filesets, tmp_path):
    """A killed process (SIGKILL: no cleanup at all) resumes from its last atomic checkpoint."""
    train, validate = tiny_filesets
    steps = 6
    args = [sys.executable, "-m", "jacana.cli.main", "optimize", "--fileset", str(train), "--validation-fileset",
            str(validate), "--steps", str(steps), "--no-plots", "--quiet"]
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(killed_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed_dir / "checkpoint.json"
    deadline = time.time() + 600
    while time.time() < deadline:
        if checkpoint.exists() and json.loads(checkpoint.read_text())["step"] >= 1:
            break
        if proc.poll() is not None:
            pytest.fail("the optimisation ended before it could be killed")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(checkpoint.read_text())  # never half-written
    assert 1 <= state["step"] < steps - 1
    assert subprocess.run(args + ["--out", str(killed_dir), "--resume"], capture_output=True).returncode == 0
    full_dir = tmp_path / "full"
    assert subprocess.run(args + ["--out", str(full_dir)], capture_output=True).returncode == 0
    resumed = json.loads((killed_dir / "result.json").read_text())
    full = json.loads((full_dir / "result.json").read_text())
    assert resumed["final_params"] == full["final_params"]
    assert [h["step"] for h in resumed["history"]] == list(range(steps))


@pytest.fixture(scope="module")
def optimized_binning_nn(tiny_filesets, tmp_path_factory):
    train, validate = tiny_filesets
    out = tmp_path_factory.mktemp("opt_nn")
    code = main(["optimize", "--fileset", str(train), "--validation-fileset", str(validate), "--steps", "3",
                 "--binning", "--nn", "--out", str(out), "--quiet", "--no-plots"])
    assert code == 0
    return out


@pytest.mark.slow  # compiles the forward and VJP programs of every shape: about 2-3 minutes on 2 cores
def test_binning_and_nn_are_optimised_and_evaluate_reproduces_them(optimized_binning_nn, tiny_filesets, tmp_path):
    from jacana.stages.observables.nn import init_weights

    out = optimized_binning_nn
    result = json.loads((out / "result.json").read_text())
    saved = json.loads((out / "params.json").read_text())
    assert saved["overrides"] == ["regions.4j1b.observable=nn", "regions.4j1b.edges={low: 0.0, high: 1.0, bins: 10}"]
    params = saved["params"]
    for region, (lo, hi, n) in {"4j1b": (0.0, 1.0, 11), "4j2b": (110.0, 550.0, 12)}.items():
        edges = np.asarray(params[f"edges_{region}"])
        assert len(edges) == n and edges[0] == lo and edges[-1] == hi  # the range stays
        assert np.all(np.diff(edges) > 0)
        assert not np.allclose(edges, np.linspace(lo, hi, n))  # interior edges moved
    start = init_weights()
    assert np.any(np.asarray(params["nn"]["w3"]) != start["w3"])  # the network was trained
    # before: the AGC analysis (HT in 4j1b); after: the trained network, and evaluate reproduces it
    assert result["validation"]["before"]["regions"]["4j1b"]["ttbar"] < result["validation"]["after"]["regions"][
        "4j1b"]["ttbar"]  # HT's 110-550 range drops events; the network's (0, 1) keeps them all
    _, validate = tiny_filesets
    assert main(["evaluate", "--fileset", str(validate), "--params", str(out / "params.json"),
                 "--out", str(tmp_path), "--quiet"]) == 0
    again = json.loads((tmp_path / "result.json").read_text())
    assert again["expected"]["sigma_mu"] == pytest.approx(result["validation"]["after"]["expected"]["sigma_mu"],
                                                          rel=1e-9)


@pytest.mark.slow  # (53 s)
def test_free_moves_only_the_named_cuts_and_resume_keeps_the_selection(tiny_filesets, tmp_path, capsys):
    train, validate = tiny_filesets
    out = tmp_path / "free"
    args = ["optimize", "--fileset", str(train), "--validation-fileset", str(validate), "--hard-every", "0",
            "--no-plots", "--quiet", "--out", str(out)]
    assert main(args + ["--steps", "3", "--free", "btag_min", "jet_pt_min"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["free_params"] == ["jet_pt_min", "btag_min"]  # the config's order, whatever the order given
    assert result["settings"]["free"] == ["jet_pt_min", "btag_min"]
    start = load_spec().param_values()
    for entry in result["history"]:  # frozen cuts never move, not even by a rounding error
        assert entry["params"]["lepton_pt_min"] == start["lepton_pt_min"]
        assert entry["params"]["jet_eta_max"] == start["jet_eta_max"]
    final = result["final_params"]
    assert final["lepton_pt_min"] == start["lepton_pt_min"] and final["jet_eta_max"] == start["jet_eta_max"]
    assert final["jet_pt_min"] != start["jet_pt_min"] and final["btag_min"] != start["btag_min"]
    assert result["validation"]["after"]["params"] == pytest.approx(final)
    # --resume with another selection of free cuts is refused; with the same one it continues
    capsys.readouterr()
    assert main(args + ["--steps", "4", "--free", "jet_pt_min", "--resume"]) == 2
    assert "different settings (free)" in capsys.readouterr().err
    assert main(args + ["--steps", "4", "--free", "jet_pt_min", "btag_min", "--resume"]) == 0
    resumed = json.loads((out / "result.json").read_text())
    assert [h["step"] for h in resumed["history"]] == [0, 1, 2, 3]
    assert resumed["final_params"]["lepton_pt_min"] == start["lepton_pt_min"]


def test_free_refuses_unknown_names_before_reading_any_data(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["optimize", "--fileset", str(tmp_path / "missing.json"), "--free", "jet_pt", "btag_min",
                 "btag_minimum", "--out", str(out), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'jet_pt' (did you mean 'jet_pt_min'?)" in err and "'btag_minimum'" in err
    assert "missing.json" not in err and not out.exists()  # refused before the fileset is read
    with pytest.raises(ConfigError, match="at least one"):
        OptimizeSettings(free=()).validate()
    spec = load_spec()
    with pytest.raises(ConfigError, match="unknown parameter in free: 'eta'"):
        Optimizer(spec, None, OptimizeSettings(free=("eta",)), tmp_path, progress=False)


def test_keep_best_ends_at_the_best_hard_limit_check(runs):
    """The run ends at the best of its hard-limit checks (steps 0, 2 and 3 of the uninterrupted run of
    ``runs``) and the end's check of the last point."""
    opt, outcome = runs["full_opt"], runs["full"]
    checks = [(h["hard_objective"], h["step"]) for h in outcome["history"] if h["hard_objective"] is not None]
    assert [step for _, step in checks] == [0, 2, 3]
    sel = outcome["selected"]
    best = min(checks + [(sel["last_point_hard_objective"], len(outcome["history"]))])
    assert sel["hard_objective"] == best[0] and sel["step"] == best[1]
    assert opt.physical(opt.hard_loss(outcome["params"])) == pytest.approx(best[0], rel=1e-12)
    if sel["point"] != "last":
        assert params_summary(outcome["params"]) == pytest.approx(outcome["history"][sel["step"]]["params"])
