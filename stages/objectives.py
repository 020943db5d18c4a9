"""Expected-sensitivity objectives of a :class:`~jacana.stages.likelihood.TracedModel`.

Every objective is a pure function ``f(model, yields, ...)`` of the yields
pytree: jit-able (close over ``model`` or mark it static), differentiable with
respect to ``yields``, and evaluated on Asimov data (expected, not observed,
sensitivity):

``sigma_mu(model, yields)``
    Expected uncertainty on the POI: ``sqrt((H^-1)_{poi,poi})`` with ``H`` the
    Hessian of the NLL in all free parameters at the Asimov point (POI=1,
    nuisances nominal). On Asimov data that point *is* the maximum-likelihood
    estimate and ``H`` is the Fisher information, so no fit is needed. This is
    what MINUIT's HESSE reports for a fit to the same Asimov data. Default.
``z0(model, yields)``
    Expected discovery significance ``sqrt(q0)`` on Asimov(POI=1) data, with
    the nuisances profiled in a conditional fit at POI=0.
``cls(model, yields, poi_value=1.0)``
    Median expected CLs at ``poi_value`` (asymptotic formulae, ``qtilde``),
    on background-only Asimov data: pyhf's ``hypotest(...,
    return_expected=True)`` expected value.
``upper_limit(model, yields, cl=0.95)``
    Median expected upper limit on the POI: the root of
    ``CLs_exp(mu) = 1 - cl``, found with optimistix's Newton solver and
    differentiated implicitly (``ImplicitAdjoint``).

Convention: **lower is better** for the optimiser. :data:`OBJECTIVES` maps a
name to the physics value; :func:`loss` returns the function to *minimise*
(``sigma_mu``, ``-z0``, ``cls``, ``upper_limit``); :data:`SENSE` gives the sign.

Fits and gradients
------------------
Profiled fits (``z0``, ``cls``, ``upper_limit``) minimise the NLL over the free
nuisance parameters with optimistix BFGS, in coordinates whitened by the
Fisher matrix at the nominal point (so BFGS starts from an accurate curvature
model and converges in a handful of steps). Bounds are respected by
evaluating the NLL at the parameters clipped into their bounds plus a
quadratic penalty outside: inside the box this is exactly the NLL, and a
bound-active optimum lands on the bound. Fixed parameters stay at their init.

The gradient of a profiled quantity uses the envelope theorem: for
``g(y) = min_theta NLL(theta, y)``, ``dg/dy = dNLL/dy`` at
``theta = theta_hat(y)``, because ``dNLL/dtheta = 0`` there (or, for a
parameter sitting on a bound, ``theta_hat`` does not move with ``y``). So the
fitted nuisances enter under ``jax.lax.stop_gradient`` -- mathematically exact
at the optimum for first derivatives, and the fit itself is never
differentiated (its inputs are also stop-gradient'd, so no tangents flow into
the solver). Consequence: only *first* derivatives of ``z0``/``cls`` are
exact (Hessians with respect to yields are not). The same argument gives the
derivative with respect to the tested POI value, which the upper-limit root
finder needs; the root itself is differentiated by the implicit function
theorem (optimistix ``ImplicitAdjoint``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import jax.scipy.stats as jstats
import numpy as np
import optimistix as optx
import scipy.stats

from .likelihood import TracedModel, pyhf_jax_backend

__all__ = [
    "sigma_mu",
    "z0",
    "cls",
    "upper_limit",
    "OBJECTIVES",
    "SENSE",
    "loss",
    "fisher",
    "profile_nll",
    "q0_asimov",
    "qmu_tilde_asimov",
    "FitSettings",
]


class FitSettings:
    """Tolerances of the profiled fits and of the upper-limit root finder."""

    fit_rtol = 1e-10
    fit_atol = 1e-10
    fit_max_steps = 256
    root_rtol = 1e-10
    root_atol = 1e-10
    root_max_steps = 64


def _indices(model: TracedModel, include_poi: bool) -> np.ndarray:
    free = ~model.fixed
    if not include_poi:
        free[model.poi_index] = False
    return np.flatnonzero(free)


def _nll_hessian(bound, data, poi_value, idx):
    """Hessian of the NLL (pyhf's full logpdf) in parameters ``idx`` at init with POI=poi_value."""
    p0 = bound.traced.poi_pars(poi_value)

    def f(q):
        return bound.nll(p0.at[idx].set(q), data)

    return jax.hessian(f)(p0[idx])


def _asimov_fisher(bound, poi_value, idx):
    """The NLL Hessian at the Asimov(POI=poi_value) point, computed as the Fisher information.

    At that point every main bin has ``n = lambda``, so the Poisson part of the
    Hessian is exactly ``J^T diag(1/lambda) J`` (``J = d lambda / d pars``, one
    forward-mode pass per parameter) and the constraint part is the Hessian of
    pyhf's constraint term. Identical to :func:`_nll_hessian` on Asimov data,
    with a much smaller graph (second rather than third derivatives under grad).
    """
    p0 = bound.traced.poi_pars(poi_value)

    def lam(q):
        return bound.expected_actualdata(p0.at[idx].set(q))

    q0 = p0[idx]
    J = jax.jacfwd(lam)(q0)
    lam0 = lam(q0)
    Hc = jax.hessian(lambda q: bound.constraint_nll(p0.at[idx].set(q)))(q0)
    return (J.T / lam0[None, :]) @ J + Hc


def fisher(
    model: TracedModel, yields, poi_value=1.0, include_poi: bool = True, exact_hessian: bool = False
):
    """Hessian of the NLL at the Asimov(POI=``poi_value``) point in the free parameters.

    On Asimov data generated at that point it equals the Fisher information;
    ``exact_hessian=True`` differentiates pyhf's full logpdf twice instead
    (same value, bigger graph). Returns ``(H, free_indices)``.
    """
    with pyhf_jax_backend():
        idx = _indices(model, include_poi)
        bound = model.bind(yields)
        if exact_hessian:
            return _nll_hessian(bound, bound.asimov_data(poi_value), poi_value, idx), idx
        return _asimov_fisher(bound, poi_value, idx), idx


def _sigma_from_hessian(H, idx, poi_index):
    k = int(np.flatnonzero(idx == poi_index)[0])
    e = jnp.zeros(len(idx)).at[k].set(1.0)
    return jnp.sqrt(jnp.linalg.solve(H, e)[k])


@partial(jax.jit, static_argnums=0)
def sigma_mu(model: TracedModel, yields, poi_value=1.0):
    """Expected uncertainty on the POI from the profiled Fisher information (no fit)."""
    H, idx = fisher(model, yields, poi_value, include_poi=True)
    return _sigma_from_hessian(H, idx, model.poi_index)


# ----------------------------------------------------------------------------- fits
def _whitening(bound_sg, poi_value, idx):
    """Whitening matrix ``W = L^-T`` (``H = L L^T``: nuisance block of the Fisher
    matrix at Asimov(POI=poi_value)) and the penalty curvature ``diag(H)``; constants."""
    H = jax.lax.stop_gradient(_asimov_fisher(bound_sg, poi_value, idx))
    n = H.shape[0]
    d = jnp.sqrt(jnp.clip(jnp.diag(H), 1e-12))
    Hn = H / d[:, None] / d[None, :] + 1e-10 * jnp.eye(n)  # unit diagonal, then factor
    L = jnp.linalg.cholesky(Hn)
    W = jax.scipy.linalg.solve_triangular(L, jnp.eye(n), lower=True, trans="T") / d[:, None]
    return W, jnp.diag(H)


def _fit_nuisances(model, bound_sg, data_sg, poi_value, whitening):
    """Minimise the NLL over the free nuisances at fixed POI (no gradient flows)."""
    sg = jax.lax.stop_gradient
    idx = _indices(model, include_poi=False)
    mu = sg(jnp.asarray(poi_value, dtype=jnp.float64))
    base = model.poi_pars(mu)
    if len(idx) == 0:
        return base
    lo = jnp.asarray(model.bounds[idx, 0])
    hi = jnp.asarray(model.bounds[idx, 1])
    q_start = jnp.asarray(model.init[idx])
    W, curv = (sg(w) for w in whitening)

    def objective(z, _):
        q = q_start + W @ z
        qc = jnp.clip(q, lo, hi)
        penalty = 0.5 * jnp.sum(curv * (q - qc) ** 2)
        return bound_sg.nll(base.at[idx].set(qc), data_sg) + penalty

    sol = optx.minimise(
        objective,
        optx.BFGS(rtol=FitSettings.fit_rtol, atol=FitSettings.fit_atol),
        jnp.zeros(len(idx)),
        None,
        max_steps=FitSettings.fit_max_steps,
        throw=False,
    )
    q_hat = jnp.clip(q_start + W @ sol.value, lo, hi)
    return sg(base.at[idx].set(q_hat))


def profile_nll(model: TracedModel, data, yields, poi_value, whitening_poi=None):
    """Conditional fit at POI=``poi_value``: returns ``(nll_min, pars_hat)``.

    ``pars_hat`` is a constant (stop-gradient); ``nll_min`` is re-evaluated at
    it, so its gradient with respect to ``data``, ``yields`` and ``poi_value``
    is exact by the envelope theorem (see module docstring). The fit runs in
    coordinates whitened by the Hessian at init with POI=``whitening_poi``
    (default ``poi_value``).
    """
    with pyhf_jax_backend():
        sg = jax.lax.stop_gradient
        bound = model.bind(yields)
        bound_sg = model.bind(sg(yields))
        return _profile(model, bound, bound_sg, data, poi_value, whitening_poi)


def _profile(model, bound, bound_sg, data, poi_value, whitening_poi=None, whitening=None):
    sg = jax.lax.stop_gradient
    data_sg = sg(data)
    if whitening is None:
        wp = poi_value if whitening_poi is None else whitening_poi
        whitening = _whitening(bound_sg, sg(wp), _indices(model, False))
    pars_hat = _fit_nuisances(model, bound_sg, data_sg, poi_value, whitening)
    pars_hat = pars_hat.at[model.poi_index].set(poi_value)  # differentiable POI
    return bound.nll(pars_hat, data), pars_hat


def _safe_sqrt(x, tiny=1e-30):
    return jnp.sqrt(jnp.where(x > tiny, x, tiny))


@partial(jax.jit, static_argnums=0)
def q0_asimov(model: TracedModel, yields):
    """Discovery test statistic q0 on Asimov(POI=1) data (unconditional MLE = the Asimov point)."""
    with pyhf_jax_backend():
        sg = jax.lax.stop_gradient
        bound = model.bind(yields)
        bound_sg = model.bind(sg(yields))
        data = bound.asimov_data(1.0)
        nll_hat = bound.nll(model.poi_pars(1.0), data)
        nll_0, _ = _profile(model, bound, bound_sg, data, 0.0, whitening_poi=1.0)
        return jnp.maximum(2.0 * (nll_0 - nll_hat), 0.0)


@partial(jax.jit, static_argnums=0)
def z0(model: TracedModel, yields):
    """Expected discovery significance ``sqrt(q0)`` (profiled nuisances)."""
    return _safe_sqrt(q0_asimov(model, yields))


def _qmu_tilde_asimov(model, yields, mu, whitening=None):
    """qtilde_mu on background-only Asimov data (mu_hat = 0 is the Asimov point)."""
    sg = jax.lax.stop_gradient
    bound = model.bind(yields)
    bound_sg = model.bind(sg(yields))
    data = bound.asimov_data(0.0)
    nll_hat = bound.nll(model.poi_pars(0.0), data)
    nll_mu, _ = _profile(model, bound, bound_sg, data, mu, whitening_poi=0.0, whitening=whitening)
    return jnp.maximum(2.0 * (nll_mu - nll_hat), 0.0)


@partial(jax.jit, static_argnums=0)
def qmu_tilde_asimov(model: TracedModel, yields, poi_value=1.0):
    """qtilde at ``poi_value`` on background-only Asimov data."""
    with pyhf_jax_backend():
        return _qmu_tilde_asimov(model, yields, poi_value)


@partial(jax.jit, static_argnums=0)
def cls(model: TracedModel, yields, poi_value=1.0):
    """Median expected CLs at ``poi_value`` (asymptotic, qtilde; pyhf's expected middle value).

    With ``q_A = qtilde_mu`` on background-only Asimov data, the median
    background-only test statistic sits at 0, so
    ``CLs = Phi(-sqrt(q_A)) / Phi(0) = 2 Phi(-sqrt(q_A))``.
    """
    qA = qmu_tilde_asimov(model, yields, poi_value)
    return 2.0 * jstats.norm.cdf(-_safe_sqrt(qA))


@partial(jax.jit, static_argnums=(0, 2))
def upper_limit(model: TracedModel, yields, cl: float = 0.95):
    """Median expected upper limit on the POI at confidence level ``cl`` (CLs method).

    Solves ``CLs_exp(mu) = 1 - cl``, i.e. ``sqrt(q_A(mu)) = Phi^-1(1 - (1-cl)/2)``,
    by Newton's method on ``sign(mu) sqrt(q_A(|mu|))`` started at the Wald
    estimate ``target * sigma_mu(POI=0)``; differentiated implicitly.
    """
    level = 1.0 - cl
    target = float(-scipy.stats.norm.ppf(level / 2.0))
    sg = jax.lax.stop_gradient
    with pyhf_jax_backend():
        bound_sg = model.bind(sg(yields))
        idx_all = _indices(model, include_poi=True)
        H = _asimov_fisher(bound_sg, 0.0, idx_all)
        mu_start = target * _sigma_from_hessian(H, idx_all, model.poi_index)
        whitening = _whitening(bound_sg, 0.0, _indices(model, include_poi=False))

        def fn(mu, args):
            yields_, wh = args
            q = _qmu_tilde_asimov(model, yields_, jnp.abs(mu), wh)
            return jnp.sign(mu) * _safe_sqrt(q) - target

        sol = optx.root_find(
            fn,
            optx.Newton(rtol=FitSettings.root_rtol, atol=FitSettings.root_atol),
            sg(mu_start),
            (yields, tuple(sg(w) for w in whitening)),
            max_steps=FitSettings.root_max_steps,
            adjoint=optx.ImplicitAdjoint(),
            throw=False,
        )
        return sol.value


OBJECTIVES = {
    "sigma_mu": sigma_mu,
    "z0": z0,
    "cls": cls,
    "upper_limit": upper_limit,
}

#: +1 if lower is better, -1 if higher is better.
SENSE = {"sigma_mu": 1.0, "z0": -1.0, "cls": 1.0, "upper_limit": 1.0}


def loss(name: str, **kwargs):
    """The function ``(model, yields) -> scalar`` to *minimise* for objective ``name``.

    ``kwargs`` are bound to the objective (e.g. ``loss("cls", poi_value=1.0)``).
    """
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
    f = partial(OBJECTIVES[name], **kwargs) if kwargs else OBJECTIVES[name]
    s = SENSE[name]

    def _loss(model, yields):
        return s * f(model, yields)

    _loss.__name__ = f"loss_{name}"
    return _loss
