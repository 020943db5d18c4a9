"""Expected-sensitivity objectives of a :class:`~jacana.stages.stats.likelihood.TracedModel`.

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
    ``CLs_exp(mu) = 1 - cl``, found by optimistix's Newton root finder on the
    POI and differentiated implicitly (``optimistix.ImplicitAdjoint``).

Convention: **lower is better** for the optimiser. :data:`OBJECTIVES` maps a
name to the physics value; :func:`loss` returns the function to *minimise*
(``sigma_mu``, ``-z0``, ``cls``, ``upper_limit``); :data:`SENSE` gives the sign.

Profiled fits (``z0``, ``cls``, ``upper_limit``) use a projected Newton method in the
parameter bounds (:func:`_minimise_bounded`), written as plain ``jax.lax`` loops because
optimistix has no bound-constrained minimiser. Their gradients use the envelope theorem: the
fitted nuisances enter under ``jax.lax.stop_gradient`` (``dg/dy = dNLL/dy`` at the optimum), so
the fit is never differentiated and only *first* derivatives of profiled quantities are exact.
The solver's design and its measured step counts: ``docs/statistics.md``.
"""

from __future__ import annotations

import weakref
from functools import partial

import jax
import jax.numpy as jnp
import jax.scipy.stats as jstats
import numpy as np
import scipy.stats

from jacana.stages.registry import Registry
from jacana.stages.stats.likelihood import TracedModel, pyhf_jax_backend

__all__ = [
    "OBJECTIVES",
    "SENSE",
    "FitSettings",
    "cls",
    "fisher",
    "loss",
    "profile_nll",
    "q0_asimov",
    "qmu_tilde_asimov",
    "sigma_mu",
    "upper_limit",
    "z0",
]


class FitSettings:
    """Tolerances of the profiled fits and of the upper-limit root finder."""

    #: a fit stops once the Newton decrement ``g^T H^-1 g`` (about twice the NLL
    #: distance to the minimum) is below this, after taking that step
    fit_tol = 1e-12
    fit_max_steps = 50
    #: a Gauss-Newton step that shrinks the Newton decrement by less than this factor
    #: switches the rest of the fit to exact-Hessian Newton steps
    slow_ratio = 0.5
    #: a parameter bounded below by 0 or more falls to at least this fraction of its value per step
    max_shrink = 0.1
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
def _direction(H, g, free):
    """Newton direction ``-H_ff^-1 g_f`` on the free set (zero on the active set), by a
    Cholesky factorisation of the diagonally rescaled reduced matrix; also whether it
    is usable (finite and a descent direction)."""
    n = g.shape[0]
    Hr = jnp.where(free[:, None] & free[None, :], H, jnp.eye(n))
    gr = jnp.where(free, g, 0.0)
    dg = jnp.diag(Hr)
    s = jnp.where(dg > 0, jnp.sqrt(jnp.where(dg > 0, dg, 1.0)), 1.0)
    L = jnp.linalg.cholesky(Hr / s[:, None] / s[None, :] + 1e-12 * jnp.eye(n))
    d = -jax.scipy.linalg.cho_solve((L, True), gr / s) / s
    dec = -jnp.dot(gr, d)
    ok = jnp.all(jnp.isfinite(d)) & (dec >= 0)
    return d, dec, ok


def _random_point(model: TracedModel, rng: np.random.Generator):
    """Random positive yields and random parameters inside the bounds, for set-up checks
    of structure (an accidental zero derivative there is a probability-zero event)."""
    yields = jax.tree_util.tree_map(lambda a: np.asarray(a) * rng.uniform(0.5, 1.5, np.shape(a)) + 0.1,
                                    model.yields_template())
    pars = np.clip(model.init + rng.uniform(-0.4, 0.4, model.npars), model.bounds[:, 0], model.bounds[:, 1])
    return yields, pars


def _lam_at(model: TracedModel, idx: np.ndarray, yields, pars):
    """``q -> `` the expected main-data counts with ``pars[idx] = q`` (traced yields/pars)."""
    bound = model.bind(yields)
    return lambda q: bound.expected_actualdata(pars.at[idx].set(q))


_COLORINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _jacobian_coloring(model: TracedModel, idx: np.ndarray):
    """Column groups of ``d lam / d pars[idx]`` that touch disjoint bins (host-side, cached).

    Per-bin parameters (staterror, shapesys, shapefactor) each move one bin, so the
    columns of a whole modifier -- of all of them, across channels -- can share one
    forward-mode tangent: the Jacobian then costs a dozen tangents instead of one per
    parameter. The sparsity pattern is read off exact Jacobians at two random points
    (random positive yields, random parameters; an accidental zero there is a
    probability-zero event) and the compressed Jacobian is checked against the full
    one at a third point; if anything disagrees, no compression. Returns ``(seed,
    color, pattern)``: tangents ``seed`` (nfree x ncolors), each column's tangent
    ``color`` and the nonzero ``pattern`` (nbins x nfree), or None.
    """
    key = tuple(int(i) for i in idx)
    cached = _COLORINGS.setdefault(model, {})
    if key in cached:
        return cached[key]
    rng = np.random.default_rng(20240917)
    # compiled: pyhf's graph evaluated op by op takes several times longer than compiling it
    full_jacobian = jax.jit(lambda y, pars: jax.jacfwd(_lam_at(model, idx, y, pars))(pars[idx]))
    compressed_jacobian = jax.jit(lambda y, pars, seed: jax.vmap(
        lambda v: jax.jvp(_lam_at(model, idx, y, pars), (pars[idx],), (v,))[1], 1, 1)(seed))

    pattern = np.zeros((model.nmaindata, len(idx)), dtype=bool)
    with jax.ensure_compile_time_eval(), pyhf_jax_backend():
        for _ in range(2):
            pattern |= np.asarray(full_jacobian(*_random_point(model, rng))) != 0
    color = np.full(len(idx), -1)
    rows = []  # the bins each color touches
    for j in range(len(idx)):
        for c, used in enumerate(rows):
            if not np.any(used & pattern[:, j]):
                color[j], rows[c] = c, used | pattern[:, j]
                break
        else:
            color[j] = len(rows)
            rows.append(pattern[:, j].copy())
    seed = np.zeros((len(idx), len(rows)))
    seed[np.arange(len(idx)), color] = 1.0
    result = (seed, color, pattern)
    y, pars = _random_point(model, rng)
    with jax.ensure_compile_time_eval(), pyhf_jax_backend():
        J = np.asarray(full_jacobian(y, pars))
        Jc = np.asarray(compressed_jacobian(y, pars, seed))
    if len(rows) >= len(idx) or not np.allclose(np.where(pattern, Jc[:, color], 0.0), J,
                                                rtol=1e-10, atol=0.0):
        result = None
    cached[key] = result
    return result


_LOCAL_BLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _linear_local_parameters(model: TracedModel, idx: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Which of ``pars[idx]`` move one bin each with no curvature among themselves (cached).

    Per-bin factors (staterror, shapesys, shapefactor) scale one bin linearly, so the
    block of ``hess lam_b`` among them is zero and there the Gauss-Newton matrix is the
    exact Hessian: the fit then needs exact second derivatives only along the other
    (global) parameters. The candidates' block is checked to vanish at two random points:
    the Hessian of ``c . lam`` (random ``c``) times a random vector ``v`` on the candidates
    must be exactly zero on them (a nonzero block gives a nonzero product with probability
    one), else nothing is local.
    """
    key = tuple(int(i) for i in idx)
    cached = _LOCAL_BLOCKS.setdefault(model, {})
    if key in cached:
        return cached[key]
    local = pattern.sum(axis=0) == 1
    rng = np.random.default_rng(20261201)
    if local.any():
        for _ in range(2):
            y, pars = _random_point(model, rng)
            c = rng.normal(size=model.nmaindata)
            v = np.where(local, rng.normal(size=len(idx)), 0.0)
            with jax.ensure_compile_time_eval(), pyhf_jax_backend():
                Hv = np.asarray(_curvature_product(model, idx)(y, pars, c, v))
            if np.any(Hv[local] != 0.0):
                local[:] = False
                break
    cached[key] = local
    return local


def _curvature_product(model: TracedModel, idx: np.ndarray):
    """Jitted ``(yields, pars, c, v) -> hess_q (c . lam(pars with q at idx)) v``, for set-up
    checks: compiled once, quicker than evaluating pyhf's graph op by op."""

    @jax.jit
    def product(y, pars, c, v):
        lam = _lam_at(model, idx, y, pars)
        return jax.jvp(jax.grad(lambda q: jnp.dot(c, lam(q))), (pars[idx],), (v,))[1]

    return product


def _minimise_bounded(nll, lam, cons, n_main, q0, lo, hi, coloring=None, local=None, exact=True):
    """Minimise ``nll(q)`` in the box ``[lo, hi]`` from ``q0``: projected Newton.

    ``lam(q)`` are the expected main-data counts: ``nll`` is their Poisson NLL
    against ``n_main`` plus ``cons(q)``, the constraint terms. Each step builds, from
    one forward-mode Jacobian ``J`` of ``lam`` (compressed by ``coloring``, see
    :func:`_jacobian_coloring`), the exact gradient ``J^T (1 - n/lam) + grad cons``, the
    Gauss-Newton matrix ``J^T diag(n/lam^2) J + hess cons`` and from it the exact
    Hessian (:func:`_exact_hessian`: forward-over-reverse columns along the global
    parameters only, the per-bin block ``local`` being exact in Gauss-Newton already),
    and takes a Newton step on the free set: parameters on a bound whose gradient
    points out of the box are held there (projected Newton, Bertsekas 1982), the step is
    projected into the box (a parameter bounded below by 0 or more shrinks by at most
    ``FitSettings.max_shrink`` per step) and backtracked until the NLL decreases
    (Armijo). With ``exact`` (cold fits from the generating point) the steps use the
    exact Hessian, or Gauss-Newton where it is not positive definite on the free set:
    a fit far from its data (the background-only fit of ``z0`` on a signal-dominated
    model) has residuals ``1 - n/lam`` of order one, and Gauss-Newton then creeps along
    a curved valley (step counts measured on the AGC model: ``docs/statistics.md``).
    Without it (warm starts) the steps are Gauss-Newton, cheaper and quick near the
    optimum, until one shrinks the decrement by less than ``FitSettings.slow_ratio``.
    Stops when the Newton decrement ``g^T H^-1 g`` (about twice the
    distance to the minimum) drops below ``FitSettings.fit_tol``, or is predicted to at
    the rate of the last step, after taking that last step. The matrix only steers the
    steps; the fixed point is the (projected) stationary point of the gradient, which
    is exact because ``J`` is (a compression is verified against the full Jacobian
    when it is set up) and ``lam``/``cons`` are pyhf's own terms of ``nll``.
    """
    n = n_main
    eps = float(np.finfo(np.float64).eps)
    cons_grad = jax.grad(cons)

    if coloring is None:
        def jacobian(q):
            """``(J, lam(q))``."""
            return jax.jacfwd(lambda q: (lam(q), lam(q)), has_aux=True)(q)
    else:
        seed, color, pattern = coloring

        def jacobian(q):
            lm, Jc = jax.vmap(lambda v: jax.jvp(lam, (q,), (v,)), 1, (None, 1))(jnp.asarray(seed))
            return jnp.where(jnp.asarray(pattern), Jc[:, color], 0.0), lm

    exact_hessian = _exact_hessian(nll, q0.shape[0], local)

    def body(state):
        k, q, f, dec_prev, exact, _ = state
        J, lm = jacobian(q)
        # pyhf's constraint term is a sum of one-parameter terms: its Hessian is diagonal
        gc, hc = jax.jvp(cons_grad, (q,), (jnp.ones_like(q),))
        safe = jnp.where(lm > 0, lm, 1.0)
        # pyhf's Poisson term: -n log(lam) + lam (+ const), so d/dlam = 1 - n/lam
        g = J.T @ jnp.where(lm > 0, 1.0 - n / safe, 1.0) + gc
        Hgn = (J.T * jnp.where(lm > 0, n / safe**2, 0.0)) @ J + jnp.diag(hc)
        free = ~(((q <= lo) & (g > 0)) | ((q >= hi) & (g < 0)))

        def newton():
            d_ex, dec_ex, ok_ex = _direction(exact_hessian(q, Hgn), g, free)
            return jax.lax.cond(ok_ex, lambda: (d_ex, dec_ex), gauss_newton)

        def gauss_newton():
            return _direction(Hgn, g, free)[:2]

        d, dec = jax.lax.cond(exact, newton, gauss_newton)
        # Gauss-Newton that shrinks the decrement by less than FitSettings.slow_ratio
        # per step is creeping: exact steps from the next one on
        exact = exact | (dec > FitSettings.slow_ratio * dec_prev)

        # a positive parameter (a per-bin gamma) shrinks by at most FitSettings.max_shrink
        # per step: Newton on the -n log(gamma) of a bin pushed to the bound climbs back
        # only by doublings (15 steps from 1e-7)
        floor = jnp.where(lo >= 0, jnp.maximum(lo, FitSettings.max_shrink * q), lo)

        def trial(t):
            qt = jnp.clip(q + t * d, floor, hi)
            ft = nll(qt)
            return qt, ft, ft <= f - 1e-4 * t * dec + 8 * eps * jnp.abs(f)

        def ls_cond(c):
            return (~c[-1]) & (c[0] > 1e-6)

        def ls_body(c):
            t = 0.5 * c[0]
            return (t, *trial(t))

        _, qn, fn, ok = jax.lax.while_loop(ls_cond, ls_body, (1.0, *trial(1.0)))
        # converged: the decrement is below tolerance, or will be after this step at
        # the rate of the last one (local regime only)
        tol = FitSettings.fit_tol
        predicted = (k > 0) & (dec < 1e-4) & (dec * dec < tol * dec_prev)
        done = (dec < tol) | predicted | ~ok
        return (k + 1, jnp.where(ok, qn, q), jnp.where(ok, fn, f), dec, exact, done)

    def cond(state):
        return (~state[-1]) & (state[0] < FitSettings.fit_max_steps)

    init = (0, q0, nll(q0), jnp.inf, jnp.asarray(exact), jnp.asarray(False))
    return jax.lax.while_loop(cond, body, init)[1]


def _exact_hessian(nll, m, local=None):
    """``(q, Hgn) -> hess nll(q)`` for ``m`` parameters, given the Gauss-Newton matrix ``Hgn``.

    The columns along the global parameters (those not in the boolean mask ``local``)
    are forward-over-reverse products of ``nll``; the block among the ``local`` ones
    is taken from ``Hgn``, where it is exact (:func:`_linear_local_parameters`). On the
    AGC model that is 11 products instead of 33.
    """
    nll_grad = jax.grad(nll)
    glob = np.arange(m) if local is None else np.flatnonzero(~np.asarray(local))
    tangents = np.eye(m)[:, glob]

    def hessian(q, Hgn):
        cols = jax.vmap(lambda v: jax.jvp(nll_grad, (q,), (v,))[1], 1, 1)(jnp.asarray(tangents))
        return Hgn.at[:, glob].set(cols).at[glob, :].set(cols.T)

    return hessian


def _fit_nuisances(model, bound_sg, data_sg, poi_value, q_start=None):
    """Minimise the NLL over the free nuisances at fixed POI (no gradient flows).

    Starts from the suggested init (the Asimov generating point), or from
    ``q_start`` (free nuisances, e.g. a neighbouring fit); see :func:`_minimise_bounded`.
    """
    sg = jax.lax.stop_gradient
    idx = _indices(model, include_poi=False)
    mu = sg(jnp.asarray(poi_value, dtype=jnp.float64))
    base = model.poi_pars(mu)
    if len(idx) == 0:
        return base
    lo = jnp.asarray(model.bounds[idx, 0])
    hi = jnp.asarray(model.bounds[idx, 1])
    q0 = jnp.asarray(model.init[idx]) if q_start is None else sg(jnp.asarray(q_start))
    q0 = jnp.clip(q0, lo, hi)
    nmain = model.nmaindata
    coloring = _jacobian_coloring(model, idx)

    def pars(q):
        return base.at[idx].set(q)

    q_hat = _minimise_bounded(
        lambda q: bound_sg.nll(pars(q), data_sg),
        lambda q: bound_sg.expected_actualdata(pars(q)),
        lambda q: bound_sg.constraint_nll(pars(q), data_sg[nmain:]),
        data_sg[:nmain],
        q0,
        lo,
        hi,
        coloring,
        None if coloring is None else _linear_local_parameters(model, idx, coloring[2]),
        # from the generating point the residuals can be large (exact steps); a fit started
        # near its optimum converges in a few cheaper Gauss-Newton steps
        exact=q_start is None,
    )
    return sg(pars(q_hat))


def profile_nll(model: TracedModel, data, yields, poi_value, init=None):
    """Conditional fit at POI=``poi_value``: returns ``(nll_min, pars_hat)``.

    ``pars_hat`` is a constant (stop-gradient); ``nll_min`` is re-evaluated at
    it, so its gradient with respect to ``data``, ``yields`` and ``poi_value``
    is exact by the envelope theorem (see module docstring). ``init``: the
    full parameter vector to start the fit from (default: the suggested init).
    """
    with pyhf_jax_backend():
        sg = jax.lax.stop_gradient
        bound = model.bind(yields)
        bound_sg = model.bind(sg(yields))
        q_start = None if init is None else jnp.asarray(init)[_indices(model, False)]
        return _profile(model, bound, bound_sg, data, poi_value, q_start)


def _profile(model, bound, bound_sg, data, poi_value, q_start=None):
    sg = jax.lax.stop_gradient
    pars_hat = _fit_nuisances(model, bound_sg, sg(data), poi_value, q_start)
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
        nll_0, _ = _profile(model, bound, bound_sg, data, 0.0)
        return jnp.maximum(2.0 * (nll_0 - nll_hat), 0.0)


@partial(jax.jit, static_argnums=0)
def z0(model: TracedModel, yields):
    """Expected discovery significance ``sqrt(q0)`` (profiled nuisances)."""
    return _safe_sqrt(q0_asimov(model, yields))


def _qmu_tilde_asimov(model, yields, mu):
    """qtilde_mu on background-only Asimov data (mu_hat = 0 is the Asimov point)."""
    sg = jax.lax.stop_gradient
    bound = model.bind(yields)
    bound_sg = model.bind(sg(yields))
    data = bound.asimov_data(0.0)
    nll_hat = bound.nll(model.poi_pars(0.0), data)
    nll_mu, _ = _profile(model, bound, bound_sg, data, mu)
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


def _poi_response(H, idx_all, poi_index):
    """``dq/dmu = -H_qq^-1 H_q,mu``: the first-order shift of the conditional fit's
    nuisances per unit of POI, from the NLL Hessian ``H`` in parameters ``idx_all``."""
    k = int(np.flatnonzero(idx_all == poi_index)[0])
    rest = np.delete(np.arange(len(idx_all)), k)
    free = jnp.ones(len(rest), dtype=bool)
    dq, _, ok = _direction(H[np.ix_(rest, rest)], H[rest, k], free)
    return jax.lax.stop_gradient(jnp.where(ok, dq, 0.0))


@partial(jax.jit, static_argnums=(0, 2))
def upper_limit(model: TracedModel, yields, cl: float = 0.95):
    """Median expected upper limit on the POI at confidence level ``cl`` (CLs method).

    Solves ``CLs_exp(mu) = 1 - cl``, i.e. ``F(mu) = sqrt(q_A(mu)) - target = 0`` with
    ``target = Phi^-1(1 - (1-cl)/2)``, with optimistix's Newton root finder started at
    the Wald estimate ``target * sigma_mu(POI=0)``, and differentiates the root with
    optimistix's :class:`~optimistix.ImplicitAdjoint` (implicit function theorem,
    ``d mu*/d y = -(dF/dy) / F'(mu*)``). Inside ``F`` the conditional fit at ``mu`` is a
    constant and ``F`` is re-evaluated at it, so ``F'(mu)`` and ``dF/dy`` are the
    envelope-theorem derivatives of the profiled ``q_A``. Each conditional fit starts
    from the Asimov point moved along the first-order response ``dq/dmu`` of the
    nuisances (from the Fisher matrix there), a few Newton steps from its optimum.
    """
    import optimistix as optx

    level = 1.0 - cl
    target = float(-scipy.stats.norm.ppf(level / 2.0))
    sg = jax.lax.stop_gradient
    idx_all = _indices(model, include_poi=True)
    idx = _indices(model, include_poi=False)
    poi = model.poi_index
    lo, hi = jnp.asarray(model.bounds[idx, 0]), jnp.asarray(model.bounds[idx, 1])
    q_init = jnp.asarray(model.init[idx])
    with pyhf_jax_backend():
        H = sg(_asimov_fisher(model.bind(sg(yields)), 0.0, idx_all))
    mu_start = sg(target * _sigma_from_hessian(H, idx_all, poi))
    dq_dmu = _poi_response(H, idx_all, poi)

    def F(mu, y):
        # traced again by optimistix's adjoint when differentiated: enter the backend here
        with pyhf_jax_backend():
            bound, bound_sg = model.bind(y), model.bind(sg(y))
            data = bound.asimov_data(0.0)
            nll_hat = bound.nll(model.poi_pars(0.0), data)
            pars = _fit_nuisances(model, bound_sg, sg(data), sg(mu), jnp.clip(q_init + sg(mu) * dq_dmu, lo, hi))
            nll_mu = bound.nll(pars.at[poi].set(mu), data)
            return _safe_sqrt(jnp.maximum(2.0 * (nll_mu - nll_hat), 0.0)) - target

    solver = optx.Newton(rtol=FitSettings.root_rtol, atol=FitSettings.root_atol)
    sol = optx.root_find(F, solver, mu_start, args=yields, max_steps=FitSettings.root_max_steps,
                         adjoint=optx.ImplicitAdjoint(), throw=False)
    # a failed root find is NaN (the optimiser refuses non-finite steps) rather than a silent wrong limit
    return jnp.where(sol.result == optx.RESULTS.successful, sol.value, jnp.nan)


#: The objective registry (the CLI's ``--objective`` choices): name -> ``f(model, yields, ...)``.
OBJECTIVES: Registry = Registry("objective")
for _name, _fn in {"sigma_mu": sigma_mu, "z0": z0, "cls": cls, "upper_limit": upper_limit}.items():
    OBJECTIVES.register(_name)(_fn)

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
