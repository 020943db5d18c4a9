"""pyhf's own (numpy + minuit) inference on a workspace: the figures of merit that count.

These are non-differentiable reference numbers: the fitted POI with its uncertainty on the
observations, the expected (Asimov) uncertainty on the POI, and the expected discovery
significance. pyhf's backend is process-global state, so every call here switches to
numpy + minuit and restores whatever backend was active before.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import numpy as np
import pyhf


@contextlib.contextmanager
def numpy_backend():
    """Run a block with pyhf's numpy backend and minuit, restoring the previous backend."""
    previous_backend, previous_optimizer = pyhf.get_backend()
    pyhf.set_backend("numpy", pyhf.optimize.minuit_optimizer(tolerance=1e-4, strategy=2))
    try:
        yield
    finally:
        pyhf.set_backend(previous_backend, previous_optimizer)


def model_and_data(workspace_spec: Mapping[str, Any]):
    ws = pyhf.Workspace(dict(workspace_spec))
    model = ws.model()  # pyhf defaults: normsys code4, histosys code4p (as cabinetry)
    return model, ws.data(model)


def asimov_data(model, poi_value: float = 1.0) -> np.ndarray:
    """Expected data (with auxdata) at POI = ``poi_value`` and nuisances at their initial values."""
    pars = np.asarray(model.config.suggested_init(), dtype=np.float64)
    pars[model.config.poi_index] = poi_value
    return np.asarray(model.expected_data(pars), dtype=np.float64)


def _fit(data, model) -> tuple[np.ndarray, np.ndarray]:
    result = pyhf.infer.mle.fit(data, model, return_uncertainties=True)
    result = np.asarray(result, dtype=np.float64)
    return result[:, 0], result[:, 1]


def evaluate_workspace(workspace_spec: Mapping[str, Any], significance: bool = True) -> dict:
    """Fit the observations and the Asimov data with pyhf (numpy, minuit).

    Returns ``{"ttbar_norm": {"value", "uncertainty"}, "expected": {"sigma_mu", "z0"}}``
    keyed by the workspace's POI name.
    """
    with numpy_backend():
        model, data = model_and_data(workspace_spec)
        poi = model.config.poi_name
        idx = model.config.poi_index
        best, unc = _fit(data, model)
        asimov = asimov_data(model, 1.0)
        _, asimov_unc = _fit(asimov, model)
        out = {poi: {"value": float(best[idx]), "uncertainty": float(unc[idx])},
               "expected": {"sigma_mu": float(asimov_unc[idx])}}
        if significance:
            p0 = pyhf.infer.hypotest(0.0, asimov, model, test_stat="q0")
            p0 = float(np.asarray(p0))
            out["expected"]["z0"] = float(-_norm_ppf(p0)) if p0 > 0 else math.inf
        return out


def _norm_ppf(p: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(p))


def impacts(workspace_spec: Mapping[str, Any], include_staterror: bool = False) -> list[dict]:
    """Post-fit impacts on the POI of each nuisance parameter, on Asimov data.

    For each parameter: fix it at its best fit +/- its post-fit uncertainty, refit, and
    record the shift of the POI. Returns ``[{"name", "up", "down"}]`` (one entry per
    scalar; per-bin staterror parameters only when ``include_staterror``).
    """
    with numpy_backend():
        model, _ = model_and_data(workspace_spec)
        data = asimov_data(model, 1.0)
        best, unc = _fit(data, model)
        poi_idx = model.config.poi_index
        out = []
        for name in model.config.par_order:
            if name == model.config.poi_name or (not include_staterror and name.startswith("staterror")):
                continue
            sl = model.config.par_slice(name)
            for k, idx in enumerate(range(sl.start, sl.stop)):
                if model.config.suggested_fixed()[idx]:
                    continue
                shifts = {}
                for direction, sign in (("up", 1.0), ("down", -1.0)):
                    init = list(best)
                    init[idx] = best[idx] + sign * unc[idx]
                    fixed = list(model.config.suggested_fixed())
                    fixed[idx] = True
                    refit = pyhf.infer.mle.fit(data, model, init_pars=init, fixed_params=fixed)
                    shifts[direction] = float(np.asarray(refit)[poi_idx] - best[poi_idx])
                label = name if sl.stop - sl.start == 1 else f"{name}[{k}]"
                out.append({"name": label, **shifts})
        return out
