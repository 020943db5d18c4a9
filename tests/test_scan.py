"""``jacana scan``: the hard-analysis landscape equals hard_evaluation point by point, resumes, fails clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jacana.cli.main import main
from jacana.analysis.studies.scan import parse_axes, parse_axis, run_scan
from jacana.stages.errors import ConfigError
from jacana.stages.fileset import load_fileset
from jacana.stages.spec import load_spec


@pytest.fixture(scope="module")
def fileset(train_validate_20k):
    """The session's 20k-event training dataset (conftest.py): one file per (sample, variation), since a
    hard pass costs per chunk and these tests make ~10 of them."""
    return train_validate_20k[0]


@pytest.fixture
def gradient_result(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"final_params": {"lepton_pt_min": 30.0, "jet_pt_min": 29.0, "jet_eta_max": 2.4,
                                                 "btag_min": 0.62}}))
    return path


def test_cli_1d_scan_equals_hard_evaluation(fileset, tmp_path, capsys):
    from jacana.analysis.evaluate import hard_evaluation

    out = tmp_path / "scan"
    results = []
    for name, btag in (("run_a", 0.7), ("run_b", 0.5)):  # optima on grid points: judged without a pass of their own
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps({"final_params": {**load_spec().param_values(),
                                                                                  "btag_min": btag}}))
        results.append(str(tmp_path / name))
    assert main(["scan", "--fileset", str(fileset), "--params", "btag_min=0.5:0.7:2", "--out", str(out),
                 "--gradient-result", *results, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "gradient optimum run_a: sigma_mu" in printed and "of 2 gradient optima: 2 within one grid step" in printed
    scan = json.loads((out / "scan.json").read_text())
    assert [g["sigma_mu"] for g in scan["gradients"]] == [p["sigma_mu"] for p in scan["points"][::-1]]
    assert scan["complete"] and [p["params"]["btag_min"] for p in scan["points"]] == [0.5, 0.7]
    assert scan["passes"] == 2  # the AGC point (btag_min 0.5) is a grid point: no extra pass
    spec = load_spec()
    for p in scan["points"]:
        assert p["params"] == {**spec.param_values(), "btag_min": p["params"]["btag_min"]}
    ref = hard_evaluation(spec.with_params(scan["points"][1]["params"]), load_fileset(fileset))
    assert scan["points"][1]["sigma_mu"] == pytest.approx(ref["result"]["expected"]["sigma_mu"], rel=1e-12)
    assert scan["agc"]["sigma_mu"] == scan["points"][0]["sigma_mu"]
    assert np.asarray(scan["sigma_mu"]).shape == (2,)
    assert (out / "plots" / "scan.png").stat().st_size > 10_000


def _multistart(folder, runs):
    """A ``jacana optimize --starts`` folder: multistart.json and each finished start's result.json."""
    folder.mkdir()
    for run in runs:
        if run.get("final_params"):
            (folder / f"start_{run['start']}").mkdir()
            result = {"final_params": run["final_params"], "history": run.get("history", [])}
            (folder / f"start_{run['start']}" / "result.json").write_text(json.dumps(result))
    (folder / "multistart.json").write_text(json.dumps({"runs": runs}))
    return folder


def test_2d_scan_best_gradient_and_resume(fileset, tmp_path, gradient_result):
    spec = load_spec()
    axes = parse_axes(["jet_pt_min=25:30:2", "btag_min=0.5:0.7:2"], spec)
    out = tmp_path / "scan2"
    # several optima at once: a result, and a multi-start run's finished starts (its folder moved since:
    # start 0's recorded folder is gone, found beside multistart.json); a failed start is skipped
    agc = spec.param_values()
    starts = _multistart(tmp_path / "ms", [
        {"start": 0, "out": "/moved/away/start_0", "final_params": {**agc, "jet_pt_min": 25.0},
         "history": [{"step": k, "params": {**agc, "jet_pt_min": v}} for k, v in enumerate((45.0, 33.0, 25.0))]},
        {"start": 1, "out": str(tmp_path / "ms" / "start_1"), "final_params": json.loads(
            gradient_result.read_text())["final_params"]},
        {"start": 2, "out": str(tmp_path / "ms" / "start_2"), "error": "NonFiniteError: ..."}])
    result = run_scan(spec, load_fileset(fileset), axes, out, gradient_results=[gradient_result, starts],
                      progress=False)
    grid = np.asarray(result["sigma_mu"])
    assert grid.shape == (2, 2) and np.all(np.isfinite(grid))
    # the AGC point is on the grid, start 0 too, and start 1 is the first result's point: one pass for all three
    assert result["passes"] == 4 + 1
    assert result["best"]["sigma_mu"] == grid.min()
    near = [p["sigma_mu"] for p in result["near_best"]["points"]]
    assert near[0] == grid.min() and near == sorted(near) and len(near) == int(np.sum(grid <= grid.min() * 1.01))
    i, j = np.unravel_index(np.argmin(grid), grid.shape)
    assert result["best"]["params"]["jet_pt_min"] == [25.0, 30.0][i]
    assert result["best"]["params"]["btag_min"] == pytest.approx([0.5, 0.7][j])
    for p in result["points"]:  # grid index and stored value agree, the last axis fastest
        assert grid[tuple(p["index"])] == p["sigma_mu"]
    g, start0, start1 = result["gradients"]
    assert [x["label"] for x in result["gradients"]] == [tmp_path.name, "ms start 0", "ms start 1"]
    assert start0["source"] == str(tmp_path / "ms" / "start_0" / "result.json")
    assert g["params"]["jet_pt_min"] == 29.0 and g["sigma_mu"] > 0 and start1["sigma_mu"] == g["sigma_mu"]
    assert start0["sigma_mu"] == grid[0, 0]
    # its steps, for the plot's path from start to optimum (a result without a history has none)
    assert start0["path"] == {"jet_pt_min": [45.0, 33.0, 25.0], "btag_min": [agc["btag_min"]] * 3}
    assert "path" not in g
    best = result["best"]["params"]
    for x, point in ((g, (29.0, 0.62)), (start0, (25.0, 0.5))):
        assert x["over_grid_best"] == pytest.approx(x["sigma_mu"] / grid.min())
        assert x["within_near_best"] == (x["sigma_mu"] <= 1.01 * grid.min())
        assert x["grid_steps_from_best"] == pytest.approx({"jet_pt_min": abs(point[0] - best["jet_pt_min"]) / 5,
                                                           "btag_min": abs(point[1] - best["btag_min"]) / 0.2})
        assert x["within_one_grid_step"]  # a 2 x 2 grid: every point is within one step of every other
    judged = result["gradients_judged"]
    assert judged == {"n": 3, "within_one_grid_step": 3, "within_noise": None,
                      "within_near_best": sum(x["within_near_best"] for x in (g, start0, start1)),
                      "both": judged["within_near_best"]}
    assert (out / "plots" / "scan.png").stat().st_size > 10_000
    with pytest.raises(ConfigError, match="needs one gradient result, got 3"):
        run_scan(spec, load_fileset(fileset), axes, out, gradient_results=[gradient_result, starts], hold="gradient")
    with pytest.raises(ConfigError, match="has no start that finished"):
        run_scan(spec, load_fileset(fileset), axes, out, gradient_results=[_multistart(tmp_path / "failed", [
            {"start": 0, "error": "NonFiniteError: ..."}])])

    # an interrupted scan, made before several optima were judged ("gradient": one entry): the last two
    # grid points are lost; the rerun computes only what is missing ((30, 0.5) is the AGC point, stored
    # apart: only (30, 0.7) costs a pass)
    saved = json.loads((out / "scan.json").read_text())
    saved["points"], saved["complete"] = saved["points"][:2], False
    saved["gradient"] = saved.pop("gradients")[0]
    (out / "scan.json").write_text(json.dumps(saved))
    again = run_scan(spec, load_fileset(fileset), axes, out, gradient_results=[gradient_result], progress=False,
                     plots=False)
    assert again["passes"] == 1 and again["reused_points"] == 2 + 1 + 1
    assert again["sigma_mu"] == result["sigma_mu"]


@pytest.mark.parametrize("text, message", [
    ("jet_pt_mn=25:45:9", "did you mean 'jet_pt_min'"),
    ("btag_min=0.5:1.2:5", "[0.05, 0.98]"),
    ("jet_pt_min=10:45:9", "'jet_pt_min': range 10:45 leaves its bounds [20, 100]"),
    ("jet_pt_min=25:45:3:4", "must be lo:hi:n"),
    ("jet_pt_min=45:25:3", "above hi"),
    ("jet_pt_min=25:45:0", "n must be >= 1"),
    ("jet_pt_min", "name=lo:hi:n"),
])
def test_bad_scan_parameters(text, message):
    with pytest.raises(ConfigError) as err:
        parse_axis(text, load_spec())
    assert message in str(err.value)


def test_default_resolution():
    axis = parse_axis("jet_pt_min=25:45", load_spec())
    assert axis.n == 9 and axis.values[0] == 25.0 and axis.values[-1] == 45.0 and axis.step == 2.5


def test_bad_scan_on_the_command_line(tmp_path, capsys):
    # checked before any data is generated or read
    assert main(["scan", "--params", "btag_min=0.5:1.5:3", "--out", str(tmp_path)]) == 2
    assert "btag_min" in capsys.readouterr().err
    assert main(["scan", "--params", "jet_pt_min=25:45:3", "btag_min=0.5:0.9:3", "jet_eta_max=2:2.4:2",
                 "--out", str(tmp_path)]) == 2
    assert "one or two parameters" in capsys.readouterr().err
    for bad in ("2000", "1", "-3"):  # one replica has no spread
        assert main(["scan", "--params", "btag_min=0.5:0.7:3", "--bootstrap", bad, "--out", str(tmp_path)]) == 2
        assert f"0 (none) or 2 to 1023, got {bad}" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="must differ"):
        parse_axes(["btag_min=0.5:0.9:3", "btag_min=0.5:0.9:3"], load_spec())


@pytest.mark.parametrize("command", ["scan", "baselines"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and f"usage: jacana {command}" in capsys.readouterr().out


def test_gradient_result_takes_the_complete_optimum_from_params_json(tmp_path):
    from jacana.analysis.studies.scan import load_gradient_result

    final = {"jet_pt_min": 33.0, "edges_4j1b": [110, 300, 550]}
    (tmp_path / "result.json").write_text(json.dumps({"final_params": final}))
    (tmp_path / "params.json").write_text(json.dumps({"params": {"jet_pt_min": 33.0, "edges_4j1b": [110, 300, 550],
                                                                 "nn": {"w0": [[0.1]]}},
                                                      "overrides": ["regions.4j1b.observable=nn"]}))
    g = load_gradient_result(tmp_path)
    assert g["params"] == {"jet_pt_min": 33.0}
    assert set(g["extra"]) == {"edges_4j1b", "nn"} and g["overrides"] == ["regions.4j1b.observable=nn"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_gradient_result(tmp_path / "nothing.json")


# --------------------------------------------------------------------------------------------
# Bootstrap: the landscape's Monte Carlo noise
# --------------------------------------------------------------------------------------------
def test_bootstrap_multipliers_are_poisson_one_and_independent_of_chunking():
    from jacana.stages.columns import bootstrap_multipliers

    whole = bootstrap_multipliers("ttbar__nominal__0.root", 1000, 200_000, 3, seed=4)
    assert whole.shape == (4, 200_000) and whole.dtype == np.uint8 and (whole[0] == 1).all()
    for row in whole[1:]:  # Poisson(1): mean 1, variance 1, P(0) = 1/e
        assert row.mean() == pytest.approx(1.0, abs=0.01)
        assert row.var() == pytest.approx(1.0, abs=0.02)
        assert (row == 0).mean() == pytest.approx(np.exp(-1), abs=0.005)
    assert not np.array_equal(whole[1], whole[2])  # replicas differ from each other
    parts = [bootstrap_multipliers("ttbar__nominal__0.root", 1000 + a, b - a, 3, seed=4)
             for a, b in ((0, 70_000), (70_000, 200_000))]
    assert np.array_equal(np.concatenate(parts, axis=1), whole)  # any chunking: the same draws per event
    assert not np.array_equal(bootstrap_multipliers("ttbar__nominal__0.root", 1000, 200_000, 3, seed=5)[1], whole[1])
    assert not np.array_equal(bootstrap_multipliers("ttbar__nominal__1.root", 1000, 200_000, 3, seed=4)[1], whole[1])
    with pytest.raises(ValueError, match="1 to 1023"):
        bootstrap_multipliers("f.root", 0, 10, 0)


def test_replica_histograms_count_each_copy_as_an_event(fileset):
    """Row 0 (ones) is bit-identical to the plain fill; a replica equals filling each event k times."""
    from jacana.stages.columns import read_chunk
    from jacana.stages.reference import fill_histograms, to_arrays
    from jacana.facility.hardrun import analysis_chunks

    spec = load_spec()
    chunk = next(c for c in analysis_chunks(spec, load_fileset(fileset), 10_000) if c.sample == "ttbar"
                 and c.variation == "nominal")
    columns = read_chunk(chunk, spec)
    k = np.stack([np.ones(chunk.n_events, np.uint8), np.random.default_rng(1).poisson(1.0, chunk.n_events)]).astype(np.uint8)
    plain = fill_histograms(columns, spec)
    with_replicas = fill_histograms(columns, spec, k)
    # the replica, built by hand: the chunk's columns with every event repeated k times
    from jacana.stages.columns import Columns

    idx = np.repeat(np.arange(chunk.n_events), k[1])
    copied = Columns(chunk=chunk, arrays={n: a[idx] for n, a in columns.arrays.items()},
                     jer_factor=columns.jer_factors()[idx])
    by_hand = fill_histograms(_with_events(copied, len(idx)), spec)
    for region in plain:
        for var in plain[region]:
            a, r = to_arrays(plain[region][var]), to_arrays(with_replicas[region][var])
            assert r["sumw"].shape == (2, len(a["edges"]) - 1)
            assert np.array_equal(r["sumw"][0], a["sumw"]) and np.array_equal(r["sumw2"][0], a["sumw2"])
            h = to_arrays(by_hand[region][var])
            np.testing.assert_allclose(r["sumw"][1], h["sumw"], rtol=1e-12)
            np.testing.assert_allclose(r["sumw2"][1], h["sumw2"], rtol=1e-12)  # k w^2, not (k w)^2
    assert any(not np.allclose(to_arrays(with_replicas[r][v])["sumw"][1], to_arrays(plain[r][v])["sumw"])
               for r in plain for v in plain[r])


def _with_events(columns, n):
    """``columns`` whose chunk claims ``n`` events (the hand-made replica's length)."""
    import dataclasses

    return dataclasses.replace(columns, chunk=dataclasses.replace(columns.chunk, entry_stop=columns.chunk.entry_start + n))


def test_robust_sd_ignores_a_single_outlier_replica():
    from jacana.analysis.studies.scan import robust_sd

    normal = np.random.default_rng(4).normal(0.05, 0.002, 30)
    assert robust_sd(normal) == pytest.approx(0.002, rel=0.35)
    spiked = normal.copy()
    spiked[0] = 0.09  # one replica far out: the plain sd doubles and more, the robust one barely moves
    assert np.std(spiked, ddof=1) > 2 * np.std(normal, ddof=1)
    assert robust_sd(spiked) == pytest.approx(robust_sd(normal), rel=0.15)


@pytest.mark.slow  # (17 s; tests/test_baselines.py's bootstrap test runs a bootstrap scan by default)
def test_bootstrap_scan_is_the_plain_scan_plus_paired_noise(fileset, tmp_path, gradient_result):
    spec = load_spec()
    fs = load_fileset(fileset)
    axes = parse_axes(["jet_pt_min=25:45:3"], spec)
    plain = run_scan(spec, fs, axes, tmp_path / "plain", progress=False, plots=False)
    boot = run_scan(spec, fs, axes, tmp_path / "boot", gradient_results=[gradient_result], progress=False,
                    bootstrap=6, bootstrap_seed=3)
    # the replicas ride along: sigma_mu itself is unchanged, bit for bit, and it costs no extra pass
    assert [p["sigma_mu"] for p in boot["points"]] == [p["sigma_mu"] for p in plain["points"]]
    assert boot["passes"] == plain["passes"] + 1  # + the gradient point
    best = next(p for p in boot["points"] if p["index"] == boot["best"]["index"])
    assert best["bootstrap"]["diff_to_best"] == 0 and best["bootstrap"]["within_noise"]
    noise = boot["within_noise_of_best"]
    assert noise["replicas"] == 6 and boot["best"]["params"]["jet_pt_min"] in [
        p["params"]["jet_pt_min"] for p in noise["points"]]
    for p in boot["points"]:
        b = p["bootstrap"]
        assert len(p["sigma_mu_replicas"]) == 6 and b["sigma_mu_sd"] > 0
        assert b["within_noise"] == (b["diff_to_best"] <= 2.0 * b["diff_sd"])
        # paired: the spread of the replica-by-replica differences, not of each point's own values;
        # robust (1.4826 x MAD), with the plain standard deviations beside it
        diffs = np.subtract(p["sigma_mu_replicas"], best["sigma_mu_replicas"])
        assert b["diff_sd"] == pytest.approx(1.4826 * np.median(np.abs(diffs - np.median(diffs))), rel=1e-12)
        assert b["diff_std"] == pytest.approx(np.std(diffs, ddof=1), rel=1e-12)
        assert b["sigma_mu_std"] == pytest.approx(np.std(p["sigma_mu_replicas"], ddof=1), rel=1e-12)
        assert (b["diff_sd"] > 0) == (p is not best)
    (judged,) = boot["gradients"]
    assert judged["bootstrap"]["replicas"] == 6 and boot["gradients_judged"]["within_noise"] == int(
        judged["bootstrap"]["within_noise"])
    assert (tmp_path / "boot" / "plots" / "scan.png").stat().st_size > 10_000
    # resume: every point is reused with its replicas; a plain scan's points are not (other context)
    again = run_scan(spec, fs, axes, tmp_path / "boot", gradient_results=gradient_result, progress=False,
                     plots=False, bootstrap=6, bootstrap_seed=3)
    assert again["passes"] == 0 and again["within_noise_of_best"] == noise
    one = parse_axes(["jet_pt_min=25:25:1"], spec)  # a point the plain scan has: recomputed, with replicas
    other = run_scan(spec, fs, one, tmp_path / "plain", progress=False, plots=False, bootstrap=6, bootstrap_seed=3)
    assert other["reused_points"] == 0 and other["passes"] == 2 and len(other["points"][0]["sigma_mu_replicas"]) == 6


def test_several_gradient_results_get_unique_labels(tmp_path):
    from jacana.analysis.studies.scan import load_gradient_results

    paths = []
    for where in ("seed1/run", "seed3/run", "other"):
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "result.json").write_text(json.dumps({"final_params": {"jet_pt_min": 25.0}}))
        paths.append(tmp_path / where)
    (tmp_path / "by_hand.json").write_text(json.dumps({"final_params": {"jet_pt_min": 27.0}}))
    judged = load_gradient_results([*paths, tmp_path / "by_hand.json"])
    # two folders named "run": each is told apart by its full path; the others keep their short names
    assert [g["label"] for g in judged] == [str(paths[0] / "result.json"), str(paths[1] / "result.json"),
                                             "other", "by_hand"]
    assert load_gradient_results([]) == [] and [g["label"] for g in load_gradient_results(paths[2])] == ["other"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_gradient_results([paths[2], tmp_path / "missing"])
    with pytest.raises(ConfigError, match="'.*seed1' has neither a result.json .* nor a multistart.json"):
        load_gradient_results([tmp_path / "seed1"])
