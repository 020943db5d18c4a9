"""Soft multiplicity requirements: exact count probabilities of independently passing objects.

When object ``j`` passes with probability ``p_j`` (its soft-cut weight), the number of passing
objects follows a Poisson-binomial distribution. A short dynamic programme over the objects
gives it exactly; counts are capped (the last state absorbs "cap or more"), so the cost is
O(objects x states) per event and a requirement like "at least four jets" needs five states.
With hard weights (0 or 1) every probability is exactly 0 or 1: the hard count requirement.

Jets have three outcomes (not selected, selected untagged, selected tagged), so the joint
requirement "at least ``min_jets`` jets and exactly one / at least two b-tags" is one small 2D
programme over (jet count, tag count) states.

>>> import jax.numpy as jnp
>>> p = jnp.array([[0.5, 0.5, 1.0, 0.0]])
>>> count_distribution(p, cap=3).tolist()   # P(0), P(1), P(2), P(>=3)
[[0.0, 0.25, 0.5, 0.25]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

#: Objects up to this many are processed by an unrolled loop, more by a ``lax.scan``.
UNROLL_MAX = 4


def _shift_absorbing(s, axis: int):
    """Move probability one count up along ``axis``; the last state keeps what it had (absorbing)."""
    s = jnp.moveaxis(s, axis, -1)
    up = jnp.concatenate([jnp.zeros_like(s[..., :1]), s[..., :-1]], axis=-1)
    up = up.at[..., -1].add(s[..., -1])
    return jnp.moveaxis(up, -1, axis)


def count_distribution(p, cap: int):
    """P(count = 0 .. cap-1) and P(count >= cap) of independent passes ``p`` [..., K] -> [..., cap + 1]."""
    p = jnp.asarray(p)
    state = jnp.zeros(p.shape[:-1] + (cap + 1,), p.dtype).at[..., 0].set(1.0)

    def step(state, pj):
        pj = pj[..., None]
        return state * (1.0 - pj) + _shift_absorbing(state, -1) * pj, None

    return _over_objects(step, state, p)


def _over_objects(step, init, *per_object):
    """Run ``step(carry, *object_j)`` over the last axis of the per-object arrays (scan if long)."""
    k = per_object[0].shape[-1]
    if k <= UNROLL_MAX:  # a few objects: unrolled, fused elementwise updates
        carry = init
        for j in range(k):
            carry, _ = step(carry, *(a[..., j] for a in per_object))
        return carry
    carry, _ = jax.lax.scan(lambda c, xs: step(c, *xs), init, tuple(jnp.moveaxis(a, -1, 0) for a in per_object))
    return carry


def prob_exactly(p, k: int):
    """P(exactly ``k`` objects pass)."""
    return count_distribution(p, cap=k + 1)[..., k]


def prob_at_least(p, k: int):
    """P(at least ``k`` objects pass)."""
    if k <= 0:
        return jnp.ones(jnp.shape(p)[:-1], jnp.asarray(p).dtype)
    return count_distribution(p, cap=k)[..., k]


def jet_tag_distribution(p_sel, q_tag, jet_cap: int, tag_cap: int = 2):
    """Joint distribution of (selected-jet count, tagged selected-jet count), both capped.

    ``p_sel`` [..., K]: probability that jet passes the selection; ``q_tag`` [..., K]: probability
    that it is b-tagged (independent of the selection). Returns [..., jet_cap + 1, tag_cap + 1];
    the last index of each axis means "cap or more".
    """
    p_sel, q_tag = jnp.asarray(p_sel), jnp.asarray(q_tag)
    shape = p_sel.shape[:-1] + (jet_cap + 1, tag_cap + 1)
    state = jnp.zeros(shape, p_sel.dtype).at[..., 0, 0].set(1.0)

    def step(state, p, q):
        p, q = p[..., None, None], q[..., None, None]
        moved = _shift_absorbing(state, -2)  # one more selected jet
        return state * (1.0 - p) + moved * (p * (1.0 - q)) + _shift_absorbing(moved, -1) * (p * q), None

    return _over_objects(step, state, p_sel, q_tag)


def jet_region_probs(p_sel, q_tag, min_jets: int):
    """{"exactly_1": P(n_jets >= min_jets and n_tag == 1), "at_least_2": P(n_jets >= min_jets and n_tag >= 2)}."""
    dist = jet_tag_distribution(p_sel, q_tag, jet_cap=min_jets, tag_cap=2)
    return {"exactly_1": dist[..., min_jets, 1], "at_least_2": dist[..., min_jets, 2]}


def nth_selected_value(values, p_sel, n: int):
    """Expected value of the i-th selected object (file order), i = 0 .. n-1 -> [..., n].

    ``sum_j values_j * p_j * P(exactly i of the objects before j pass)``; 0 where fewer than
    i + 1 objects pass, like the conventional ``pad_none(...)[:, i]`` filled with 0. In the hard
    limit it is exactly the i-th selected object's value.
    """
    values, p_sel = jnp.asarray(values), jnp.asarray(p_sel)
    prefix = jnp.zeros(p_sel.shape[:-1] + (n + 1,), p_sel.dtype).at[..., 0].set(1.0)
    out = jnp.zeros(p_sel.shape[:-1] + (n,), values.dtype)

    def step(carry, vj, pj):
        out, prefix = carry
        pj = pj[..., None]
        out = out + (vj[..., None] * pj) * prefix[..., :n]
        return (out, prefix * (1.0 - pj) + _shift_absorbing(prefix, -1) * pj), None

    return _over_objects(step, (out, prefix), values, p_sel)[0]
