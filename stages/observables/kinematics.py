"""Soft observables of the AGC analysis: HT and m_bjj, with exact hard limits.

* ``soft_ht``: the selection-weighted sum of jet pT, ``sum_j pT_j p_j``; with hard weights it is
  the scalar sum of the selected jets' pT.
* ``soft_mbjj``: the mass of "the highest-pT trijet with at least one b-tag" as a soft argmax over
  all C(K, 3) trijets of the padded jets. Trijet ``t = (a, b, c)`` has weight
  ``w_t = p_a p_b p_c (1 - (1-q_a)(1-q_b)(1-q_c))`` (its jets are selected and at least one is
  tagged) and is chosen with probability ``w_t exp(pT_t / T) / sum_s w_s exp(pT_s / T)``; m_bjj is
  the expected trijet mass. At ``T == 0`` the choice is the hard argmax: the first trijet, in the
  order of ``ak.combinations`` (lexicographic over file order), with the largest pT among those of
  weight > 0. With hard cut weights that is exactly the conventional trijet.

The trijet four-vector sums depend on the jet kinematics only (not on the parameters), so forward
mode carries tangents only through the trijet weights; and those (products over a trijet's jets)
enter through per-jet coefficients (a custom JVP, :func:`_expected_mass`), so a parameter tangent
costs O(jets), not O(trijets), per event. Trijet sums are BLAS matmuls with a fixed 0/1 matrix
(gathers are slow on CPU); weights are summed in log space (see :func:`soft_mbjj`).
"""

from __future__ import annotations

import itertools
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from jacana.stages.selection.soft import safe_scale

jax.config.update("jax_enable_x64", True)

#: Matrix products of event data in full precision: on GPUs, JAX's default lets float32 products run
#: in TF32 (10-bit mantissa), which made mixed precision 70x worse on an H200 (docs/bench.md, figure 9).
EXACT = jax.lax.Precision.HIGHEST


@lru_cache(maxsize=None)
def trijet_indices(n_jets: int) -> np.ndarray:
    """[C(n, 3), 3] jet indices of every trijet, lexicographic (``ak.combinations`` order)."""
    combos = list(itertools.combinations(range(n_jets), 3))
    return np.asarray(combos, dtype=np.int32).reshape(-1, 3)


def soft_ht(pt, p_sel):
    """Selection-weighted scalar sum of jet pT: [..., K] -> [...]."""
    return jnp.sum(pt * p_sel, axis=-1)


def jet_p4(pt, cos_phi, sin_phi, sinh_eta, mass):
    """(px, py, pz, E) of jets from pT and the parameter-free direction terms."""
    pz = pt * sinh_eta
    e = jnp.sqrt(pt * pt * (1.0 + sinh_eta * sinh_eta) + mass * mass)
    return pt * cos_phi, pt * sin_phi, pz, e


@lru_cache(maxsize=None)
def trijet_matrix(n_jets: int) -> np.ndarray:
    """[K, T] 0/1 matrix: column t sums the three jets of trijet t (a matmul instead of a gather)."""
    idx = trijet_indices(n_jets)
    out = np.zeros((n_jets, len(idx)))
    out[idx, np.arange(len(idx))[:, None]] = 1.0
    return out


def trijet_kinematics(pt, cos_phi, sin_phi, sinh_eta, mass):
    """Trijet pT and mass of every trijet: [..., K] -> ([..., T], [..., T])."""
    s = jnp.asarray(trijet_matrix(pt.shape[-1]), pt.dtype)
    four = jnp.stack(jet_p4(pt, cos_phi, sin_phi, sinh_eta, mass), axis=0)  # [4, ..., K]
    tpx, tpy, tpz, te = jnp.matmul(four, s, precision=EXACT)  # the four-vector sums of all trijets (a BLAS matmul)
    tpt2 = tpx * tpx + tpy * tpy
    m2 = te * te - tpt2 - tpz * tpz
    return jnp.sqrt(tpt2), jnp.sqrt(jnp.maximum(m2, 0.0))


def trijet_weights(p_sel, q_tag):
    """Probability that a trijet's jets are all selected and at least one is b-tagged: [..., T]."""
    idx = trijet_indices(p_sel.shape[-1])
    pa, pb, pc = (p_sel[..., idx[:, i]] for i in range(3))
    qa, qb, qc = (q_tag[..., idx[:, i]] for i in range(3))
    return pa * pb * pc * (1.0 - (1.0 - qa) * (1.0 - qb) * (1.0 - qc))


def soft_argmax_weights(score, weight, temperature):
    """Probabilities of choosing each candidate: softmax of ``score / T`` restricted by ``weight``.

    ``weight * exp(score / T)``, normalised over the last axis; at ``T == 0`` the one-hot of the first
    maximum of ``score`` among candidates of weight > 0. All zero where no candidate has weight > 0.
    """
    return _choose(score, weight, temperature, None)


def _choose(score, weight, temperature, value):
    """Choice probabilities (``value is None``) or the expected ``value`` under them (last axis)."""
    temperature = jnp.asarray(temperature, score.dtype)
    # Candidates: weight above 1e-100 (as :func:`_mass_terms`; in float32 any positive weight). With every
    # weight near the underflow limit the normalisation's derivative (e / den^2) would overflow to inf and
    # then NaN. Weights are 0 or 1 in the hard limit, so the floor never changes it.
    valid = weight > np.exp(LOG_WEIGHT_FLOOR)
    masked = jnp.where(valid, score, -jnp.inf)
    any_valid = jnp.any(valid, axis=-1, keepdims=True)

    def hard(_):  # first maximum among valid candidates
        first = jnp.argmax(masked, axis=-1)
        onehot = ((jnp.arange(score.shape[-1]) == first[..., None]) & any_valid).astype(score.dtype)
        return onehot if value is None else jnp.sum(onehot * value, axis=-1)

    def soft(t):  # weight-restricted softmax, stable (exponent <= 0 for valid candidates)
        top = jax.lax.stop_gradient(jnp.where(any_valid, jnp.max(masked, axis=-1, keepdims=True), 0.0))
        expo = jnp.minimum(jnp.where(valid, (score - top) / t, 0.0), 0.0)
        e = jnp.where(valid, weight * jnp.exp(expo), 0.0)
        den = jnp.sum(e, axis=-1, keepdims=True)
        den = jnp.where(den > 0, den, 1.0)
        if value is None:
            return e / den
        return jnp.sum(e * value, axis=-1) / den[..., 0]

    is_soft, safe_t = safe_scale(temperature)
    # one branch runs (the predicate is a traced scalar: annealing to 0 does not recompile)
    return jax.lax.cond(is_soft, soft, hard, safe_t)


def soft_mbjj(pt, cos_phi, sin_phi, sinh_eta, mass, p_sel, q_tag, temperature, log_inputs=None):
    """Soft m_bjj per event: [..., K] jets -> [...] (0 where no trijet has weight > 0).

    The trijet weights are computed in log space with matmuls (no gathers, which are slow on
    CPU): ``w_t = exp(sum_{j in t} log p_j) * (1 - exp(sum_{j in t} log(1 - q_j)))``. Logs of
    zero are clamped to ``LOG_ZERO`` (``exp(3 LOG_ZERO) == exp(LOG_ZERO) == 0`` in any float
    dtype), so hard weights (0 or 1) give exactly 0 or 1 and the hard limit is unchanged. float32 and
    float64 choose among the same trijets (:func:`_mass_terms`).

    Derivatives (:func:`_expected_mass`, a custom JVP): a tangent of the per-jet logs reaches the
    output through ``sum_j C_j dlog p_j`` with per-jet coefficients ``C`` computed once from the
    primal, so forward mode costs O(jets) per parameter instead of O(trijets).

    ``log_inputs``: ``(log p, log(1 - q))`` per jet where the caller has them from the cuts' logits
    (:func:`~jacana.stages.selection.soft.log_soft_steps`; float32 at narrow temperatures, where
    ``p`` itself underflows); default ``trijet_log_inputs(p_sel, q_tag)``.
    """
    tpt, tmass = trijet_kinematics(pt, cos_phi, sin_phi, sinh_eta, mass)
    lp, lq = trijet_log_inputs(p_sel, q_tag) if log_inputs is None else log_inputs
    return _expected_mass(tpt, tmass, lp, lq, jnp.asarray(temperature, tpt.dtype))


#: log(0) stand-in: exp of it (or of three times it) is exactly 0 in float32 and float64.
LOG_ZERO = -1000.0
#: A trijet (a candidate) counts when its weight exceeds 1e-100, in every dtype (as a log: float32
#: tests it in log space, where 1e-100 is representable). Below it, a candidate's share
#: ``w exp(dpT / T)`` is negligible unless dpT / T > 230.
LOG_WEIGHT_FLOOR = -230.25850929940458


def trijet_log_inputs(p_sel, q_tag):
    """(log p, log(1 - q)) per jet, ``LOG_ZERO`` where p == 0 (not selectable) / q == 1.

    The untaken branches are made harmless (``where`` inside and outside) so gradients stay finite.
    """
    p_ok = p_sel > 0
    lp = jnp.where(p_ok, jnp.log(jnp.where(p_ok, p_sel, 1.0)), LOG_ZERO)
    q_ok = q_tag < 1.0
    lq = jnp.where(q_ok, jnp.log1p(-jnp.where(q_ok, q_tag, 0.0)), LOG_ZERO)
    return lp, lq


def _ratio_cap(dtype) -> float:
    """Largest N / (1 - N) the m_bjj derivatives use: far from overflow after a sum over trijets."""
    return float(jnp.finfo(dtype).max) * 1e-10


def _mass_terms(tpt, tmass, lp, lq, temperature, coefficients: bool, want_pi: bool):
    """Expected trijet mass and, optionally, what its derivatives need.

    Returns ``(out, cp, cq, pi, r)``: ``cp``/``cq`` [..., K] the derivative of ``out`` with respect
    to ``lp``/``lq``; ``pi`` [..., T] the choice probabilities and ``r = pi (m_t - out)`` (the
    derivative with respect to each trijet's log-score); entries not asked for are None.

    The soft choice weighs trijet ``t`` by ``w_t exp((tpt_t - max tpt) / T)`` over the candidates,
    the trijets with ``w_t > 1e-100`` (``LOG_WEIGHT_FLOOR``), in every dtype. float64 computes
    ``w_t = P_t (1 - N_t)`` directly (it cannot underflow above the floor). In float32 it could (a
    trijet of weight 1e-21, a jet 48 sigma outside a cut, still wins with 200 GeV more pT), so float32
    works in log space: ``log P_t + log(1 - N_t) + score_t`` shifted by its maximum, the floor tested
    as ``1 - N_t > 1e-100 / P_t``. (A float64 logarithm per trijet would cost: XLA's is slow on CPUs,
    and with one the m_bjj forward pass took 1.4-1.7x as long.)
    """
    s = jnp.asarray(trijet_matrix(lp.shape[-1]), lp.dtype)
    g = jnp.matmul(jnp.stack([lp, lq], axis=0), s, precision=EXACT)  # [2, ..., T]: sums of log p, log(1 - q)
    log_p, log_n = g[0], g[1]
    tagged = log_n < 0  # some jet may be tagged
    tag = -jnp.expm1(jnp.where(tagged, log_n, -1.0))  # 1 - N_t, > 0 where tagged
    wide = jnp.finfo(tag.dtype).bits >= 64
    if wide:  # float64: w_t itself cannot underflow above the floor
        big_p = jnp.exp(log_p)
        w = big_p * tag
        valid = tagged & (w > np.exp(LOG_WEIGHT_FLOOR))
    else:  # float32: w_t may underflow, so the floor is tested as 1 - N_t > 1e-100 / P_t, capped at e > 1
        valid = tagged & (tag > jnp.exp(jnp.minimum(LOG_WEIGHT_FLOOR - log_p, 1.0)))
    masked = jnp.where(valid, tpt, -jnp.inf)
    any_valid = jnp.any(valid, axis=-1, keepdims=True)
    st = s.T  # [T, K]: trijet -> its jets
    k = lp.shape[-1]

    def hard(_):  # first maximum among valid candidates: no derivative through the weights
        first = jnp.argmax(masked, axis=-1)
        onehot = ((jnp.arange(tpt.shape[-1]) == first[..., None]) & any_valid).astype(tpt.dtype)
        out = jnp.sum(onehot * tmass, axis=-1)
        zeros = jnp.zeros(lp.shape[:-1] + (k,), lp.dtype) if coefficients else None
        return out, zeros, zeros, (onehot if want_pi else None), (jnp.zeros_like(tpt) if want_pi else None)

    def soft(t):  # e_t proportional to w_t exp(score_t), normalised over the candidates
        # the pT difference first (exact): no tpt / T of hundreds to lose digits
        top_pt = jnp.where(any_valid, jnp.max(masked, axis=-1, keepdims=True), 0.0)
        score = jnp.where(valid, (tpt - top_pt) / t, 0.0)  # <= 0
        if wide:  # e_t = w_t exp(score_t): the highest-pT candidate's is at least its w > 1e-100
            x = jnp.where(valid, jnp.exp(score), 0.0)
            e = w * x
        else:  # float32: in log space, log(1 - N_t) too (it may be near the smallest normal number)
            z = jnp.where(valid, log_p + jnp.log(jnp.where(valid, tag, 1.0)) + score, -jnp.inf)
            top = jax.lax.stop_gradient(jnp.where(any_valid, jnp.max(z, axis=-1, keepdims=True), 0.0))
            e = jnp.where(valid, jnp.exp(jnp.where(valid, z - top, 0.0)), 0.0)
        den = jnp.sum(e, axis=-1, keepdims=True)
        den = jnp.where(den > 0, den, 1.0)
        out = jnp.sum(e * tmass, axis=-1) / den[..., 0]
        cp = cq = pi = r = None
        if coefficients or want_pi:
            dev = (tmass - out[..., None]) / den  # d out / d e_t
            # d e_t = e_t dlog P_t - e_t N_t / (1 - N_t) dlog N_t, dlog P_t = sum_{j in t} dlp_j (same for N)
            if wide:  # e_t N_t / (1 - N_t) = x_t P_t N_t
                e_n = x * big_p * jnp.exp(log_n)
            else:
                # N / (1 - N) is large where every jet's tag probability q is tiny, but then so is the
                # tangent dlog N ~ q / tau: their product stays below e_t / tau. The cap keeps float32
                # finite when 1 - N is below ~1e-28.
                ratio = jnp.minimum((1.0 - tag) / jnp.where(valid, tag, 1.0), _ratio_cap(tag.dtype))
                e_n = jnp.where(valid, e * ratio, 0.0)
            both = jnp.matmul(jnp.stack([e * dev, -e_n * dev], axis=0), st, precision=EXACT)  # [2, ..., K]
            cp, cq = both[0], both[1]
            if want_pi:
                pi = e / den
                r = e * dev
            if not coefficients:
                cp = cq = None
        return out, cp, cq, pi, r

    is_soft, safe_t = safe_scale(temperature)
    return jax.lax.cond(is_soft, soft, hard, safe_t)


@jax.custom_jvp
def _expected_mass(tpt, tmass, lp, lq, temperature):
    """Mass of the soft-argmax trijet (see :func:`soft_mbjj`), from per-jet log weights."""
    return _mass_terms(tpt, tmass, lp, lq, temperature, False, False)[0]


def _is_zero(t) -> bool:
    return isinstance(t, jax.custom_derivatives.SymbolicZero)


@partial(_expected_mass.defjvp, symbolic_zeros=True)
def _expected_mass_jvp(primals, tangents):
    tpt, tmass, lp, lq, temperature = primals
    d_tpt, d_tmass, d_lp, d_lq, d_temp = tangents
    coefficients = not (_is_zero(d_lp) and _is_zero(d_lq))
    want_pi = not (_is_zero(d_tpt) and _is_zero(d_tmass) and _is_zero(d_temp))
    out, cp, cq, pi, r = _mass_terms(tpt, tmass, lp, lq, temperature, coefficients, want_pi)
    tan = jnp.zeros_like(out)
    if not _is_zero(d_lp):
        tan = tan + jnp.sum(cp * d_lp, axis=-1)
    if not _is_zero(d_lq):
        tan = tan + jnp.sum(cq * d_lq, axis=-1)
    chosen = pi > 0 if want_pi else None  # unchosen trijets may have non-finite data tangents (sqrt at 0)
    if not _is_zero(d_tmass):
        tan = tan + jnp.sum(jnp.where(chosen, pi * d_tmass, 0.0), axis=-1)
    if not (_is_zero(d_tpt) and _is_zero(d_temp)):
        # log-score (tpt - top) / T: d = d_tpt / T - (tpt - top) dT / T^2 (top cancels in the softmax)
        is_soft, safe_t = safe_scale(temperature)
        if not _is_zero(d_tpt):
            tan = tan + jnp.sum(jnp.where(chosen, r * d_tpt, 0.0), axis=-1) / safe_t
        if not _is_zero(d_temp):
            tan = tan - jnp.sum(r * tpt, axis=-1) * d_temp / (safe_t * safe_t)
    return out, tan
