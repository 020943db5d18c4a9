"""The observable registry: each kind one function of an :class:`~.objects.ObservableContext`.

A config names an observable by kind and gives its arguments::

    observables:
      ht:      {kind: scalar_sum, of: jet}
      m_bjj:   {kind: trijet_mass, of: jet}
      eta_j:   {kind: leading, of: jet, field: eta, select: untagged, abs: true}
      m_lb:    {kind: invariant_mass, parts: [{of: lepton}, {of: jet, select: tagged}]}

Every function is written on dense padded objects with the selection weights, so the same code is
the soft observable and, with 0/1 weights, the hard one. A user's own kind is one such function::

    from jacana.stages.observables.library import observable
    from jacana.stages.observables.objects import nth

    @observable("lead_jet_abs_eta")
    def lead_jet_abs_eta(ctx, of="jet"):
        jets = ctx.objects[of]
        return jnp.abs(nth(jets.eta, jets.weights(), 0))

and its module goes under the config's ``plugins`` (``docs/write-your-own-analysis.md``).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from jacana.stages.errors import ConfigError
from jacana.stages.observables import nn
from jacana.stages.observables.kinematics import soft_mbjj
from jacana.stages.observables.objects import (ObservableContext, Objects, four_momentum, mass_of, nth,
                                               safe_sqrt, selected_sum)
from jacana.stages.registry import Registry

#: Fields every object set provides to observables (from pT, eta, phi, mass where the collection has them).
KINEMATIC_FIELDS = ("pt", "eta", "phi", "mass", "cos_phi", "sin_phi", "sinh_eta")


@dataclasses.dataclass(frozen=True)
class Observable:
    """A registered observable kind.

    ``fn(ctx, **args) -> [events]``. ``reads(args)`` names the ``(object set, field)`` pairs it needs
    beyond the kinematic ones (None: nothing more); ``depends(args)`` the observables computed before
    it (a network's features); ``combinatorial``: its cost grows like C(objects, 3) per event (smaller
    blocks).
    """

    fn: Callable[..., Any]
    reads: Callable[[Mapping], list[tuple[str, str]]] | None = None
    depends: Callable[[Mapping], list[str]] | None = None
    combinatorial: bool = False

    def check_args(self, name: str, args: Mapping) -> None:
        """A ConfigError naming what is wrong when ``args`` do not fit the function's signature."""
        sig = inspect.signature(self.fn)
        params = list(sig.parameters.values())[1:]  # after ctx
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return
        known = {p.name for p in params}
        unknown = sorted(set(args) - known)
        missing = sorted(p.name for p in params if p.default is p.empty and p.name not in args)
        if unknown or missing:
            raise ConfigError(f"observables.{name}: " + "; ".join(
                ([f"unknown option(s) {unknown}"] if unknown else []) + ([f"missing option(s) {missing}"] if missing else []))
                + f" (options of this kind: {sorted(known)})")


OBSERVABLES: Registry[Observable] = Registry("observable kind")


def observable(name: str, *, reads=None, depends=None, combinatorial: bool = False, replace: bool = False):
    """Decorator: register ``fn(ctx, **options)`` as the observable kind ``name``."""
    def add(fn):
        OBSERVABLES.register(name, replace=replace)(Observable(fn, reads, depends, combinatorial))
        return fn
    return add


def _field_of(field: str):
    return lambda args: [(args.get("of"), args.get("field", field))] if args.get("field", field) not in KINEMATIC_FIELDS else []


@observable("count")
def count(ctx: ObservableContext, of: str, select: str = "all"):
    """Number of selected (tagged, untagged) objects."""
    return jnp.sum(ctx.objects[of].weights(select), axis=-1)


@observable("event_field", reads=lambda args: [("event", args["field"])])
def event_field(ctx: ObservableContext, field: str):
    """A number stored per event (``event_fields``: MET, a weight ratio, ...)."""
    return ctx.event[field]


@observable("scalar_sum", reads=_field_of("pt"))
def scalar_sum(ctx: ObservableContext, of: str, field: str = "pt", select: str = "all"):
    """Sum of ``field`` over the selected objects (HT for jets' pT)."""
    objs = ctx.objects[of]
    return selected_sum(objs.fields[field], objs.weights(select))


@observable("vector_sum_pt")
def vector_sum_pt(ctx: ObservableContext, of: str, select: str = "all"):
    """|sum of the selected objects' transverse momenta| (MHT for jets)."""
    objs = ctx.objects[of]
    w = objs.weights(select)
    px, py = selected_sum(objs.pt * objs.cos_phi, w), selected_sum(objs.pt * objs.sin_phi, w)
    return safe_sqrt(px * px + py * py)


@observable("leading", reads=_field_of("pt"))
def leading(ctx: ObservableContext, of: str, field: str = "pt", index: int = 0, select: str = "all",
            abs: bool = False):
    """``field`` of the ``index``-th selected object in file order (0 where fewer; ``abs``: its magnitude)."""
    objs = ctx.objects[of]
    v = nth(objs.fields[field], objs.weights(select), int(index))
    return jnp.abs(v) if abs else v


def _parts(of, n, parts) -> list[dict]:
    if parts is not None:
        return [{"index": 0, "select": "all", **p} for p in parts]
    if of is None:
        raise ValueError("give 'of' (with 'n') or 'parts'")
    return [{"of": of, "index": i, "select": "all"} for i in range(int(n))]


def _expected_p4(ctx: ObservableContext, part: Mapping):
    objs = ctx.objects[part["of"]]
    w = objs.weights(part.get("select", "all"))
    return tuple(nth(c, w, int(part.get("index", 0))) for c in four_momentum(objs))


@observable("invariant_mass")
def invariant_mass(ctx: ObservableContext, of: str | None = None, n: int = 2, parts: list | None = None):
    """Mass of the sum of objects: the ``n`` leading selected of ``of``, or the listed ``parts``
    (each ``{of, index, select}``). A missing object (fewer selected) counts as a zero four-vector."""
    total = None
    for part in _parts(of, n, parts):
        p4 = _expected_p4(ctx, part)
        total = p4 if total is None else tuple(a + b for a, b in zip(total, p4))
    return mass_of(*total)


@observable("trijet_mass", combinatorial=True)
def trijet_mass(ctx: ObservableContext, of: str = "jet"):
    """Mass of the highest-pT trijet with at least one tagged object (the AGC m_bjj); needs a tag."""
    j = ctx.objects[of]
    if j.q is None:
        raise ValueError(f"trijet_mass of {of!r} needs a tag on that object set")
    return soft_mbjj(j.pt, j.cos_phi, j.sin_phi, j.sinh_eta, j.mass, j.w, j.q, ctx.relax["trijet_pt"],
                     log_inputs=j.log_inputs)


def _met_reads(args):
    met = args.get("met", {"pt": "met_pt", "phi": "met_phi"})
    return [("event", met["pt"]), ("event", met["phi"])]


@observable("transverse_mass", reads=_met_reads)
def transverse_mass(ctx: ObservableContext, of: str, index: int = 0, select: str = "all",
                    met: Mapping | None = None):
    """m_T of the ``index``-th selected object and the missing transverse momentum (event fields
    ``met.pt``, ``met.phi``; default ``met_pt``, ``met_phi``): sqrt(2 (pT MET - px METx - py METy))."""
    met = dict(met or {"pt": "met_pt", "phi": "met_phi"})
    objs = ctx.objects[of]
    w = objs.weights(select)
    pt, px, py = (nth(v, w, int(index)) for v in (objs.pt, objs.pt * objs.cos_phi, objs.pt * objs.sin_phi))
    m_pt, m_phi = ctx.event[met["pt"]], ctx.event[met["phi"]]
    return safe_sqrt(2.0 * (pt * m_pt - px * m_pt * jnp.cos(m_phi) - py * m_pt * jnp.sin(m_phi)))


def _eta_phi(ctx: ObservableContext, part: Mapping):
    objs = ctx.objects[part["of"]]
    w = objs.weights(part.get("select", "all"))
    i = int(part.get("index", 0))
    s, c = nth(objs.sin_phi, w, i), nth(objs.cos_phi, w, i)
    missing = (s == 0) & (c == 0)  # no such object: atan2(0, 0) has no derivative
    return nth(objs.eta, w, i), jnp.where(missing, 0.0, jnp.arctan2(jnp.where(missing, 1.0, s), c))


@observable("delta_r")
def delta_r(ctx: ObservableContext, a: Mapping, b: Mapping):
    """Delta R between two objects, each ``{of, index, select}``."""
    eta_a, phi_a = _eta_phi(ctx, a)
    eta_b, phi_b = _eta_phi(ctx, b)
    dphi = phi_a - phi_b
    dphi = jnp.arctan2(jnp.sin(dphi), jnp.cos(dphi))
    deta = eta_a - eta_b
    return safe_sqrt(deta * deta + dphi * dphi)


@observable("nn", depends=lambda args: list(args["features"].values()))
def network(ctx: ObservableContext, features: Mapping[str, str]):
    """The trained network of :mod:`.nn` (weights: the ``nn`` parameters) on the observables named by
    ``features`` (one per :data:`~.nn.FEATURES` entry: ``{ht: ht, n_jets: n_jets, ...}``)."""
    missing = [f for f in nn.FEATURES if f not in features]
    if missing:
        raise ValueError(f"nn features {missing} are not mapped to observables")
    weights = ctx.params["nn"]
    x = jnp.stack([ctx.values[features[f]] for f in nn.FEATURES], axis=-1)
    return nn.mlp({k: jnp.asarray(weights[k], x.dtype) for k in nn.WEIGHT_NAMES}, x, jnp)


def compute(names, definitions: Mapping[str, tuple[str, Mapping]], ctx: ObservableContext) -> dict:
    """The observables ``names`` (and what they depend on), in dependency order: {name: [events]}."""
    values: dict = dict(ctx.values)

    def visit(name, stack=()):
        if name in values:
            return
        if name in stack:
            raise ConfigError(f"observables depend on each other in a circle: {' -> '.join(stack + (name,))}")
        kind, args = definitions[name]
        entry = OBSERVABLES[kind]
        for dep in (entry.depends(args) if entry.depends else []):
            visit(dep, stack + (name,))
        values[name] = entry.fn(dataclasses.replace(ctx, values=values), **args)

    for name in names:
        visit(name)
    return values


__all__ = ["OBSERVABLES", "Observable", "Objects", "ObservableContext", "observable", "compute"]
