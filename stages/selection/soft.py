"""Soft cuts: a cut ``x > theta`` as a weight in [0, 1] with an exact hard limit.

``soft_step(x, theta, tau)`` is ``sigmoid((x - theta) / tau)`` for ``tau > 0`` and exactly the
Heaviside step ``x > theta`` (strict, like the conventional analysis) at ``tau == 0``: the step is
computed as a step, not as a sigmoid with a large slope. The temperature ``tau`` may be a traced
value (annealing does not recompile), and the gradient is finite everywhere, ``tau == 0`` included
(it is zero there: a hard cut has no gradient). Both branches are computed and selected
with ``where`` (cheap elementwise work that XLA fuses with its neighbours).

>>> import jax.numpy as jnp
>>> soft_step(jnp.array([29.0, 30.0, 31.0]), 30.0, 0.0).tolist()
[0.0, 0.0, 1.0]
>>> [round(v, 3) for v in soft_step(jnp.array([29.0, 30.0, 31.0]), 30.0, 1.0).tolist()]
[0.269, 0.5, 0.731]

A "less than" cut ``|eta| < eta_max`` is ``soft_step(eta_max, |eta|, tau)``. Boolean object
identification (``jetId == 6``, ``tightId``) is not relaxed: it stays a boolean mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)


def safe_scale(scale):
    """(is_soft, scale or 1): the soft branch is evaluated with a harmless scale when ``scale == 0``.

    A scale below ``tiny**0.25`` of its dtype (1e-77 in float64, 3e-10 in float32) counts as zero:
    smaller ones would overflow ``(x - theta) / tau**2`` in the gradient and give NaN.
    """
    scale = jnp.asarray(scale)
    dtype = scale.dtype if jnp.issubdtype(scale.dtype, jnp.floating) else jnp.result_type(float)
    soft = scale > float(jnp.finfo(dtype).tiny) ** 0.25
    return soft, jnp.where(soft, scale, jnp.ones_like(scale))


def soft_step(x, theta, tau):
    """Weight of the cut ``x > theta``: ``sigmoid((x - theta)/tau)``; exactly ``x > theta`` at ``tau == 0``."""
    x = jnp.asarray(x)
    dtype = jnp.result_type(x, theta, jnp.asarray(tau)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
    is_soft, safe = safe_scale(tau)
    soft = jax.nn.sigmoid((x - theta) / safe).astype(dtype)
    return jnp.where(is_soft, soft, (x > theta).astype(dtype))


def log_soft_steps(x, theta, tau, log_zero: float):
    """``(log w, log(1 - w))`` of the cut ``x > theta`` (``w = soft_step(x, theta, tau)``) from the logit,
    ``log_sigmoid(+-z)``: finite where ``w`` or ``1 - w`` underflows (a float32 sigmoid is 0 below
    logits of -104). At ``tau == 0`` exactly ``(0, log_zero)`` where ``x > theta``, else ``(log_zero, 0)``;
    both are clamped at ``log_zero`` (``log_zero`` stands in for log 0).

    >>> [round(v, 3) for v in log_soft_steps(jnp.float32(-150.0), 0.0, 1.0, -1000.0)[0].reshape(1).tolist()]
    [-150.0]
    """
    x = jnp.asarray(x)
    dtype = jnp.result_type(x, theta, jnp.asarray(tau))
    is_soft, safe = safe_scale(tau)
    z = ((x - theta) / safe).astype(dtype)
    above = x > theta
    log_w = jnp.where(is_soft, jax.nn.log_sigmoid(z), jnp.where(above, 0.0, log_zero).astype(dtype))
    log_not = jnp.where(is_soft, jax.nn.log_sigmoid(-z), jnp.where(above, log_zero, 0.0).astype(dtype))
    return jnp.maximum(log_w, log_zero), jnp.maximum(log_not, log_zero)


def normal_cdf(x):
    """Standard normal CDF as ``erfc(-x / sqrt 2) / 2``: as accurate as ``jax.scipy.special.ndtr``
    (which evaluates both ``erf`` and ``erfc`` and selects) and cheaper on CPU (``docs/bench.md``)."""
    x = jnp.asarray(x)
    return 0.5 * jax.lax.erfc(x * jnp.asarray(-0.7071067811865476, x.dtype))


def step_cdf(z, scale, kernel: str = "normal"):
    """CDF of a kernel of width ``scale`` at ``z`` (``normal``: Phi(z/scale), ``logistic``: sigmoid(z/scale)).

    At ``scale == 0`` it is exactly the step ``z > 0``, so ``cdf(hi - x) - cdf(lo - x)`` is exactly the
    ``[lo, hi)`` indicator (boost-histogram's bin convention).
    """
    z = jnp.asarray(z)
    if kernel not in ("normal", "logistic"):
        raise ValueError(f"kernel must be 'normal' or 'logistic', got {kernel!r}")
    cdf = normal_cdf if kernel == "normal" else jax.nn.sigmoid
    is_soft, safe = safe_scale(scale)
    dtype = jnp.result_type(z, jnp.asarray(scale))
    return jax.lax.cond(is_soft, lambda s: cdf(z / s).astype(dtype), lambda s: (z > 0).astype(dtype), safe)
