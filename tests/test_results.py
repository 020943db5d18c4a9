"""Typed results: result.json round trips, older layouts load, bad files are named."""

from __future__ import annotations

import json

import pytest

from jacana.analysis.results import OptimizationResult
from jacana.stages.errors import ConfigError

OLD = {  # a result.json of an early release: no "passes", no "free_params", no "selected"
    "objective": "sigma_mu",
    "initial_params": {"jet_pt_min": 30.0, "btag_min": 0.5},
    "final_params": {"jet_pt_min": 24.5, "btag_min": 0.61},
    "stopped": "steps",
    "history": [{"step": 0, "loss": 0.1, "objective": 0.1, "hard_objective": 0.11},
                {"step": 1, "loss": 0.09, "objective": 0.09, "hard_objective": None}],
    "final_objective": {"hard_limit": 0.095},
    "validation": {"before": {"expected": {"sigma_mu": 0.08}}, "after": {"expected": {"sigma_mu": 0.06}},
                   "sigma_mu_ratio_after_over_before": 0.75},
    "settings": {"binning": False, "nn": False},
}


def test_an_old_result_loads_and_writes_back_unchanged(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps(OLD))
    result = OptimizationResult.load(tmp_path)
    written = result.to_json()
    assert {k: v for k, v in written.items() if k != "passes"} == OLD  # what it had, unchanged
    assert written["passes"] == {"train": 6, "steps": 2, "passes_per_step": 1, "hard_evaluations": 1, "other": 3}
    assert result.sigma_mu_before == 0.08 and result.sigma_mu_after == 0.06
    assert result.params == OLD["final_params"]
    # the passes an old run made, reconstructed: template + 1 per step + 1 hard check + the end's two
    assert result.passes_per_step == 1 and result.train_passes == 1 + 2 + 1 + 2


def test_a_result_without_final_params_is_named(tmp_path):
    bad = dict(OLD)
    del bad["final_params"]
    (tmp_path / "result.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"result\.json.*final_params|final_params.*result\.json"):
        OptimizationResult.load(tmp_path / "result.json")
    with pytest.raises(ConfigError, match="does not exist"):
        OptimizationResult.load(tmp_path / "missing" / "result.json")
