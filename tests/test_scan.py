"""``jacana scan``: the hard-analysis landscape equals hard_evaluation point by point, resumes, fails clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jacana.analysis.cli import main
from jacana.analysis.scan import parse_axes, parse_axis, run_scan
from jacana.stages.errors import ConfigError
from jacana.stages.fileset import load_fileset
from jacana.stages.spec import load_spec


@pytest.fixture(scope="module")
def fileset(tmp_path_factory):
    from jacana.facility.synthetic import generate

    # one file per (sample, variation): a hard pass costs per chunk, and these tests make ~10 of them
    return generate(tmp_path_factory.mktemp("scan"), events=20_000, seed=21, files_per_sample=1, progress=False)


@pytest.fixture
def gradient_result(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"final_params": {"lepton_pt_min": 30.0, "jet_pt_min": 29.0, "jet_eta_max": 2.4,
                                                 "btag_min": 0.62}}))
    return path


def test_cli_1d_scan_equals_hard_evaluation(fileset, tmp_path):
    from jacana.analysis.evaluate import hard_evaluation

    out = tmp_path / "scan"
    assert main(["scan", "--fileset", str(fileset), "--params", "btag_min=0.5:0.7:2", "--out", str(out),
                 "--quiet"]) == 0
    scan = json.loads((out / "scan.json").read_text())
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


def test_2d_scan_best_gradient_and_resume(fileset, tmp_path, gradient_result):
    spec = load_spec()
    axes = parse_axes(["jet_pt_min=25:30:2", "btag_min=0.5:0.7:2"], spec)
    out = tmp_path / "scan2"
    result = run_scan(spec, load_fileset(fileset), axes, out, gradient_result=gradient_result, progress=False)
    grid = np.asarray(result["sigma_mu"])
    assert grid.shape == (2, 2) and np.all(np.isfinite(grid))
    assert result["passes"] == 4 + 1  # the AGC point is on the grid; the gradient optimum is not
    assert result["best"]["sigma_mu"] == grid.min()
    near = [p["sigma_mu"] for p in result["near_best"]["points"]]
    assert near[0] == grid.min() and near == sorted(near) and len(near) == int(np.sum(grid <= grid.min() * 1.01))
    i, j = np.unravel_index(np.argmin(grid), grid.shape)
    assert result["best"]["params"]["jet_pt_min"] == [25.0, 30.0][i]
    assert result["best"]["params"]["btag_min"] == pytest.approx([0.5, 0.7][j])
    for p in result["points"]:  # grid index and stored value agree, the last axis fastest
        assert grid[tuple(p["index"])] == p["sigma_mu"]
    g = result["gradient"]
    assert g["params"]["jet_pt_min"] == 29.0 and g["sigma_mu"] > 0
    assert g["over_grid_best"] == pytest.approx(g["sigma_mu"] / grid.min())
    best = result["best"]["params"]
    assert g["within_one_grid_step"] == (abs(29.0 - best["jet_pt_min"]) <= 5 and abs(0.62 - best["btag_min"]) <= 0.2)
    assert (out / "plots" / "scan.png").stat().st_size > 10_000

    # an interrupted scan: the last two grid points are lost; the rerun computes only what is missing
    # ((30, 0.5) is the AGC point, stored apart: only (30, 0.7) costs a pass)
    saved = json.loads((out / "scan.json").read_text())
    saved["points"], saved["complete"] = saved["points"][:2], False
    (out / "scan.json").write_text(json.dumps(saved))
    again = run_scan(spec, load_fileset(fileset), axes, out, gradient_result=gradient_result, progress=False,
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
    with pytest.raises(ConfigError, match="must differ"):
        parse_axes(["btag_min=0.5:0.9:3", "btag_min=0.5:0.9:3"], load_spec())


@pytest.mark.parametrize("command", ["scan", "baselines"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and f"usage: jacana {command}" in capsys.readouterr().out


def test_gradient_result_takes_the_complete_optimum_from_params_json(tmp_path):
    from jacana.analysis.scan import load_gradient_result

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
