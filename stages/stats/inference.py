"""pyhf's own (numpy) inference on a workspace: the figures of merit that count.

These are non-differentiable reference numbers: the fitted POI with its uncertainty on the
observations, the expected (Asimov) uncertainty on the POI, both with their asymmetric
profile-likelihood intervals, and the expected discovery significance. pyhf's backend is
process-global state, so every call here switches to numpy (scipy optimiser) and restores
whatever backend was active before.

Uncertainties come from the exact Hessian of pyhf's NLL (autodiff on pyhf's JAX backend,
:func:`jacana.stages.stats.likelihood.nll_derivatives`, compiled once per model structure);
central finite differences of pyhf's numpy likelihood are kept as a cross-check whose relative
difference is reported beside them.

The fit to the observations carries its diagnostics (:func:`fit_diagnostics`: minimiser status,
edm, where the uncertainty came from, parameters at bounds, pulls beyond 3 sigma), and is
"converged" only when all are fine; a singular or indefinite information matrix is an error
that names the parameters responsible (docs/statistics.md, "Model health").
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


def _fit(data, model) -> tuple[np.ndarray, np.ndarray, str, dict]:
    """Best fit (pyhf, numpy, scipy) and uncertainties: ``(best, uncertainties, method, diagnostics)``.

    The uncertainties come from the exact Hessian of the NLL at the minimum (``method`` "hessian",
    :func:`nll_hessian`), not from MINUIT's HESSE: on the AGC model HESSE's adaptive steps gave POI
    uncertainties off by factors of 2 to 100 depending on the starting point, with its covariance
    flagged inaccurate. Where that Hessian is not positive definite (a parameter at its bound,
    sparse templates), they come from the expected (Fisher) information at the best fit instead
    (``method`` "fisher", :func:`asimov_hessian`), positive definite by construction; the fitted
    values are kept either way, and :func:`fit_diagnostics` says so. ``diagnostics["finite_differences"]``
    is the cross-check of the POI's uncertainty by finite differences of pyhf's numpy likelihood
    (:func:`curvature_check`) and its relative difference.
    """
    try:
        best, result = pyhf.infer.mle.fit(data, model, return_result_obj=True)
    except pyhf.exceptions.FailedMinimization as exc:
        raise FitError(f"pyhf's maximum-likelihood fit did not converge: {exc.result.message}") from None
    best = np.asarray(best, dtype=np.float64)
    free = ~np.asarray(model.config.suggested_fixed(), dtype=bool)
    names = par_names(model)
    hess = nll_hessian(model, data, best)[np.ix_(free, free)]
    try:
        unc, method, used = _uncertainties(hess, free, len(best), "the NLL Hessian at the best fit", names), "hessian", hess
    except FitError:
        info = asimov_hessian(model, best)[np.ix_(free, free)]
        unc, method, used = _uncertainties(info, free, len(best), "the Fisher information at the best fit", names), "fisher", info
    diagnostics = fit_diagnostics(model, data, best, method, used, result)
    # the fallback's matrix is the Hessian on the Asimov data generated at the best fit
    check_data = np.asarray(data if method == "hessian" else model.expected_data(best), dtype=np.float64)
    diagnostics["finite_differences"] = curvature_check(model, check_data, best, used, free)
    return best, unc, method, diagnostics


#: Steps of :func:`curvature_check`, in units of the profile's one-sigma direction (Richardson's
#: extrapolation from ``t`` and ``2 t``); smaller ones only where a parameter near its bound would
#: leave it. On AGC workspaces of 60k-1M events and the tests' small model 0.03 left 1e-10 to 1e-6
#: of the exact value, one second difference 2e-6 to 1e-2 (docs/statistics.md).
CHECK_STEPS = (0.03, 0.01, 0.003)
CHECK_METHOD = ("second differences of pyhf's numpy NLL along the POI's profile direction "
                "(Richardson extrapolation)")


def curvature_check(model, data, pars, hess: np.ndarray, free: np.ndarray) -> dict:
    """The finite-difference cross-check of the POI uncertainty ``sigma = sqrt((H^-1)_poi,poi)`` from
    ``hess`` (the free parameters' block): ``{"method", "uncertainty", "relative_difference"}``.

    Along ``w = H^-1 e_poi / sigma`` (the direction in which profiling moves every parameter per unit
    of the POI's uncertainty), ``w^T H w = 1``; central second differences of pyhf's numpy NLL there
    give the true curvature ``c``, and ``sigma / sqrt(c)`` is, to first order in any error ``E`` of
    ``hess``, what ``sqrt((H+E)^-1)_poi,poi`` would be: the same check as inverting a finite-difference
    Hessian, from 5 likelihood values instead of ``2 n^2``, and more precise (no cancellation among
    ``n^2`` rounded entries). An ``"error"`` where the steps leave the bounds or the NLL is not finite.
    """
    out = {"method": CHECK_METHOD, "uncertainty": None, "relative_difference": None}
    idx = np.flatnonzero(free)
    poi = int(np.flatnonzero(idx == model.config.poi_index)[0])
    try:
        u = np.linalg.solve(hess, np.eye(len(idx))[poi])
    except np.linalg.LinAlgError:
        return {**out, "error": "the matrix is singular"}
    if not u[poi] > 0:
        return {**out, "error": "the matrix is not positive definite along the POI"}
    sigma = float(np.sqrt(u[poi]))
    direction = np.zeros(len(pars))
    direction[idx] = u / sigma
    pars = np.asarray(pars, dtype=np.float64)
    bounds = np.asarray(model.config.suggested_bounds(), dtype=np.float64)
    nll = lambda p: -float(np.asarray(model.logpdf(p, data)).reshape(-1)[0])  # noqa: E731
    for t in CHECK_STEPS:
        points = [pars + k * t * direction for k in (-2, -1, 1, 2)]
        if all(np.all(p >= bounds[:, 0]) and np.all(p <= bounds[:, 1]) for p in points):
            break
    else:
        return {**out, "error": "a parameter is too close to its bound for the steps"}
    f0 = nll(pars)
    fm2, fm1, fp1, fp2 = (nll(p) for p in points)
    curvature = (4 * (fp1 - 2 * f0 + fm1) / t**2 - (fp2 - 2 * f0 + fm2) / (2 * t) ** 2) / 3
    if not (np.isfinite(curvature) and curvature > 0):
        return {**out, "error": f"the NLL's curvature along the POI's profile direction is {curvature:.3g}"}
    check = sigma / np.sqrt(curvature)
    return {**out, "uncertainty": float(check), "relative_difference": float(abs(check - sigma) / sigma)}


#: A fitted parameter is "near" a bound within this fraction of its allowed range.
NEAR_BOUND = 0.01
#: Pulls (fitted minus nominal, in units of the constraint's width) beyond this are flagged.
MAX_PULL = 3.0
#: Largest estimated distance to the minimum (``0.5 g^T H^-1 g`` of the NLL) of a converged fit.
MAX_EDM = 1e-3


def par_names(model) -> list[str]:
    """One name per scalar parameter, in pyhf's order (``staterror_4j1b[3]`` for per-bin ones)."""
    return list(model.config.par_names)


def constraint_widths(model) -> tuple[np.ndarray, np.ndarray]:
    """``(centre, sigma)`` of each scalar parameter's constraint (NaN sigma where unconstrained):
    the nominal value, and the Gaussian width (1 for alphas, the relative MC uncertainty for
    staterror gammas) or ``1/sqrt(tau)`` for a Poisson (shapesys) constraint."""
    centre = np.asarray(model.config.suggested_init(), dtype=np.float64)
    sigma = np.full(len(centre), np.nan)
    for name in model.config.par_order:
        ps = model.config.param_set(name)
        sl = model.config.par_slice(name)
        if not getattr(ps, "constrained", False):
            continue
        if ps.pdf_type == "poisson":
            factors = getattr(ps, "factors", None)
            factors = np.asarray(factors if factors is not None else [1.0] * ps.n_parameters, dtype=np.float64)
            sigma[sl] = 1.0 / np.sqrt(np.where(factors > 0, factors, np.inf))
        else:
            sigmas = getattr(ps, "sigmas", None)
            sigma[sl] = np.asarray(sigmas if sigmas is not None else [1.0] * ps.n_parameters, dtype=np.float64)
    return centre, sigma


def fit_diagnostics(model, data, best, method: str, hess: np.ndarray, result=None) -> dict:
    """What a physicist checks after a fit, and whether all of it is fine.

    ``{"converged", "fit": {"minimizer", "success", "status", "message", "iterations", "twice_nll",
    "edm"}, "uncertainty_from", "at_bounds": [...], "pulls": [...], "warnings": [...]}``.
    ``edm`` is ``0.5 g^T H^-1 g`` of the NLL over the free parameters off their bounds (``g`` by
    central differences of pyhf's logpdf, ``H`` the matrix the uncertainties came from).
    ``converged`` is true only when the minimiser succeeded, ``edm <= MAX_EDM``, the uncertainties
    came from the Hessian, no free parameter is within ``NEAR_BOUND`` of a bound and no
    constrained one (staterror gammas included) is pulled beyond ``MAX_PULL`` sigma.
    """
    best = np.asarray(best, dtype=np.float64)
    names = par_names(model)
    free = ~np.asarray(model.config.suggested_fixed(), dtype=bool)
    bounds = np.asarray(model.config.suggested_bounds(), dtype=np.float64)
    centre, sigma = constraint_widths(model)
    warnings = []
    fit = {"minimizer": "scipy SLSQP (pyhf)"}
    if result is not None:
        fit.update(success=bool(getattr(result, "success", True)), status=int(getattr(result, "status", 0)),
                   message=str(getattr(result, "message", "")), iterations=int(getattr(result, "nit", -1)),
                   twice_nll=float(np.asarray(getattr(result, "fun", np.nan)).reshape(-1)[0]))
        if not fit["success"]:
            warnings.append(f"the minimiser did not succeed: {fit['message']}")
    at_bounds = []
    for i in np.flatnonzero(free):
        lo, hi = bounds[i]
        margin = NEAR_BOUND * (hi - lo)
        if best[i] - lo <= margin or hi - best[i] <= margin:
            at_bounds.append({"parameter": names[i], "value": float(best[i]), "bounds": [float(lo), float(hi)]})
            warnings.append(f"{names[i]} = {best[i]:.4g} is at or near its bound [{lo:.4g}, {hi:.4g}]")
    pulls = []
    for i in np.flatnonzero(free & np.isfinite(sigma)):
        pull = (best[i] - centre[i]) / sigma[i]
        if abs(pull) > MAX_PULL:
            pulls.append({"parameter": names[i], "value": float(best[i]), "pull": float(pull), "sigma": float(sigma[i])})
            kind = "staterror gamma" if names[i].startswith("staterror") else "nuisance parameter"
            warnings.append(f"{kind} {names[i]} = {best[i]:.4g} is pulled {pull:+.1f} sigma (constraint width {sigma[i]:.3g})")
    fit["edm"] = _edm(model, data, best, free, hess, {b["parameter"] for b in at_bounds}, names)
    if fit["edm"] is None:
        warnings.append("the estimated distance to the minimum (edm) could not be computed")
    elif not fit["edm"] <= MAX_EDM:
        warnings.append(f"the estimated distance to the minimum (edm) {fit['edm']:.3g} exceeds {MAX_EDM:g}")
    if method != "hessian":
        warnings.append("the NLL Hessian at the best fit is not positive definite: uncertainties from the "
                        "Fisher information instead")
    return {"converged": not warnings, "fit": fit, "uncertainty_from": method, "at_bounds": at_bounds,
            "pulls": pulls, "warnings": warnings}


def _edm(model, data, best, free, hess, skip: set, names: list[str], step: float = 1e-5) -> float | None:
    """``0.5 g^T H^-1 g`` over the free parameters not in ``skip`` (``hess`` is over ``free``)."""
    nll = lambda p: -float(np.asarray(model.logpdf(p, data)).reshape(-1)[0])  # noqa: E731
    idx = np.flatnonzero(free)
    keep = np.array([names[i] not in skip for i in idx], dtype=bool)
    if not np.any(keep):
        return 0.0
    grad = np.zeros(len(idx))
    h = step * np.maximum(1.0, np.abs(best))
    for k, i in enumerate(idx):
        if not keep[k]:
            continue
        up, down = best.copy(), best.copy()
        up[i] += h[i]
        down[i] -= h[i]
        grad[k] = (nll(up) - nll(down)) / (2 * h[i])
    g, sub = grad[keep], np.asarray(hess)[np.ix_(keep, keep)]
    try:
        value = 0.5 * float(g @ np.linalg.solve(sub, g))
    except np.linalg.LinAlgError:
        return None
    return value if np.isfinite(value) else None


def _uncertainties(hess: np.ndarray, free: np.ndarray, n: int, what: str, names: list[str] | None = None) -> np.ndarray:
    """sqrt(diag(hess^-1)) on the free parameters (0 on fixed ones); an error, never a silent 0,
    where ``hess`` is singular or not positive definite, naming the parameters responsible
    (``names``: one per parameter, fixed ones included) where they are given."""
    labels = [names[i] for i in np.flatnonzero(free)] if names is not None else None
    if _idle(hess).size:
        raise FitError(f"{what} is singular: {_degenerate(hess, labels)}")
    try:
        cov = np.linalg.inv(hess)
    except np.linalg.LinAlgError:
        raise FitError(f"{what} is singular: {_degenerate(hess, labels)}") from None
    var = np.diag(cov)
    if not np.all(np.isfinite(var)) or np.any(var <= 0):
        w, v = np.linalg.eigh(0.5 * (hess + hess.T))
        along = f", along {_dominant(v[:, 0], labels)}" if labels is not None else ""
        raise FitError(f"{what} is not positive definite (lowest eigenvalue {float(w[0]):.3g}{along})")
    unc = np.zeros(n)
    unc[free] = np.sqrt(var)
    return unc


#: A parameter "has no effect" when its diagonal of the information is below this fraction of the
#: largest: exactly 0 from finite differences of pyhf, about (1e-10)^2 / rate from the exact Hessian,
#: whose empty templates expect the traced model's yield floor of 1e-10 instead of 0.
IDLE_FRACTION = 1e-14


def _idle(hess: np.ndarray) -> np.ndarray:
    """Indices of the parameters without effect (:data:`IDLE_FRACTION`)."""
    diag = np.abs(np.diag(hess)) if hess.size else np.zeros(0)
    scale = float(np.max(diag)) if diag.size else 0.0
    return np.flatnonzero(diag <= IDLE_FRACTION * max(scale, 1e-300))


def _dominant(vector: np.ndarray, labels: list[str]) -> str:
    """The parameters that make up most of a (unit) direction, largest first."""
    order = np.argsort(-np.abs(vector))
    picked = [labels[i] for i in order if abs(vector[i]) >= 0.3] or [labels[order[0]]]
    return ", ".join(picked[:6]) + (" ..." if len(picked) > 6 else "")


def _degenerate(hess: np.ndarray, labels: list[str] | None) -> str:
    """Which parameters make ``hess`` singular: those without any effect, or the undetermined combination."""
    if labels is None:
        return "a parameter has no effect"
    idle = [labels[i] for i in _idle(hess)]
    if idle:
        return (f"parameter{'s' if len(idle) > 1 else ''} {', '.join(idle)} "
                f"{'have' if len(idle) > 1 else 'has'} no effect on the expected rates")
    w, v = np.linalg.eigh(0.5 * (hess + hess.T))
    return f"a combination of {_dominant(v[:, 0], labels)} is not determined (lowest eigenvalue {float(w[0]):.3g})"


def asimov_information(model, pars, step: float = 1e-5) -> np.ndarray:
    """The expected (Fisher) information at ``pars`` by finite differences: the cross-check of
    :func:`asimov_hessian` (the NLL Hessian on the Asimov data generated there).

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


def asimov_hessian(model, pars) -> np.ndarray:
    """The exact NLL Hessian on the Asimov data generated at ``pars`` (with its auxdata), at ``pars``:
    the expected (Fisher) information there, since every main bin has ``n = lambda``."""
    pars = np.asarray(pars, dtype=np.float64)
    return _exact_hessian(model, np.asarray(model.expected_data(pars), dtype=np.float64), pars)


def asimov_uncertainties(model, pars) -> np.ndarray:
    """Expected uncertainties of every parameter on the Asimov data generated at ``pars``
    (:func:`asimov_hessian`)."""
    free = ~np.asarray(model.config.suggested_fixed(), dtype=bool)
    info = asimov_hessian(model, pars)[np.ix_(free, free)]
    return _uncertainties(info, free, len(pars), "the Asimov Fisher information", par_names(model))


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


def nll_derivatives(model):
    """``(pars, data) -> (nll, gradient, Hessian)`` of pyhf's NLL of ``model``, exact and compiled
    once per model structure (:func:`jacana.stages.stats.likelihood.nll_derivatives`)."""
    from jacana.stages.stats.likelihood import nll_derivatives as derivatives  # JAX only when needed

    return derivatives(model)


def _exact_hessian(model, data, pars) -> np.ndarray:
    hess = nll_derivatives(model)(pars, data)[2]
    if not np.all(np.isfinite(hess)):
        raise FitError("the exact NLL Hessian is not finite (a bin expects nothing where data has events?)")
    return hess


def nll_hessian(model, data, pars) -> np.ndarray:
    """The exact Hessian of ``-logpdf`` at ``pars`` (``jax.hessian`` of pyhf's NLL on its JAX backend)."""
    return _exact_hessian(model, np.asarray(data, dtype=np.float64), np.asarray(pars, dtype=np.float64))


def nll_hessian_fd(model, data, pars, step: float = 1e-4) -> np.ndarray:
    """Central finite-difference Hessian of ``-logpdf`` (pyhf numpy) at ``pars``: the cross-check
    of :func:`nll_hessian`."""
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


# ----------------------------------------------------------------------------- profile-likelihood intervals
#: Newton steps of a profile fit stop once the decrement ``g^T H^-1 g`` (twice the NLL's distance
#: to the minimum, to second order) is below this.
PROFILE_TOL = 1e-8
PROFILE_MAX_STEPS = 50
#: A crossing is found once ``Delta(-2 ln L)`` is within this of 1 (the POI then within
#: ``CROSSING_TOL / 2`` of its uncertainty of the exact crossing).
CROSSING_TOL = 1e-4
CROSSING_MAX_STEPS = 40
#: Exact-Hessian evaluations one interval may take (about 50 on healthy AGC workspaces, 6 ms each).
PROFILE_MAX_CALLS = 400
INTERVAL_METHOD = ("profile likelihood: POI values where Delta(-2 ln L) = 1, nuisances profiled by "
                   "bounded Newton steps on the exact Hessian of pyhf's NLL")


def _budgeted(derivatives, calls: int):
    """``derivatives`` that raise a :class:`FitError` once called more than ``calls`` times."""
    count = 0

    def limited(pars, data):
        nonlocal count
        count += 1
        if count > calls:
            raise FitError(f"the profile likelihood was not followed within {calls} Hessian evaluations")
        return derivatives(pars, data)

    return limited


def _newton_direction(hess: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """``-H^-1 g`` with ``H`` made positive definite, so that it is a descent direction away from
    the minimum too: the eigenvalues of the diagonally rescaled matrix are replaced by their
    absolute values, floored at 1e-8 of the largest (far from the minimum the observed-data
    Hessian can be indefinite; a flipped curvature still gives a step of the right length)."""
    import scipy.linalg  # numpy's eigh took 2-30 ms on these 34 x 34 matrices, scipy's 0.1 ms

    diag = np.abs(np.diag(hess))
    d = np.sqrt(np.where(diag > 0, diag, 1.0))
    scaled = 0.5 * (hess + hess.T) / d[:, None] / d[None, :]
    try:  # near a minimum: positive definite, a Cholesky solve
        return -scipy.linalg.cho_solve(scipy.linalg.cho_factor(scaled), grad / d) / d
    except np.linalg.LinAlgError:
        pass
    w, v = scipy.linalg.eigh(scaled)
    w = np.maximum(np.abs(w), 1e-8 * max(float(np.max(np.abs(w))), 1e-300))
    return -(v @ ((v.T @ (grad / d)) / w)) / d


def _minimise(derivatives, data, pars, vary: np.ndarray, bounds: np.ndarray):
    """Minimise the NLL over the parameters ``vary`` (the rest held) from ``pars``, in ``bounds``:
    Newton steps with backtracking; a parameter whose step would cross a bound the gradient pushes
    it to is put on that bound and held for the step (a staterror gamma of an empty bin goes to
    1e-10 in one step, not in twenty halvings of every other parameter's step).
    Returns ``(pars, nll, grad, hess, decrement)``."""
    lo, hi = bounds[:, 0], bounds[:, 1]
    p = np.clip(np.asarray(pars, dtype=np.float64), lo, hi)
    v, g, h = derivatives(p, data)
    decrement = np.inf
    for _ in range(PROFILE_MAX_STEPS):
        held = ((p <= lo) & (g > 0)) | ((p >= hi) & (g < 0))
        to_bound = np.zeros(len(p), dtype=bool)
        idx, step = np.zeros(0, dtype=int), np.zeros(0)
        for _ in range(len(p)):
            idx = np.flatnonzero(vary & ~held & ~to_bound)
            if idx.size == 0:
                break
            step = _newton_direction(h[np.ix_(idx, idx)], g[idx])
            crossing = ((p[idx] + step < lo[idx]) & (g[idx] > 0)) | ((p[idx] + step > hi[idx]) & (g[idx] < 0))
            if not np.any(crossing):
                break
            to_bound[idx[crossing]] = True
        if idx.size == 0 and not np.any(to_bound):
            return p, v, g, h, 0.0
        decrement = float(-g[idx] @ step) if idx.size else 0.0
        if decrement <= PROFILE_TOL and not np.any(to_bound):
            break
        bound_values = np.where(g > 0, lo, hi)[to_bound]
        t = 1.0
        while t > 1e-8:
            q = p.copy()
            q[idx] = np.clip(p[idx] + t * step, lo[idx], hi[idx])
            q[to_bound] = bound_values
            vq, gq, hq = derivatives(q, data)
            if np.isfinite(vq) and vq <= v - 1e-4 * t * decrement:
                break
            t *= 0.5
        else:
            break  # no descent left in this direction: as close as the arithmetic allows
        p, v, g, h = q, vq, gq, hq
    return p, v, g, h, decrement


def _response(hess: np.ndarray, nuisances: np.ndarray, poi: int) -> np.ndarray:
    """``d theta_hat / d mu`` of the profiled nuisances from the Hessian at a profiled point."""
    try:
        return -np.linalg.solve(hess[np.ix_(nuisances, nuisances)], hess[nuisances, poi])
    except np.linalg.LinAlgError:
        return np.zeros(len(nuisances))


def _crossing(derivatives, data, start, hess, free, bounds, poi: int, side: float, nll_min: float,
              sigma: float, poi_name: str = "the POI"):
    """The POI value on ``side`` (+1 up, -1 down) of the minimum ``start`` where the profiled
    ``Delta(-2 ln L)`` is 1: Newton's method on ``mu`` (its slope ``2 dNLL/dmu`` at the profiled
    nuisances, by the envelope theorem) kept inside a bracket. The first point is ``sigma`` away,
    its nuisances moved as the Hessian at the minimum says (linear response; on AGC workspaces this
    start needed 6-11 Newton steps, the minimum's own nuisances 12-100), later ones as the last
    profiled point's Hessian says.
    Returns ``(mu, Delta(-2 ln L) there)`` or ``(None, Delta at the POI's bound)`` when the profile
    stays below 1 up to that bound."""
    vary = free.copy()
    vary[poi] = False
    nuisances = np.flatnonzero(vary)
    lo, hi = bounds[nuisances, 0], bounds[nuisances, 1]
    limit = bounds[poi, 1] if side > 0 else bounds[poi, 0]
    inside, outside = start[poi], None  # the bracket: Delta < 1 at `inside`, > 1 at `outside`
    pars = start.copy()
    mu = float(np.clip(start[poi] + side * sigma, *bounds[poi]))
    response = _response(hess, nuisances, poi)
    for _ in range(CROSSING_MAX_STEPS):
        pars[nuisances] = np.clip(pars[nuisances] + response * (mu - pars[poi]), lo, hi)
        pars[poi] = mu
        pars, v, g, h, _ = _minimise(derivatives, data, pars, vary, bounds)
        delta = 2.0 * (v - nll_min)
        if not np.isfinite(delta):
            raise FitError(f"the profile likelihood is not finite at {poi_name} = {mu:.6g}")
        if delta < -CROSSING_TOL:
            raise FitError(f"the profile likelihood at {poi_name} = {mu:.6g} is below the fit's minimum "
                           f"(Delta(-2 ln L) = {delta:.4g}): the fit did not find the minimum")
        if abs(delta - 1.0) <= CROSSING_TOL:
            return mu, delta
        if delta < 1.0:
            if mu == limit:
                return None, delta
            inside = mu
        else:
            outside = mu
        response = _response(h, nuisances, poi)
        slope = 2.0 * g[poi]
        guess = mu - (delta - 1.0) / slope if slope * side > 0 else np.nan
        if outside is None:  # no bracket yet: Newton's guess if it goes further out, else another sigma
            mu = float(np.clip(guess if np.isfinite(guess) and side * (guess - mu) > 0 else mu + side * sigma,
                               *bounds[poi]))
        elif np.isfinite(guess) and min(inside, outside) < guess < max(inside, outside):
            mu = float(guess)
        else:
            mu = 0.5 * (inside + outside)
    raise FitError(f"the profile likelihood's Delta(-2 ln L) = 1 crossing on the {'upper' if side > 0 else 'lower'} "
                   f"side was not found in {CROSSING_MAX_STEPS} steps")


def profile_interval(model, data, best, sigma: float) -> dict:
    """Both ``Delta(-2 ln L) = 1`` crossings of the profile likelihood of the POI around the
    minimum near ``best`` (``sigma``: the Hessian's uncertainty, the first step).

    ``{"down", "up"}``: the POI values at the crossings (None where the profile stays below 1 up to
    the POI's bound); ``"minus"``, ``"plus"``: their distances from the minimum ``"at"``;
    ``"delta_twice_nll"``: ``Delta(-2 ln L)`` reached at each; ``"decrement_at_minimum"``: the
    Newton decrement left there (0 at an exact minimum); ``"method"``. The minimum is ``best``
    refined by Newton steps on all free parameters, so scipy's tolerance does not shift the crossings.
    An ``"error"`` (and None crossings) where the profile could not be followed.
    """
    out = {"down": None, "up": None, "method": INTERVAL_METHOD}
    try:
        derivatives = _budgeted(nll_derivatives(model), PROFILE_MAX_CALLS)
        free = ~np.asarray(model.config.suggested_fixed(), dtype=bool)
        bounds = np.asarray(model.config.suggested_bounds(), dtype=np.float64)
        poi = model.config.poi_index
        data = np.asarray(data, dtype=np.float64)
        start, nll_min, _, hess, decrement = _minimise(derivatives, data, best, free, bounds)
        if not np.isfinite(nll_min):
            raise FitError("the NLL is not finite at the best fit")
        deltas = []
        for key, side in (("down", -1.0), ("up", 1.0)):
            mu, delta = _crossing(derivatives, data, start, hess, free, bounds, poi, side, nll_min, sigma,
                                  model.config.poi_name)
            out[key] = None if mu is None else float(mu)
            deltas.append(float(delta))
        out.update(minus=None if out["down"] is None else float(start[poi] - out["down"]),
                   plus=None if out["up"] is None else float(out["up"] - start[poi]),
                   at=float(start[poi]), delta_twice_nll=deltas, decrement_at_minimum=float(decrement))
        for key, bound in (("down", bounds[poi, 0]), ("up", bounds[poi, 1])):
            if out[key] is None:
                out.setdefault("notes", []).append(f"no {key} crossing: Delta(-2 ln L) stays below 1 up to the "
                                                   f"POI's bound {bound:g}")
    except (FitError, ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
        out.update(down=None, up=None, error=f"{type(exc).__name__}: {exc}")
    return out


def evaluate_workspace(workspace_spec: Mapping[str, Any], significance: bool = False) -> dict:
    """Fit the observations and the Asimov data with pyhf (numpy backend).

    Returns ``{"ttbar_norm": {"value", "uncertainty", "converged", "interval", ...}, "expected":
    {"sigma_mu", "interval", "z0", ...}}`` keyed by the workspace's POI name. Both uncertainties come
    from the exact NLL Hessian, with the finite-difference value and its relative difference beside
    them (``finite_differences``) and the asymmetric profile-likelihood interval
    (:func:`profile_interval`). The fit's entry carries :func:`fit_diagnostics` ("converged" is
    false while any of them is off). A singular Asimov Fisher information is an error naming the
    parameters without effect and the empty regions and samples.
    """
    with numpy_backend():
        model, data = model_and_data(workspace_spec)
        poi = model.config.poi_name
        idx = model.config.poi_index
        point, asimov = asimov_point(model, 1.0), asimov_data(model, 1.0)
        free = ~np.asarray(model.config.suggested_fixed(), dtype=bool)
        try:  # asimov_uncertainties, keeping the matrix for the cross-check
            info = asimov_hessian(model, point)[np.ix_(free, free)]
            sigma = float(_uncertainties(info, free, len(point), "the Asimov Fisher information", par_names(model))[idx])
        except FitError as exc:
            empty = empty_parts(workspace_spec)
            raise FitError(f"{exc}" + (f"; empty in the workspace: {'; '.join(empty)}" if empty else "")) from None
        out = {"expected": {
            "sigma_mu": sigma, "sigma_mu_from": "exact Hessian (autodiff) of pyhf's NLL on the Asimov data",
            "finite_differences": curvature_check(model, asimov, point, info, free),
            "interval": profile_interval(model, asimov, point, sigma)}}
        try:
            best, unc, _, diagnostics = _fit(data, model)
            out[poi] = {"value": float(best[idx]), "uncertainty": float(unc[idx]), **diagnostics,
                        "interval": profile_interval(model, data, best, float(unc[idx]))}
        except FitError as exc:  # keep the expected figures: they are what optimisation is judged on
            out[poi] = {"value": None, "uncertainty": None, "converged": False, "error": str(exc),
                        "warnings": [str(exc)]}
        if significance:
            try:
                p0 = float(np.asarray(pyhf.infer.hypotest(0.0, asimov, model, test_stat="q0")))
                out["expected"]["z0"] = float(-_norm_ppf(p0)) if p0 > 0 else math.inf
            except pyhf.exceptions.FailedMinimization as exc:
                out["expected"]["z0"] = None
                out["expected"]["z0_error"] = f"background-only fit did not converge: {exc.result.message}"
        return out


def empty_parts(workspace_spec: Mapping[str, Any]) -> list[str]:
    """Regions whose every sample is empty, and samples empty in every region, of a workspace
    (its nominal templates: negative yields were already floored at 0 there)."""
    empty: dict[str, list[str]] = {}
    regions = []
    for channel in workspace_spec["channels"]:
        regions.append(channel["name"])
        for sample in channel["samples"]:
            if not np.any(np.asarray(sample["data"], dtype=np.float64) > 0):
                empty.setdefault(sample["name"], []).append(channel["name"])
    out = []
    all_samples = {s["name"] for c in workspace_spec["channels"] for s in c["samples"]}
    dead_regions = [c["name"] for c in workspace_spec["channels"]
                    if all(c["name"] in empty.get(s["name"], []) for s in c["samples"])]
    if dead_regions:
        out.append(f"region{'s' if len(dead_regions) > 1 else ''} {', '.join(dead_regions)} (every sample)")
    for sample in sorted(all_samples):
        where = [r for r in empty.get(sample, []) if r not in dead_regions]
        if where and len(empty[sample]) == len(regions):
            out.append(f"sample {sample} in every region")
        elif where:
            out.append(f"sample {sample} in {', '.join(where)}")
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
