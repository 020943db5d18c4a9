"""Gradient-free baselines and multi-start: reproducible, inside the bounds, passes counted like the gradient's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jacana.analysis.studies.baselines import cma_es, gradient_passes, random_search, run_baselines
from jacana.analysis.studies.multistart import spread, start_points
from jacana.stages.errors import ConfigError
from jacana.stages.fileset import load_fileset
from jacana.stages.spec import load_spec


@pytest.fixture(scope="module")
def filesets(train_validate_20k):
    """The session's 20k-event training and held-out datasets (conftest.py)."""
    return train_validate_20k


def _inside(spec, params):
    return all(spec.parameters[k].lower <= v <= spec.parameters[k].upper for k, v in params.items())


class QuadraticObjective:
    """A stand-in for HardObjective (same interface, no events): a bowl with its minimum inside the bounds."""

    def __init__(self, spec, centre):
        self.spec, self.centre, self.passes, self.n_events = spec, centre, 0, 1000

    def evaluate(self, values, extra=None, overrides=None):
        point = {**self.spec.param_values(), **values}
        self.passes += 1
        sigma = 0.1 + sum(((point[k] - c) / (self.spec.parameters[k].upper - self.spec.parameters[k].lower)) ** 2
                          for k, c in self.centre.items())
        return {"params": point, "sigma_mu": sigma, "pass": self.passes}


CENTRE = {"lepton_pt_min": 40.0, "jet_pt_min": 45.0, "jet_eta_max": 1.8, "btag_min": 0.7}


def test_random_search_is_reproducible():
    spec = load_spec()
    a, b = (random_search(QuadraticObjective(spec, CENTRE), budget=20, seed=5) for _ in range(2))
    assert [h["params"] for h in a["history"]] == [h["params"] for h in b["history"]]
    assert a["passes"] == 20 and len(a["history"]) == 20
    assert a["history"][0]["params"] == spec.param_values()  # the AGC point first
    assert a["train_sigma_mu"] < a["history"][0]["sigma_mu"]
    assert a["train_sigma_mu"] == min(h["sigma_mu"] for h in a["history"])
    assert [s for _, s in a["best_so_far"]] == sorted((s for _, s in a["best_so_far"]), reverse=True)
    assert all(_inside(spec, h["params"]) for h in a["history"])
    c = random_search(QuadraticObjective(spec, CENTRE), budget=3, seed=6)
    assert c["history"][1]["params"] != a["history"][1]["params"]


def test_cmaes_respects_bounds_and_budget():
    spec = load_spec()
    obj = QuadraticObjective(spec, CENTRE)
    # 8 per generation for 4 parameters: 45 passes = 5 generations + 5 points of the sixth, evaluated without update
    run = cma_es(obj, budget=45, seed=1, sigma0=0.5)
    assert run["passes"] == 45 == obj.passes and len(run["history"]) == 45
    assert run["popsize"] == 8 and run["generations"] == 5
    assert all(_inside(spec, h["params"]) for h in run["history"])
    assert run["train_sigma_mu"] == min(h["sigma_mu"] for h in run["history"])
    start = run["history"][0]["sigma_mu"]
    assert run["train_sigma_mu"] - 0.1 < 0.25 * (start - 0.1)  # well down into the bowl
    again = cma_es(QuadraticObjective(spec, CENTRE), budget=45, seed=1, sigma0=0.5)
    assert [h["params"] for h in again["history"]] == [h["params"] for h in run["history"]]
    with pytest.raises(ConfigError, match="budget"):
        cma_es(obj, budget=0)
    with pytest.raises(ConfigError, match="did you mean 'btag_min'"):
        cma_es(obj, budget=2, names=["btag_mn"])


def test_gradient_passes():
    history = [{"step": i, "hard_objective": 0.1 if i % 10 == 0 or i == 24 else None} for i in range(25)]
    passes = gradient_passes({"history": history})
    # 25 steps (1 pass each: Jacobian mode), hard checks at 0, 10, 20, 24, template + relaxed + hard at the end
    assert passes == {"train": 25 + 4 + 3, "steps": 25, "passes_per_step": 1, "hard_evaluations": 4, "other": 3}
    # VJP mode (bin edges or a network): a forward pass for the yields, then the reverse pass
    assert gradient_passes({"history": history, "settings": {"binning": True}})["train"] == 2 * 25 + 4 + 3
    # results of today's optimiser carry the count it kept, which wins (no template, no relaxed end)
    counted = {"train": 25 + 4 + 1, "steps": 25, "passes_per_step": 1, "hard_evaluations": 4, "other": 1}
    assert gradient_passes({"history": history, "passes": counted}) == counted


def test_the_gradient_row_traces_its_best_against_the_counted_passes(tmp_path):
    from jacana.analysis.studies.baselines import gradient_row

    history = [{"step": 0, "hard_objective": 0.2, "passes": 2}, {"step": 1, "hard_objective": None, "passes": 3},
               {"step": 2, "hard_objective": 0.15, "passes": 5}]
    path = tmp_path / "result.json"
    path.write_text(json.dumps({
        "final_params": {"lepton_pt_min": 27.0, "jet_pt_min": 33.0, "jet_eta_max": 2.3, "btag_min": 0.6},
        "history": history, "final_objective": {"hard_limit": 0.14},
        "passes": {"train": 6, "steps": 3, "passes_per_step": 1, "hard_evaluations": 2, "other": 1}}))
    row = gradient_row(path)
    assert row["passes"] == 6 and row["best_so_far"] == [(2, 0.2), (5, 0.15), (6, 0.14)]
    old = json.loads(path.read_text())
    old.pop("passes")
    for h in old["history"]:
        h.pop("passes")
    path.write_text(json.dumps(old))
    # counted the old way: the template (1), then a pass per step and one per check; 2 more at the end
    assert gradient_row(path)["best_so_far"] == [(3, 0.2), (6, 0.15), (8, 0.14)]


def test_run_baselines_writes_the_comparison(filesets, tmp_path):
    spec = load_spec()
    gradient = tmp_path / "gradient" / "result.json"
    gradient.parent.mkdir()
    gradient.write_text(json.dumps({
        "final_params": {"lepton_pt_min": 27.0, "jet_pt_min": 33.0, "jet_eta_max": 2.3, "btag_min": 0.6},
        "history": [{"step": 0, "hard_objective": 0.2}, {"step": 1, "hard_objective": None}],
        "final_objective": {"hard_limit": 0.19}, "events": {"train": 20_000, "train_fileset": str(filesets[0])}}))
    # a second run, trained on other events (same cuts: its held-out point costs no pass of its own)
    other = tmp_path / "elsewhere" / "result.json"
    other.parent.mkdir()
    other.write_text(json.dumps({**json.loads(gradient.read_text()), "final_objective": {"hard_limit": 0.001},
                                 "events": {"train": 20_000, "train_fileset": "/other/events/fileset.json"}}))
    out = tmp_path / "cmp"
    res = run_baselines(spec, load_fileset(filesets[0]), load_fileset(filesets[1]), out, methods=["random", "cmaes"],
                        budget=2, seed=1, gradient_results=[gradient, other.parent], progress=False)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"random", "cmaes", "gradient (jacana, gradient)", "gradient (jacana, elsewhere)"}
    assert rows["random"]["passes"] == rows["cmaes"]["passes"] == 2
    mine, theirs = rows.pop("gradient (jacana, gradient)"), rows.pop("gradient (jacana, elsewhere)")
    assert mine["passes"] == theirs["passes"] == 2 + 1 + 3 and "other_training_events" not in mine
    # its training sigma_mu (0.001) is on other events: it sets no target the others are raced to
    assert theirs["other_training_events"] == "/other/events/fileset.json" and "passes_to_reach_best_train" not in theirs
    assert mine["passes_to_reach_best_train"] is None or mine["train_sigma_mu"] <= 1.01 * min(
        r["train_sigma_mu"] for r in rows.values())
    assert theirs["heldout_sigma_mu"] == mine["heldout_sigma_mu"]
    rows["gradient (jacana)"] = mine
    doc = json.loads((out / "baselines.json").read_text())
    random_run, cmaes_run = doc["methods"]
    assert random_run["history"][0]["params"] == spec.param_values()  # the AGC point first, a real sigma_mu
    assert random_run["train_sigma_mu"] <= random_run["history"][0]["sigma_mu"]
    assert all(_inside(spec, h["params"]) for h in cmaes_run["history"])
    for r in rows.values():
        assert r["heldout_sigma_mu"] is not None and r["heldout_sigma_mu"] > 0 and "history" not in r, r
    assert rows["random"]["heldout_over_agc"] == pytest.approx(rows["random"]["heldout_sigma_mu"]
                                                               / res["agc_heldout_sigma_mu"])
    table = (out / "comparison.md").read_text()
    assert "| random | 2 |" in table and "| gradient (jacana, gradient) | 6 |" in table
    assert "gradient (jacana, elsewhere) was trained on other events (/other/events/fileset.json)" in table
    saved = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["random", "cmaes", "gradient (jacana, gradient)",
                                                     "gradient (jacana, elsewhere)"]
    assert len(random_run["history"]) == 2
    assert (out / "plots" / "convergence.png").is_file()


def test_a_bootstrap_scan_judges_every_method_on_its_replicas(filesets, tmp_path):
    """With a --bootstrap scan of the held-out events, each row carries its paired difference to the
    grid's best (on the scan's replicas); the scan's own points cost the held-out objective nothing."""
    from jacana.analysis.studies.baselines import scan_bootstrap
    from jacana.analysis.studies.hardobjective import HardObjective
    from jacana.analysis.studies.scan import paired_noise, parse_axes, run_scan

    spec = load_spec()
    validation = load_fileset(filesets[1])
    scan = run_scan(spec, validation, parse_axes(["jet_pt_min=25:35:2"], spec), tmp_path / "scan", progress=False,
                    plots=False, bootstrap=8, bootstrap_seed=2)
    res = run_baselines(spec, load_fileset(filesets[0]), validation, tmp_path / "cmp", methods=["random"], budget=2,
                        seed=1, scan=tmp_path / "scan", progress=False, plots=False)
    row = next(r for r in res["rows"] if r["method"] == "random")
    noise = row["heldout_noise"]
    # the same numbers as evaluating the point on the scan's replicas directly
    own = HardObjective(spec, validation, bootstrap=8, bootstrap_seed=2).evaluate(row["params"])
    best = next(p for p in scan["points"] if p["index"] == scan["best"]["index"])
    assert noise == paired_noise(own, best) and noise["replicas"] == 8
    assert "minus the held-out grid's best" in res["markdown"] and ("(within)" in res["markdown"]
                                                                   or "(**beyond**)" in res["markdown"])
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["bootstrap"] == {"replicas": 8, "seed": 2,
                                                                                         "z": 2.0}
    # a scan without replicas, or of other events, judges nothing
    run_scan(spec, validation, parse_axes(["jet_pt_min=25:25:1"], spec), tmp_path / "plain", progress=False,
             plots=False)
    n = scan["events"]
    assert scan_bootstrap(tmp_path / "plain", spec, validation, n) == (
        None, "the scan's bootstrap replicas are not used: it was made without --bootstrap")
    assert "not the held-out" in scan_bootstrap(tmp_path / "scan", spec, load_fileset(filesets[0]), n)[1]
    assert "another config" in scan_bootstrap(tmp_path / "scan", load_spec(overrides={"cuts.min_jets": 5}),
                                              validation, n)[1]
    ref, why = scan_bootstrap(tmp_path / "scan", spec, validation, n)
    assert why is None and ref["replicas"] == 8 and len(ref["points"]) == 3  # 2 grid points and the AGC point


def test_start_points_spread_inside_the_bounds():
    spec = load_spec()
    points = start_points(spec, 5, seed=3, spread=0.25)
    assert points[0] == spec.param_values() and len(points) == 5
    assert points == start_points(spec, 5, seed=3, spread=0.25)
    for p in points[1:]:
        for k, v in p.items():
            par = spec.parameters[k]
            assert par.lower <= v <= par.upper and abs(v - par.value) <= 0.25 * (par.upper - par.lower) + 1e-12
    # Latin hypercube: every parameter takes 4 distinct values over the 4 spread starts
    assert all(len({p[k] for p in points[1:]}) == 4 for k in ("jet_pt_min", "btag_min"))
    with pytest.raises(ConfigError, match="spread"):
        start_points(spec, 3, spread=1.5)
    stats = spread([{"final_params": {"a": 1.0}, "heldout_sigma_mu": 0.1, "train_hard_objective": 0.2},
                    {"final_params": {"a": 3.0}, "heldout_sigma_mu": 0.3, "train_hard_objective": 0.2},
                    {"error": "diverged"}])
    assert stats["params"]["a"] == {"n": 2, "mean": 2.0, "std": pytest.approx(np.sqrt(2)), "min": 1.0, "max": 3.0}
    assert stats["succeeded"] == 2 and stats["failed"] == 1


@pytest.mark.slow
def test_multistart_two_starts(filesets, tmp_path):
    from jacana.cli.main import main

    out = tmp_path / "ms"
    assert main(["optimize", "--fileset", str(filesets[0]), "--validation-fileset", str(filesets[1]),
                 "--steps", "2", "--starts", "2", "--out", str(out), "--quiet"]) == 0
    doc = json.loads((out / "multistart.json").read_text())
    assert len(doc["runs"]) == 2 and doc["spread"]["succeeded"] == 2
    for k, run in enumerate(doc["runs"]):
        result = json.loads((out / f"start_{k}" / "result.json").read_text())
        assert result["initial_params"] == pytest.approx(doc["start_points"][k])
        assert run["heldout_sigma_mu"] == result["validation"]["after"]["expected"]["sigma_mu"]
        assert run["passes"] == gradient_passes(result)["train"]
    assert doc["runs"][0]["initial_params"] == load_spec().param_values()
    assert doc["runs"][1]["initial_params"] != doc["runs"][0]["initial_params"]
    finals = [r["final_params"]["jet_pt_min"] for r in doc["runs"]]
    st = doc["spread"]["params"]["jet_pt_min"]
    assert st["min"] == min(finals) and st["max"] == max(finals) and st["mean"] == pytest.approx(np.mean(finals))
    assert (out / "plots" / "multistart.png").stat().st_size > 10_000
    # what jacana scan / baselines --gradient-result read from the folder: every start's optimum
    from jacana.analysis.studies.scan import load_gradient_results

    judged = load_gradient_results([out])
    assert [g["label"] for g in judged] == ["start 0", "start 1"]
    assert [g["params"] for g in judged] == [r["final_params"] for r in doc["runs"]]


def test_multistart_on_dask_gathers_every_start(filesets, tmp_path, monkeypatch):
    """The parallel path (one dask task per start) with a stand-in optimiser: plumbing, order, spread, errors."""
    from distributed import Client, LocalCluster

    import jacana.analysis.optimize as optimize
    from jacana.analysis.studies.multistart import run_multistart
    from jacana.stages.errors import JacanaError

    def fake_run_optimize(spec, train, validation, out, settings, **kwargs):
        p = spec.param_values()
        if p["jet_pt_min"] > 45:
            raise JacanaError("diverged")
        final = {**p, "jet_pt_min": 0.5 * (p["jet_pt_min"] + 35.0)}
        result = {"initial_params": p, "final_params": final, "objective": "sigma_mu", "stopped": "steps",
                  "history": [{"step": 0, "hard_objective": 0.2}], "final_objective": {"hard_limit": 0.1},
                  "validation": {"before": {"expected": {"sigma_mu": 0.2}},
                                 "after": {"expected": {"sigma_mu": 0.1 + 0.001 * final["jet_pt_min"]}}}}
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "result.json").write_text(json.dumps(result))  # as the real one leaves it
        return result

    monkeypatch.setattr(optimize, "run_optimize", fake_run_optimize)
    settings = optimize.OptimizeSettings(steps=1)
    spec = load_spec()
    with LocalCluster(n_workers=2, processes=False, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        doc = run_multistart(spec, load_fileset(filesets[0]), load_fileset(filesets[1]), tmp_path, settings,
                             starts=4, spread_fraction=1.0, seed=2, client=client, progress=False)
    assert doc["parallel"] and [r["start"] for r in doc["runs"]] == [0, 1, 2, 3]
    points = start_points(spec, 4, seed=2, spread=1.0)
    ok = [r for r in doc["runs"] if not r.get("error")]
    failed = [r for r in doc["runs"] if r.get("error")]
    assert len(failed) == sum(p["jet_pt_min"] > 45 for p in points) and all("diverged" in r["error"] for r in failed)
    finals = [0.5 * (points[r["start"]]["jet_pt_min"] + 35.0) for r in ok]
    st = doc["spread"]["params"]["jet_pt_min"]
    assert st["n"] == len(ok) and st["mean"] == pytest.approx(np.mean(finals))
    assert doc["best_start"]["start"] == min(ok, key=lambda r: r["heldout_sigma_mu"])["start"]
    assert doc["passes"]["train"] == len(ok) * (1 + 1 + 3)
    assert json.loads((tmp_path / "multistart.json").read_text())["spread"] == doc["spread"]
    # jacana scan / baselines --gradient-result on the folder: the starts that finished, in order
    from jacana.analysis.studies.scan import load_gradient_results

    judged = load_gradient_results([tmp_path])
    assert [g["label"] for g in judged] == [f"start {r['start']}" for r in ok]
    assert [g["params"]["jet_pt_min"] for g in judged] == pytest.approx(finals)
