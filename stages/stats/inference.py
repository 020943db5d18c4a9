"""pyhf's own (numpy) inference on a workspace: the figures of merit that count.

These are non-differentiable reference numbers: the fitted POI with its uncertainty on the
observations, the expected (Asimov) uncertainty on the POI, and the expected discovery
significance. pyhf's backend is process-global state, so every call here switches to
numpy (scipy optimiser) and restores whatever backend was active before.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import numpy as np
import pyhf

from jacana.stages.errors import JacanaError


class FitError(JacanaError, RuntimeError):
    """pyhf's fit failed to converge (e.g. templates too sparse for the model)."""


@contextlib.contextmanager
def numpy_backend(optimizer=None):
    """Run a block with pyhf's numpy backend, restoring the previous backend afterwards."""
    previous_backend, previous_optimizer = pyhf.get_backend()
    pyhf.set_backend("numpy", optimizer or pyhf.optimize.scipy_optimizer())
    try:
        yield
    finally:
        pyhf.set_backend(previous_backend, previous_optimizer)


def model_and_data(workspace_spec: Mapping[str, Any]):
    ws = pyhf.Workspace(dict(workspace_spec))
    model = ws.model()  # pyhf defaults: normsys code4, histosys code4p (as cabinetry)
    return model, ws.data(model)


def asimov_point(model, poi_value: float = 1.0) -> np.ndarray:
    """POI = ``poi_value`` and nuisances at their initial values: the point Asimov data is generated at
    (and so the maximum of its likelihood: no fit to fail)."""
    pars = np.asarray(model.config.suggested_init(), dtype=np.float64)
    pars[model.config.poi_index] = poi_value
    return pars


def asimov_data(model, poi_value: float = 1.0) -> np.ndarray:
    """Expected data (with auxdata) at :func:`asimov_point`."""
    return np.asarray(model.expected_data(asimov_point(model, poi_value)), dtype=np.float64)


def _fit(data, model) -> tuple[np.ndarray, np.ndarray, str]:
    """Best fit (pyhf, numpy, scipy) and uncertainties: ``(best, uncertainties, method)``.

    The uncertainties come from the NLL's Hessian at the minimum (``method`` "hessian"), taken
    by central finite differences of pyhf's own numpy ``logpdf``, not by MINUIT's HESSE: on the
    AGC model HESSE's adaptive steps gave POI uncertainties off by factors of 2 to 100 depending
    on the starting point, while the finite-difference Hessian agrees with the exact (autodiff)
    Fisher information to < 0.1 %. Where that Hessian is not positive definite (a parameter at
    its bound, sparse templates), they come from the expected (Fisher) information at the best
    fit instead (``method`` "fisher", :func:`asimov_information`), which is positive definite by
    construction; the fitted values are kept either way.
    """
    try:
        best = np.asarray(pyhf.infer.mle.fit(data, model), dtype=np.float64)
    except pyhf.exceptions.FailedMinimization as exc:
        raise FitError(f"pyhf's maximum-likelihood fit did not converge: {exc.result.message}") from None
    free = ~np.asarray(model.config.suggested_fixed(), dtype=bool)
    hess = nll_hessian(model, data, best)[np.ix_(free, free)]
    try:
        return best, _uncertainties(hess, free, len(best), "the NLL Hessian at the best fit"), "hessian"
    except FitError:
        info = asimov_information(model, best)[np.ix_(free, free)]
        return best, _uncertainties(info, free, len(best), "the Fisher information at the best fit"), "fisher"


def _uncertainties(hess: np.ndarray, free: np.ndarray, n: int, what: str) -> np.ndarray:
    """sqrt(diag(hess^-1)) on the free parameters (0 on fixed ones); an error, never a silent 0,
    where ``hess`` is singular or not positive definite."""
    try:
        cov = np.linalg.inv(hess)
    except np.linalg.LinAlgError:
        raise FitError(f"{what} is singular: a parameter has no effect") from None
    var = np.diag(cov)
    if not np.all(np.isfinite(var)) or np.any(var <= 0):
        lowest = float(np.linalg.eigvalsh(0.5 * (hess + hess.T))[0])
        raise FitError(f"{what} is not positive definite (lowest eigenvalue {lowest:.3g})")
    unc = np.zeros(n)
    unc[free] = np.sqrt(var)
    return unc


def asimov_information(model, pars, step: float = 1e-5) -> np.ndarray:
    """The expected (Fisher) information at ``pars``: the NLL Hessian on the Asimov data generated there.

    There every main bin has ``n = lambda``, so the Poisson part is exactly
    ``J^T diag(1/lambda) J`` (``J = d lambda / d pars`` by central differences of pyhf's numpy
    ``expected_actualdata``; bins with ``lambda = 0`` carry no information) and the constraint
    part is the finite-difference Hessian of pyhf's ``constraint_logpdf``. Positive semi-definite
    by construction, unlike second differences of the full NLL, whose rounding can make it
    indefinite on models with sparse templates. The same quantity as the traced
    :func:`jacana.stages.stats.objectives.fisher`.
    """
    pars = np.asarray(pars, dtype=np.float64)
    h = step * np.maximum(1.0, np.abs(pars))
    lam0 = np.asarray(model.expected_actualdata(pars), dtype=np.float64)
    jac = np.empty((len(lam0), len(pars)))
    for i in range(len(pars)):
        up, down = pars.copy(), pars.copy()
        up[i] += h[i]
        down[i] -= h[i]
        jac[:, i] = (np.asarray(model.expected_actualdata(up)) - np.asarray(model.expected_actualdata(down))) / (2 * h[i])
    inv = np.divide(1.0, lam0, out=np.zeros_like(lam0), where=lam0 > 0)
    aux = np.asarray(model.config.auxdata, dtype=np.float64)
    nll_c = lambda p: -float(np.asarray(model.constraint_logpdf(aux, p)).reshape(-1)[0])  # noqa: E731
    # constraint terms are per parameter: their Hessian is diagonal
    hc = np.diag(_second_differences(nll_c, pars, 1e-4 * np.maximum(1.0, np.abs(pars)))[0])
    return (jac.T * inv) @ jac + hc


def asimov_uncertainties(model, pars) -> np.ndarray:
    """Expected uncertainties of every parameter on the Asimov data generated at ``pars``."""
    free = ~np.asarray(model.config.suggested_fixed(), dtype=bool)
    info = asimov_information(model, pars)[np.ix_(free, free)]
    return _uncertainties(info, free, len(pars), "the Asimov Fisher information")


def _second_differences(f, pars: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, float]:
    """Central second differences ``d^2 f / d pars_i^2`` (steps ``h``) and ``f(pars)``."""
    f0 = f(pars)
    out = np.empty(len(pars))
    for i in range(len(pars)):
        up, down = pars.copy(), pars.copy()
        up[i] += h[i]
        down[i] -= h[i]
        out[i] = (f(up) - 2 * f0 + f(down)) / h[i] ** 2
    return out, f0


def nll_hessian(model, data, pars, step: float = 1e-4) -> np.ndarray:
    """Central finite-difference Hessian of ``-logpdf`` (pyhf numpy) at ``pars``."""
    pars = np.asarray(pars, dtype=np.float64)
    n = len(pars)
    nll = lambda p: -float(np.asarray(model.logpdf(p, data)).reshape(-1)[0])  # noqa: E731
    h = step * np.maximum(1.0, np.abs(pars))
    hess = np.empty((n, n))
    hess[np.diag_indices(n)] = _second_differences(nll, pars, h)[0]
    for i in range(n):
        for j in range(i + 1, n):
            vals = []
            for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                p = pars.copy()
                p[i] += si * h[i]
                p[j] += sj * h[j]
                vals.append(nll(p))
            hess[i, j] = hess[j, i] = (vals[0] - vals[1] - vals[2] + vals[3]) / (4 * h[i] * h[j])
    return hess


def evaluate_workspace(workspace_spec: Mapping[str, Any], significance: bool = False) -> dict:
    """Fit the observations and the Asimov data with pyhf (numpy backend).

    Returns ``{"ttbar_norm": {"value", "uncertainty"}, "expected": {"sigma_mu", "z0"}}``
    keyed by the workspace's POI name.
    """
    with numpy_backend():
        model, data = model_and_data(workspace_spec)
        poi = model.config.poi_name
        idx = model.config.poi_index
        asimov_unc = asimov_uncertainties(model, asimov_point(model, 1.0))
        out = {"expected": {"sigma_mu": float(asimov_unc[idx])}}
        try:
            best, unc, method = _fit(data, model)
            out[poi] = {"value": float(best[idx]), "uncertainty": float(unc[idx]), "converged": True,
                        "uncertainty_from": method}
        except FitError as exc:  # keep the expected figures: they are what optimisation is judged on
            out[poi] = {"value": None, "uncertainty": None, "converged": False, "error": str(exc)}
        if significance:
            try:
                p0 = float(np.asarray(pyhf.infer.hypotest(0.0, asimov_data(model, 1.0), model, test_stat="q0")))
                out["expected"]["z0"] = float(-_norm_ppf(p0)) if p0 > 0 else math.inf
            except pyhf.exceptions.FailedMinimization as exc:
                out["expected"]["z0"] = None
                out["expected"]["z0_error"] = f"background-only fit did not converge: {exc.result.message}"
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
        best = asimov_point(model, 1.0)
        unc = asimov_uncertainties(model, best)
        poi_idx = model.config.poi_index
        out = []
        for name in model.config.par_order:
            if name == model.config.poi_name or (not include_staterror and name.startswith("staterror")):
                continue
            sl = model.config.par_slice(name)
            for k, idx in enumerate(range(sl.start, sl.stop)):
                if model.config.suggested_fixed()[idx]:
                    continue
                label = name if sl.stop - sl.start == 1 else f"{name}[{k}]"
                if not (np.isfinite(best[idx]) and np.isfinite(unc[idx])):
                    out.append({"name": label, "up": None, "down": None})  # reported as missing
                    continue
                shifts = {}
                lo, hi = model.config.suggested_bounds()[idx]
                for direction, sign in (("up", 1.0), ("down", -1.0)):
                    init = list(best)
                    init[idx] = float(np.clip(best[idx] + sign * unc[idx], lo, hi))
                    fixed = list(model.config.suggested_fixed())
                    fixed[idx] = True
                    try:
                        refit = pyhf.infer.mle.fit(data, model, init_pars=init, fixed_params=fixed)
                        shifts[direction] = float(np.asarray(refit)[poi_idx] - best[poi_idx])
                    except pyhf.exceptions.FailedMinimization:
                        shifts[direction] = None  # reported as missing, never as zero
                out.append({"name": label, **shifts})
        return out
