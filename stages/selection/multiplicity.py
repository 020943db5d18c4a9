"""Soft multiplicity requirements: exact count probabilities of independently passing objects.

When object ``j`` passes with probability ``p_j`` (its soft-cut weight), the number of passing
objects follows a Poisson-binomial distribution. A short dynamic programme over the objects
gives it exactly; counts are capped (the last state absorbs "cap or more"), so the cost is
O(objects x states) per event and a requirement like "at least four jets" needs five states.
With hard weights (0 or 1) every probability is exactly 0 or 1: the hard count requirement.

Jets have three outcomes (not selected, selected untagged, selected tagged), so the joint
requirement "at least ``min_jets`` jets and exactly one / at least two b-tags" is one small 2D
programme over (jet count, tag count) states.

Derivatives (:func:`count_probabilities`): a requirement's probability is multilinear in the
per-object probabilities, ``P = sum_s alpha_j(s) sum_o o_j beta_{j+1}(dest_o(s))`` for every object
``j`` (``alpha``: the state distribution before ``j``, ``beta``: the probability of ending accepted
from a state after ``j``, ``o``: ``j``'s outcome probabilities). One forward and one backward pass
give every ``dP/dp_j``, ``dP/dq_j`` from the primal values alone, and a tangent is then
``sum_j dP/dp_j dp_j + dP/dq_j dq_j``: each of the Jacobian's tangent directions costs a K-term sum
instead of its own pass through the programme.

>>> import jax.numpy as jnp
>>> p = jnp.array([[0.5, 0.5, 1.0, 0.0]])
>>> count_distribution(p, cap=3).tolist()   # P(0), P(1), P(2), P(>=3)
[[0.0, 0.25, 0.5, 0.25]]
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

#: Objects up to this many are processed by an unrolled loop, more by a ``lax.scan``.
UNROLL_MAX = 4

# The programmes keep their states as separate [...] arrays (one per count, or per (jet count,
# tag count)) rather than one [..., states] array: every update is then an elementwise
# operation on whole event vectors, which XLA fuses and vectorises along the events, and forward
# mode (where no custom rule replaces it) pushes its tangents through the same few fused loops.
# States that cannot be reached (more tags than jets) are not stored at all.


def _add(a, b):
    return b if a is None else a + b


def _over_objects(step, init, *per_object, reverse: bool = False):
    """Run ``carry, out_j = step(carry, *object_j)`` over the last axis of the per-object pytrees
    (a ``lax.scan`` if long): ``(carry, outs)``, the outs stacked along a new last axis (None if none)."""
    k = jax.tree.leaves(per_object)[0].shape[-1]
    if k <= UNROLL_MAX:  # a few objects: unrolled, fused elementwise updates
        carry, outs = init, [None] * k
        for j in (reversed(range(k)) if reverse else range(k)):
            carry, outs[j] = step(carry, *jax.tree.map(lambda a: a[..., j], per_object))
        return carry, (jax.tree.map(lambda *o: jnp.stack(o, axis=-1), *outs) if k else None)
    xs = jax.tree.map(lambda a: jnp.moveaxis(a, -1, 0), per_object)
    carry, outs = jax.lax.scan(lambda c, x: step(c, *x), init, xs, reverse=reverse)
    return carry, jax.tree.map(lambda o: jnp.moveaxis(o, 0, -1), outs)


def count_distribution(p, cap: int):
    """P(count = 0 .. cap-1) and P(count >= cap) of independent passes ``p`` [..., K] -> [..., cap + 1]."""
    states, _ = _states((jnp.asarray(p),), cap, 0)
    return jnp.stack([states[(n, 0)] for n in range(cap + 1)], axis=-1)


def prob_exactly(p, k: int):
    """P(exactly ``k`` objects pass)."""
    return count_distribution(p, cap=k + 1)[..., k]


def prob_at_least(p, k: int):
    """P(at least ``k`` objects pass)."""
    if k <= 0:
        return jnp.ones(jnp.shape(p)[:-1], jnp.asarray(p).dtype)
    return count_distribution(p, cap=k)[..., k]


def state_keys(count_cap: int, tag_cap: int) -> list:
    """The reachable capped (count, tag count) states, sorted."""
    reach = {(0, 0)}
    for _ in range(count_cap + tag_cap + 1):  # fixed point
        reach |= {(min(n + 1, count_cap), t) for n, t in reach}
        reach |= {(min(n + 1, count_cap), min(t + 1, tag_cap)) for n, t in reach}
    return sorted(reach)


def _destinations(key, count_cap: int, tag_cap: int) -> tuple:
    """States after an object that is not selected, selected untagged, selected tagged."""
    n, t = key
    return key, (min(n + 1, count_cap), t), (min(n + 1, count_cap), min(t + 1, tag_cap))


def _outcomes(p, q):
    """Probabilities of an object's outcomes (not selected, selected untagged, selected tagged);
    without a tag (``q`` None) a selected object is untagged."""
    if q is None:
        return 1.0 - p, p, None
    tag = p * q
    return 1.0 - p, p - tag, tag  # p (1 - q) as p - pq


def _states(objects, count_cap: int, tag_cap: int, keep: bool = False):
    """({state: probability [...]} after every object; with ``keep``, {state: [..., K]} before each)."""
    p_sel = objects[0]
    one = jnp.ones(p_sel.shape[:-1], p_sel.dtype)
    keys = state_keys(count_cap, tag_cap)
    init = {key: (one if key == (0, 0) else jnp.zeros_like(one)) for key in keys}

    def step(state, p, q=None):
        stay, untag, tag = _outcomes(p, q)
        new: dict = {}
        for key, v in state.items():
            s0, s1, s2 = _destinations(key, count_cap, tag_cap)
            if s0 == s1 == s2:  # absorbing in both counts
                new[s0] = _add(new.get(s0), v)
                continue
            new[s0] = _add(new.get(s0), v * stay)
            new[s1] = _add(new.get(s1), v * untag)
            if tag is not None:
                new[s2] = _add(new.get(s2), v * tag)
        return {key: new[key] for key in keys}, (state if keep else None)

    return _over_objects(step, init, *objects)


def _accepted_sums(states: dict, accept, zero):
    """[len(accept), ...]: per accepted set, the sum of its states' probabilities (in state order)."""
    rows = []
    for keys in accept:
        total = None
        for key, v in states.items():
            if key in keys:
                total = _add(total, v)
        rows.append(zero if total is None else total)
    return jnp.stack(rows)


def _coefficients(objects, before: dict, count_cap: int, tag_cap: int, accept):
    """(dP/dp [T, ..., K], dP/dq [T, ..., K] or None) of the accepted-set probabilities ``P``:
    the backward pass over ``beta`` (see the module docstring), ``before`` the forward pass's ``alpha``."""
    p_sel = objects[0]
    tagged = len(objects) == 2
    keys = state_keys(count_cap, tag_cap)
    shape = (len(accept),) + p_sel.shape[:-1]
    beta = {key: jnp.broadcast_to(jnp.asarray([float(key in keys_t) for keys_t in accept], p_sel.dtype)
                                  .reshape((-1,) + (1,) * (len(shape) - 1)), shape) for key in keys}

    def step(beta, alpha, p, q=None):
        stay, untag, tag = _outcomes(p, q)
        d_p, d_q, new = None, None, {}
        for key in keys:
            s0, s1, s2 = _destinations(key, count_cap, tag_cap)
            if s0 == s1 == s2:  # absorbing: no outcome of this object changes anything
                new[key] = beta[key]
                continue
            b0, b1 = beta[s0], beta[s1]
            if tagged:
                b21 = beta[s2] - b1
                d_p = _add(d_p, alpha[key] * (b1 - b0 + q * b21))
                d_q = _add(d_q, alpha[key] * b21)
                new[key] = b0 * stay + b1 * untag + beta[s2] * tag
            else:
                d_p = _add(d_p, alpha[key] * (b1 - b0))
                new[key] = b0 * stay + b1 * untag
        return new, (d_p, None if d_q is None else d_q * p)

    _, (c_p, c_q) = _over_objects(step, beta, before, *objects, reverse=True)
    return c_p, c_q


@partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _accepted_probabilities(objects, count_cap: int, tag_cap: int, accept):
    states, _ = _states(objects, count_cap, tag_cap)
    return _accepted_sums(states, accept, jnp.zeros(objects[0].shape[:-1], objects[0].dtype))


@_accepted_probabilities.defjvp
def _accepted_probabilities_jvp(count_cap, tag_cap, accept, primals, tangents):
    (objects,), (d_objects,) = primals, tangents
    states, before = _states(objects, count_cap, tag_cap, keep=True)
    out = _accepted_sums(states, accept, jnp.zeros(objects[0].shape[:-1], objects[0].dtype))
    coefficients = _coefficients(objects, before, count_cap, tag_cap, accept)
    # linear in the tangents (so reverse mode transposes it); the coefficients are primal values
    tangent = sum(jnp.sum(c * d[None], axis=-1) for c, d in zip(coefficients, d_objects))
    return out, tangent


def count_probabilities(p_sel, q_tag, count_cap: int, tag_cap: int, accept) -> jax.Array:
    """[len(accept), ...]: P(the capped (count, tag count) state is in ``accept[i]``), per ``i``.

    ``p_sel`` [..., K]: probability that each object passes; ``q_tag`` [..., K] or None: that it is
    tagged (independent of passing); ``accept``: tuples of states (the cap state means "cap or more";
    unreachable states are ignored). Without a tag (``q_tag`` None or ``tag_cap == 0``) the tag count
    is always 0. Derivatives by the per-object coefficients of the module docstring.
    """
    p_sel = jnp.asarray(p_sel)
    objects = (p_sel,) if q_tag is None or tag_cap == 0 else (p_sel, jnp.asarray(q_tag))
    return _accepted_probabilities(objects, count_cap, tag_cap if len(objects) == 2 else 0,
                                   tuple(tuple(keys) for keys in accept))


def jet_tag_distribution(p_sel, q_tag, jet_cap: int, tag_cap: int = 2):
    """Joint distribution of (selected-jet count, tagged selected-jet count), both capped.

    ``p_sel`` [..., K]: probability that jet passes the selection; ``q_tag`` [..., K]: probability
    that it is b-tagged (independent of the selection). Returns [..., jet_cap + 1, tag_cap + 1];
    the last index of each axis means "cap or more".
    """
    p_sel, q_tag = jnp.asarray(p_sel), jnp.asarray(q_tag)
    states, _ = _states((p_sel, q_tag), jet_cap, tag_cap)
    zero = jnp.zeros(p_sel.shape[:-1], p_sel.dtype)
    rows = [jnp.stack([states.get((n, t), zero) for t in range(tag_cap + 1)], axis=-1) for n in range(jet_cap + 1)]
    return jnp.stack(rows, axis=-2)


def jet_region_probs(p_sel, q_tag, min_jets: int):
    """{"exactly_1": P(n_jets >= min_jets and n_tag == 1), "at_least_2": P(n_jets >= min_jets and n_tag >= 2)}."""
    probs = count_probabilities(p_sel, q_tag, min_jets, 2, (((min_jets, 1),), ((min_jets, 2),)))
    return {"exactly_1": probs[0], "at_least_2": probs[1]}


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
        return (out, tuple(new)), None

    return jnp.stack(_over_objects(step, (out, prefix), values, p_sel)[0][0], axis=-1)
