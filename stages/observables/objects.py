"""Dense padded objects as observables see them, and the few operations that keep a hard limit.

An observable is one function of an :class:`ObservableContext`: per object set (``ctx.objects["jet"]``)
the dense padded fields ``[events, objects]`` (``pt`` already the kinematic variation's), the
selection weight ``w`` (the probability that each object passes the tunable cuts: 0 or 1 in hard
mode, so the same function is the hard analysis there) and, where the set has a tag (a b-tag),
the tag probability ``q``. Objects keep file order (NanoAOD: descending pT), padding has ``w = 0``.

Written with these helpers, an observable is exact in the hard limit and smooth in between:

* :func:`nth` -- the i-th selected object's value (expected value under the soft selection);
* :func:`selected_sum` -- the sum over selected objects;
* :func:`four_momentum` -- (px, py, pz, E) of the objects.

>>> import jax.numpy as jnp
>>> jets = Objects({"pt": jnp.array([[50.0, 40.0, 30.0]])}, w=jnp.array([[0.0, 1.0, 1.0]]))
>>> float(nth(jets.pt, jets.weights(), 0)[0]), float(selected_sum(jets.pt, jets.weights())[0])
(40.0, 70.0)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jacana.stages.selection.multiplicity import nth_selected_value

#: Which objects a ``select`` option picks: every selected object, or the tagged / untagged ones.
SELECTIONS = ("all", "tagged", "untagged")


@dataclasses.dataclass(frozen=True)
class Objects:
    """One object set of a block of events: ``fields`` [B, K] each, ``w`` and ``q`` [B, K];
    ``log_inputs``: ``(log w, log(1 - q))`` from the cuts' logits where the program has them (float32:
    :func:`~jacana.stages.observables.kinematics.soft_mbjj` at narrow temperatures), else None."""

    fields: Mapping[str, Any]
    w: Any
    q: Any = None
    log_inputs: Any = None

    def __getattr__(self, name: str):
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(f"object field {name!r} is not read; read fields: {sorted(self.fields)}") from None

    def weights(self, select: str = "all"):
        """Per-object weight of ``select``: ``w``, ``w q`` (tagged) or ``w (1 - q)`` (untagged)."""
        if select == "all":
            return self.w
        if self.q is None:
            raise ValueError(f"select={select!r} needs a tag on this object set (its config has no 'tag')")
        if select == "tagged":
            return self.w * self.q
        if select == "untagged":
            return self.w * (1.0 - self.q)
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")


@dataclasses.dataclass(frozen=True)
class ObservableContext:
    """What an observable function sees: object sets, per-event fields, relaxation, parameters, and the
    values of the observables computed before it (``values``; e.g. the features of a network)."""

    objects: Mapping[str, Objects]
    event: Mapping[str, Any]
    relax: Mapping[str, Any]
    params: Mapping[str, Any]
    values: Mapping[str, Any]


def nth(values, weights, index: int):
    """Value of the ``index``-th selected object (file order), 0 where fewer are selected: [B, K] -> [B]."""
    return nth_selected_value(values, weights, index + 1)[..., index]


def selected_sum(values, weights):
    """Sum of ``values`` over the selected objects: [B, K] -> [B]."""
    return jnp.sum(values * weights, axis=-1)


def four_momentum(objects: Objects):
    """(px, py, pz, E) of every object, from pT and the direction and mass terms."""
    pt = objects.pt
    sinh_eta = objects.sinh_eta
    e = safe_sqrt(pt * pt * (1.0 + sinh_eta * sinh_eta) + objects.mass * objects.mass)
    return pt * objects.cos_phi, pt * objects.sin_phi, pt * sinh_eta, e


def safe_sqrt(x):
    """sqrt(max(x, 0)) with a zero (not infinite or NaN) derivative where x <= 0: padded events and
    missing objects give zero four-vectors, and a gradient must not turn them into NaN."""
    ok = x > 0
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, x, 1.0)), 0.0)


def exact_divide(x, divisor):
    """``x / divisor`` for a scalar ``divisor``, rounded as numpy rounds it. XLA rewrites a division by a
    broadcast scalar into a multiplication by its reciprocal (an ulp off in about 1 value of 7); weights
    of the hard mode must equal the conventional analysis's bit for bit, so the divisor is given as a
    full array that the rewrite cannot see through."""
    x = jnp.asarray(x)
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(divisor, x.dtype), x.shape))


def mass_of(px, py, pz, e):
    """Invariant mass of a four-vector (0 where rounding makes it space-like)."""
    return safe_sqrt(e * e - px * px - py * py - pz * pz)
