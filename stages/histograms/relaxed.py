"""Relaxed (binned-KDE) weighted histograms with an exact hard limit and bounded memory.

An event at ``x`` with weight ``w`` puts into bin ``b = [e_b, e_{b+1})`` the kernel mass

    m_b(x) = CDF((e_{b+1} - x) / h) - CDF((e_b - x) / h)

(``CDF`` of a normal kernel by default, the kernel of ``relaxed.ops.hist``; logistic optional). At
bandwidth ``h == 0`` the CDF is the exact step ``z > 0``, so ``m_b`` is exactly the ``[lo, hi)``
indicator of boost-histogram/hist, and values outside the edges are dropped (``flow=False``, the
reference's policy) or added to the first/last bin (``flow=True``).

Variance: each event is read as landing in bin ``b`` with probability ``m_b`` (and, in the analysis,
passing the soft selection with probability ``P``), so the soft histogram is the *expectation* of
the hard one and ``sumw2_b = sum w^2 m_b`` (times ``P``) is the expectation of the hard ``sum w^2``.
At ``h == 0`` it is exactly hist's ``Weight()`` variance. Pass ``weights2`` to override ``w^2``.

Derivatives (:func:`weighted_bin_mass`): a fill ``W^T m(x)`` has the tangent
``dW^T m + (W dx)^T dm/dx`` (+ the edges' and bandwidth's terms), and ``m`` and the per-event slope
``dm/dx`` come from one evaluation of the kernel (a JVP with a unit tangent). Every tangent direction
of a forward-mode Jacobian then costs two matrix products, not its own pass through the kernel.

Memory: events are processed in blocks of ``block_size`` (a ``lax.scan``), so the largest
temporary is ``block_size x bins``, independent of the number of events (``relaxed.ops.hist``
materialises ``events x (bins + 1)``). Bin edges may be traced parameters; they must be
non-decreasing (use :func:`ordered_edges` to parametrise them).

>>> import jax.numpy as jnp
>>> sumw, sumw2 = soft_histogram(jnp.array([0.5, 1.0, 1.5, 3.0]), jnp.array([0.0, 1.0, 2.0]), 0.0,
...                              weights=jnp.array([1.0, 2.0, 3.0, 4.0]))
>>> sumw.tolist(), sumw2.tolist()
([1.0, 5.0], [1.0, 13.0])
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jacana.stages.observables.kinematics import EXACT
from jacana.stages.selection.soft import step_cdf

jax.config.update("jax_enable_x64", True)

DEFAULT_BLOCK = 16384


def bin_mass(x, edges, bandwidth, flow: bool = False, kernel: str = "normal"):
    """Kernel mass of each event in each bin: x [n] -> [n, bins]. Exact ``[lo, hi)`` indicator at h = 0."""
    x = jnp.asarray(x)
    cdf = step_cdf(edges[None, :] - x[:, None], bandwidth, kernel)  # [n, bins + 1]: P(X < edge)
    mass = cdf[:, 1:] - cdf[:, :-1]
    if flow:
        mass = mass.at[:, 0].add(cdf[:, 0])
        mass = mass.at[:, -1].add(1.0 - cdf[:, -1])
    return mass


def _zero(tangent) -> bool:
    return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


@partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def weighted_bin_mass(x, weights, edges, bandwidth, flow: bool, kernel: str):
    """``weights^T bin_mass(x)``: x [n], weights [n, C] -> [C, bins] (C weighted histograms of ``x``)."""
    return jnp.matmul(weights.T, bin_mass(x, edges, bandwidth, flow, kernel), precision=EXACT)


@partial(weighted_bin_mass.defjvp, symbolic_zeros=True)
def _weighted_bin_mass_jvp(flow, kernel, primals, tangents):
    x, weights, edges, bandwidth = primals
    dx, dw, d_edges, d_bandwidth = tangents
    mass = lambda x, e, h: bin_mass(x, e, h, flow, kernel)  # noqa: E731
    if _zero(dx):
        m, slope = mass(x, edges, bandwidth), None
    else:  # bin_mass acts event by event: a unit tangent gives every event's dm/dx at once
        m, slope = jax.jvp(lambda y: mass(y, edges, bandwidth), (x,), (jnp.ones_like(x),))
    out = jnp.matmul(weights.T, m, precision=EXACT)
    # every term is linear in the tangents (reverse mode transposes this rule)
    terms = []
    if not _zero(dw):
        terms.append(jnp.matmul(dw.T, m, precision=EXACT))
    if slope is not None:
        terms.append(jnp.matmul((weights * dx[:, None]).T, slope, precision=EXACT))
    if not (_zero(d_edges) and _zero(d_bandwidth)):  # rare (traced edges, annealing): plain autodiff
        d_edges = jnp.zeros_like(edges) if _zero(d_edges) else d_edges
        d_bandwidth = jnp.zeros_like(bandwidth) if _zero(d_bandwidth) else d_bandwidth
        dm = jax.jvp(lambda e, h: mass(x, e, h), (edges, bandwidth), (d_edges, d_bandwidth))[1]
        terms.append(jnp.matmul(weights.T, dm, precision=EXACT))
    return out, (sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out))


def ordered_edges(low, increments):
    """Non-decreasing bin edges from a first edge and free increments: ``low + cumsum(|d|)``."""
    inc = jnp.abs(jnp.asarray(increments))
    return jnp.concatenate([jnp.reshape(low, (1,)), low + jnp.cumsum(inc)])


def soft_histogram(x, edges, bandwidth, weights=None, weights2=None, flow: bool = False,
                   kernel: str = "normal", block_size: int = DEFAULT_BLOCK):
    """Weighted relaxed histogram: ``(sumw, sumw2)``, each [bins] (or [W, bins] for weights [n, W]).

    ``x`` [n]; ``weights`` [n] or [n, W] (default 1); ``weights2`` like ``weights`` (default
    ``weights**2``); ``bandwidth`` a scalar (0 = the hard histogram). Memory ``O(block_size x bins)``.
    """
    x = jnp.asarray(x)
    edges = jnp.asarray(edges, dtype=x.dtype)
    n = x.shape[0]
    w = jnp.ones((n,), x.dtype) if weights is None else jnp.asarray(weights, dtype=x.dtype)
    w2 = w * w if weights2 is None else jnp.asarray(weights2, dtype=x.dtype)
    squeeze = w.ndim == 1
    if squeeze:
        w, w2 = w[:, None], w2[:, None]
    block = int(min(block_size, max(n, 1)))
    nblocks = -(-n // block)
    pad = nblocks * block - n
    if pad:  # padded events carry zero weight
        x = jnp.concatenate([x, jnp.zeros((pad,), x.dtype)])
        w = jnp.concatenate([w, jnp.zeros((pad, w.shape[1]), w.dtype)])
        w2 = jnp.concatenate([w2, jnp.zeros((pad, w2.shape[1]), w2.dtype)])
    xs = x.reshape(nblocks, block)
    ws = w.reshape(nblocks, block, -1)
    w2s = w2.reshape(nblocks, block, -1)
    nbins = edges.shape[0] - 1

    def body(carry, blk):
        xb, wb, w2b = blk
        m = bin_mass(xb, edges, bandwidth, flow, kernel)
        return (carry[0] + jnp.matmul(wb.T, m, precision=EXACT), carry[1] + jnp.matmul(w2b.T, m, precision=EXACT)), None

    init = (jnp.zeros((w.shape[1], nbins), x.dtype), jnp.zeros((w.shape[1], nbins), x.dtype))
    (sumw, sumw2), _ = jax.lax.scan(body, init, (xs, ws, w2s))
    if squeeze:
        sumw, sumw2 = sumw[0], sumw2[0]
    return sumw, sumw2


def fill_variations(values, selection, weight, factors, binning, flow: bool, kernel: str) -> dict:
    """Histogram contributions of a block: ``{region: (sumw [V + W, bins], sumw2 [V + W, bins])}``.

    ``values[region]`` [V, B] are the events' observable under each of V kinematic variations,
    ``selection[region]`` [V, B] their selection probabilities, ``weight`` [B] the nominal weights,
    ``factors`` the W weight-variation factors [B] each, applied to the nominal (first) variation, and
    ``binning[region]`` the region's (edges, kernel width). One :func:`weighted_bin_mass` per region
    and variation: the weight variations share the nominal one's kernel evaluation.
    ``sumw2`` is the expectation of the hard ``sum w^2`` (``w^2 x P(selection)``).

    ``weight`` [B, S] fills S histograms of each at once (the events of several (sample, file) keys in
    one block, :func:`jacana.stages.keyed.key_weights`: each event's weight in its key's column); the
    contributions are then [S, V + W, bins].
    """
    per_key = jnp.ndim(weight) == 2
    col = (lambda a: a[:, None]) if per_key else (lambda a: a)  # noqa: E731 -- [B] factors against [B, S] weights
    shifted = [weight * col(f) for f in factors]
    out = {}
    for name, (edges, bandwidth) in binning.items():
        x, s = values[name], selection[name]
        sumw, sumw2, var_w, var_w2 = [], [], [], []
        for v in range(x.shape[0]):
            w_kin = weight * col(s[v])
            var = [a * col(s[v]) for a in shifted] if v == 0 else []  # weight variations: nominal objects only
            cols = jnp.stack([w_kin, *var, weight * w_kin, *(a * b for a, b in zip(shifted, var))], axis=-1)
            half = cols.shape[-1] // 2  # sumw | sumw2 columns ([B, C] or [B, S, C])
            filled = weighted_bin_mass(x[v], cols.reshape(cols.shape[0], -1), edges, bandwidth, flow, kernel)
            filled = filled.reshape(cols.shape[1:] + filled.shape[-1:])  # [C, bins] or [S, C, bins]
            sumw.append(filled[..., 0, :])
            sumw2.append(filled[..., half, :])
            if v == 0:
                var_w, var_w2 = filled[..., 1:half, :], filled[..., half + 1:, :]
        out[name] = (jnp.concatenate([jnp.stack(sumw, axis=-2), var_w], axis=-2),
                     jnp.concatenate([jnp.stack(sumw2, axis=-2), var_w2], axis=-2))
    return out
