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

# The programmes keep their states as separate [...] arrays (one per count, or per (jet count,
# tag count)) rather than one [..., states] array: every update is then an elementwise
# operation on whole event vectors, which XLA fuses and vectorises along the events, and forward
# mode pushes its tangents through the same few fused loops. States that cannot be reached
# (more tags than jets) are not stored at all.


def _add(a, b):
    return b if a is None else a + b


def _over_objects(step, init, *per_object):
    """Run ``step(carry, *object_j)`` over the last axis of the per-object arrays (scan if long)."""
    k = per_object[0].shape[-1]
    if k <= UNROLL_MAX:  # a few objects: unrolled, fused elementwise updates
        carry = init
        for j in range(k):
            carry = step(carry, *(a[..., j] for a in per_object))
        return carry
    carry, _ = jax.lax.scan(lambda c, xs: (step(c, *xs), None), init,
                            tuple(jnp.moveaxis(a, -1, 0) for a in per_object))
    return carry


def count_distribution(p, cap: int):
    """P(count = 0 .. cap-1) and P(count >= cap) of independent passes ``p`` [..., K] -> [..., cap + 1]."""
    p = jnp.asarray(p)
    one = jnp.ones(p.shape[:-1], p.dtype)
    init = (one,) + tuple(jnp.zeros_like(one) for _ in range(cap))

    def step(state, pj):
        stay = 1.0 - pj
        new = [state[0] * stay]
        new += [state[i] * stay + state[i - 1] * pj for i in range(1, cap)]
        new.append(state[cap] + state[cap - 1] * pj)  # absorbing "cap or more"
        return tuple(new)

    return jnp.stack(_over_objects(step, init, p), axis=-1)


def prob_exactly(p, k: int):
    """P(exactly ``k`` objects pass)."""
    return count_distribution(p, cap=k + 1)[..., k]


def prob_at_least(p, k: int):
    """P(at least ``k`` objects pass)."""
    if k <= 0:
        return jnp.ones(jnp.shape(p)[:-1], jnp.asarray(p).dtype)
    return count_distribution(p, cap=k)[..., k]


def _jet_tag_states(p_sel, q_tag, jet_cap: int, tag_cap: int) -> dict:
    """{(jet count, tag count): probability [...]} of the reachable capped states."""
    one = jnp.ones(p_sel.shape[:-1], p_sel.dtype)
    reach = {(0, 0)}
    for _ in range(jet_cap + tag_cap + 1):  # states reachable at all (fixed point)
        reach |= {(min(n + 1, jet_cap), t) for n, t in reach}
        reach |= {(min(n + 1, jet_cap), min(t + 1, tag_cap)) for n, t in reach}
    keys = sorted(reach)
    init = {key: (one if key == (0, 0) else jnp.zeros_like(one)) for key in keys}

    def step(state, p, q):
        tag = p * q
        untag = p - tag  # p (1 - q)
        stay = 1.0 - p
        new: dict = {}
        for (n, t), v in state.items():
            if (n, t) == (jet_cap, tag_cap):  # absorbing in both counts
                new[(n, t)] = _add(new.get((n, t)), v)
                continue
            n1, t1 = min(n + 1, jet_cap), min(t + 1, tag_cap)
            new[(n, t)] = _add(new.get((n, t)), v * stay)
            new[(n1, t)] = _add(new.get((n1, t)), v * untag)
            new[(n1, t1)] = _add(new.get((n1, t1)), v * tag)
        return {key: new[key] for key in keys}

    return _over_objects(step, init, p_sel, q_tag)


def jet_tag_distribution(p_sel, q_tag, jet_cap: int, tag_cap: int = 2):
    """Joint distribution of (selected-jet count, tagged selected-jet count), both capped.

    ``p_sel`` [..., K]: probability that jet passes the selection; ``q_tag`` [..., K]: probability
    that it is b-tagged (independent of the selection). Returns [..., jet_cap + 1, tag_cap + 1];
    the last index of each axis means "cap or more".
    """
    p_sel, q_tag = jnp.asarray(p_sel), jnp.asarray(q_tag)
    states = _jet_tag_states(p_sel, q_tag, jet_cap, tag_cap)
    zero = jnp.zeros(p_sel.shape[:-1], p_sel.dtype)
    rows = [jnp.stack([states.get((n, t), zero) for t in range(tag_cap + 1)], axis=-1) for n in range(jet_cap + 1)]
    return jnp.stack(rows, axis=-2)


def count_states(p_sel, q_tag, count_cap: int, tag_cap: int = 0) -> dict:
    """{(count, tag count): probability [...]} of the capped states (the cap state means "cap or more").

    Without a tag (``q_tag`` None or ``tag_cap == 0``) the tag count is always 0 and this is
    :func:`count_distribution`; with one, the joint programme over (selected, selected and tagged).
    """
    p_sel = jnp.asarray(p_sel)
    if q_tag is None or tag_cap == 0:
        dist = count_distribution(p_sel, cap=count_cap)
        return {(n, 0): dist[..., n] for n in range(count_cap + 1)}
    return _jet_tag_states(p_sel, jnp.asarray(q_tag), count_cap, tag_cap)


def jet_region_probs(p_sel, q_tag, min_jets: int):
    """{"exactly_1": P(n_jets >= min_jets and n_tag == 1), "at_least_2": P(n_jets >= min_jets and n_tag >= 2)}."""
    p_sel, q_tag = jnp.asarray(p_sel), jnp.asarray(q_tag)
    states = _jet_tag_states(p_sel, q_tag, jet_cap=min_jets, tag_cap=2)
    zero = jnp.zeros(p_sel.shape[:-1], p_sel.dtype)
    return {"exactly_1": states.get((min_jets, 1), zero), "at_least_2": states.get((min_jets, 2), zero)}


def nth_selected_value(values, p_sel, n: int):
    """Expected value of the i-th selected object (file order), i = 0 .. n-1 -> [..., n].

    ``sum_j values_j * p_j * P(exactly i of the objects before j pass)``; 0 where fewer than
    i + 1 objects pass, like the conventional ``pad_none(...)[:, i]`` filled with 0. In the hard
    limit it is exactly the i-th selected object's value.
    """
    values, p_sel = jnp.asarray(values), jnp.asarray(p_sel)
    one = jnp.ones(p_sel.shape[:-1], p_sel.dtype)
    prefix = (one,) + tuple(jnp.zeros_like(one) for _ in range(n))  # P(exactly i before), i < n; P(>= n)
    out = tuple(jnp.zeros(p_sel.shape[:-1], values.dtype) for _ in range(n))

    def step(carry, vj, pj):
        out, prefix = carry
        vp = vj * pj
        out = tuple(o + vp * prefix[i] for i, o in enumerate(out))
        stay = 1.0 - pj
        new = [prefix[0] * stay] + [prefix[i] * stay + prefix[i - 1] * pj for i in range(1, n)]
        new.append(prefix[n] + prefix[n - 1] * pj)
        return out, tuple(new)

    return jnp.stack(_over_objects(step, (out, prefix), values, p_sel)[0], axis=-1)
