"""Per-chunk yields with their derivatives: forward-mode Jacobians and reverse-mode VJPs.

* :func:`yields_and_jacobian`: yields and ``d(yields)/d(params)`` for every region, variation and
  bin in one forward-mode pass (``jax.jacfwd``: the primal is computed once and the tangents of
  all parameters ride along, vectorised). Best for a few parameters (cuts, bin edges).
* :func:`yields_vjp`: yields and ``cotangent . d(yields)/d(params)`` (reverse mode), for a given
  cotangent with the structure of the yields (e.g. d(objective)/d(yields) from the driver). Best
  for many parameters.

Both are additive over chunks (and over the jet-bucket parts of a chunk): sum the results of
the chunks. Jacobian layout: ``jac[region]["sumw" | "sumw2"][param]`` with shape
``[variations, bins, *param_shape]``.

Example (needs the batches of a chunk)::

    ylds, jac = yields_and_jacobian(params, relax, batches, config)
    jac["4j1b"]["sumw"]["jet_pt_min"].shape      # (variations, bins)
"""

from __future__ import annotations

from functools import partial
from typing import Mapping

import jax

from jacana.stages.analysis import SoftConfig, add_yields, batch_parts, soft_yields

jax.config.update("jax_enable_x64", True)


@partial(jax.jit, static_argnames=("config",))
def yields_and_jacobian_call(params, relax, batch, config):
    """(yields, Jacobian) of ONE fixed-shape batch: one compiled program per call shape (what the
    benchmarks time call by call; :func:`yields_and_jacobian` sums these over a chunk's parts)."""

    def f(p):
        y = soft_yields(p, relax, batch, config)
        return y, y

    jac, ylds = jax.jacfwd(f, has_aux=True)(params)
    return ylds, jac


@partial(jax.jit, static_argnames=("config",))
def yields_vjp_call(params, relax, batch, config, cotangent):
    """(yields, VJP) of ONE fixed-shape batch (see :func:`yields_and_jacobian_call`)."""
    ylds, pullback = jax.vjp(lambda p: soft_yields(p, relax, batch, config), params)
    (grad,) = pullback(cotangent)
    return ylds, grad


def yields_and_jacobian(params: Mapping, relax: Mapping, batches, config: SoftConfig):
    """(yields, jacobian) of one chunk (an ``EventBatch``, a ``ChunkBatches`` or a list of parts)."""
    params = dict(params)
    total_y, total_j = None, None
    for part in batch_parts(batches):
        y, j = yields_and_jacobian_call(params, relax, part, config)
        total_y, total_j = add_yields(total_y, y), add_yields(total_j, j)
    return total_y, total_j


def yields_vjp(params: Mapping, relax: Mapping, batches, config: SoftConfig, cotangent: Mapping):
    """(yields, d(cotangent . yields)/d(params)) of one chunk; ``cotangent`` is shaped like the yields."""
    params = dict(params)
    total_y, total_g = None, None
    for part in batch_parts(batches):
        y, g = yields_vjp_call(params, relax, part, config, cotangent)
        total_y, total_g = add_yields(total_y, y), add_yields(total_g, g)
    return total_y, total_g
