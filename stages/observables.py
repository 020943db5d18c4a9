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
mode carries tangents only through the trijet weights.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from .soft import _safe_scale

jax.config.update("jax_enable_x64", True)


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
    tpx, tpy, tpz, te = four @ s  # the four-vector sums of all trijets (a BLAS matmul)
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


def _weight_floor(dtype) -> float:
    return 1e-100 if jnp.finfo(dtype).bits >= 64 else 1e-20


def _choose(score, weight, temperature, value):
    """Choice probabilities (``value is None``) or the expected ``value`` under them (last axis)."""
    temperature = jnp.asarray(temperature, score.dtype)
    # Candidates whose weight is below a floor are not candidates: with every weight near the
    # underflow limit the softmax normalisation's derivative (e / den^2) overflows to inf and
    # then NaN. Weights are 0 or 1 in the hard limit, so the floor never changes it.
    valid = weight > _weight_floor(weight.dtype)
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

    is_soft, safe_t = _safe_scale(temperature)
    # one branch runs (the predicate is a traced scalar: annealing to 0 does not recompile)
    return jax.lax.cond(is_soft, soft, hard, safe_t)


def soft_mbjj(pt, cos_phi, sin_phi, sinh_eta, mass, p_sel, q_tag, temperature):
    """Soft m_bjj per event: [..., K] jets -> [...] (0 where no trijet has weight > 0)."""
    tpt, tmass = trijet_kinematics(pt, cos_phi, sin_phi, sinh_eta, mass)
    w = trijet_weights(p_sel, q_tag)
    # materialise the [events, trijets] arrays once: XLA would otherwise recompute them in each reduction
    tpt, tmass, w = jax.lax.optimization_barrier((tpt, tmass, w))
    return _choose(tpt, w, temperature, tmass)
