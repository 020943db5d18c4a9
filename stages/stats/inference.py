"""pyhf's own (numpy) inference on a workspace: the figures of merit that count.

These are non-differentiable reference numbers: the fitted POI with its uncertainty on the
observations, the expected (Asimov) uncertainty on the POI, and the expected discovery
significance. pyhf's backend is process-global state, so every call here switches to
numpy (scipy optimiser) and restores whatever backend was active before.

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

    The uncertainties come from the NLL's Hessian at the minimum (``method`` "hessian"), taken
    by central finite differences of pyhf's own numpy ``logpdf``, not by MINUIT's HESSE: on the
    AGC model HESSE's adaptive steps gave POI uncertainties off by factors of 2 to 100 depending
    on the starting point, while the finite-difference Hessian agrees with the exact (autodiff)
    Fisher information to < 0.1 %. Where that Hessian is not positive definite (a parameter at
    its bound, sparse templates), they come from the expected (Fisher) information at the best
    fit instead (``method`` "fisher", :func:`asimov_information`), which is positive definite by
    construction; the fitted values are kept either way, and :func:`fit_diagnostics` says so.
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
        info = asimov_information(model, best)[np.ix_(free, free)]
        unc, method, used = _uncertainties(info, free, len(best), "the Fisher information at the best fit", names), "fisher", info
    return best, unc, method, fit_diagnostics(model, data, best, method, used, result)


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


def _dominant(vector: np.ndarray, labels: list[str]) -> str:
    """The parameters that make up most of a (unit) direction, largest first."""
    order = np.argsort(-np.abs(vector))
    picked = [labels[i] for i in order if abs(vector[i]) >= 0.3] or [labels[order[0]]]
    return ", ".join(picked[:6]) + (" ..." if len(picked) > 6 else "")


def _degenerate(hess: np.ndarray, labels: list[str] | None) -> str:
    """Which parameters make ``hess`` singular: those without any effect, or the undetermined combination."""
    if labels is None:
        return "a parameter has no effect"
    scale = float(np.max(np.abs(hess))) if hess.size else 0.0
    idle = [labels[i] for i in range(len(labels)) if np.all(np.abs(hess[i]) <= 1e-14 * max(scale, 1e-300))]
    if idle:
        return (f"parameter{'s' if len(idle) > 1 else ''} {', '.join(idle)} "
                f"{'have' if len(idle) > 1 else 'has'} no effect on the expected rates")
    w, v = np.linalg.eigh(0.5 * (hess + hess.T))
    return f"a combination of {_dominant(v[:, 0], labels)} is not determined (lowest eigenvalue {float(w[0]):.3g})"


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

    Returns ``{"ttbar_norm": {"value", "uncertainty", "converged", ...}, "expected": {"sigma_mu",
    "z0"}}`` keyed by the workspace's POI name; the fit's entry carries :func:`fit_diagnostics`
    ("converged" is false while any of them is off). A singular Asimov Fisher information is an
    error naming the parameters without effect and the empty regions and samples.
    """
    with numpy_backend():
        model, data = model_and_data(workspace_spec)
        poi = model.config.poi_name
        idx = model.config.poi_index
        try:
            asimov_unc = asimov_uncertainties(model, asimov_point(model, 1.0))
        except FitError as exc:
            empty = empty_parts(workspace_spec)
            raise FitError(f"{exc}" + (f"; empty in the workspace: {'; '.join(empty)}" if empty else "")) from None
        out = {"expected": {"sigma_mu": float(asimov_unc[idx])}}
        try:
            best, unc, _, diagnostics = _fit(data, model)
            out[poi] = {"value": float(best[idx]), "uncertainty": float(unc[idx]), **diagnostics}
        except FitError as exc:  # keep the expected figures: they are what optimisation is judged on
            out[poi] = {"value": None, "uncertainty": None, "converged": False, "error": str(exc),
                        "warnings": [str(exc)]}
        if significance:
            try:
                p0 = float(np.asarray(pyhf.infer.hypotest(0.0, asimov_data(model, 1.0), model, test_stat="q0")))
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
