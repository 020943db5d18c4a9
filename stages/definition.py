"""Any analysis from its config: object sets, event selections, regions, observables, systematics.

A config in the general form (``objects``, ``observables``, ``collections``; see
``configs/single_top_tchan.yaml`` and ``docs/write-your-own-analysis.md``) becomes one hashable
:class:`Definition`, which the densifier (:mod:`.dense`) and the soft analysis (:mod:`.engine`)
compile against, as :class:`~.analysis.SoftConfig` is for the AGC-specific form:

* **object sets** (``objects``): objects of one or more NanoAOD collections (``from``, concatenated per
  event in that order) that pass fixed cuts (applied when reading, never relaxed), then tunable soft
  cuts (``cuts``: a field above or below a named parameter) and optionally a soft ``tag``;
* **count requirements** (``selection`` for every region, ``require`` per region): the number of
  selected (``jet``) or selected-and-tagged (``jet.tag``) objects, ``equals``, ``at_least``,
  ``at_most``, ``range`` or ``veto``; soft mode takes their exact probability (Poisson-binomial);
* **observables** by registered kind (:mod:`.observables.library`), binned per region;
* **systematics** by registered kind (:mod:`.systematics`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from jacana.stages.errors import ConfigError
from jacana.stages.observables.library import OBSERVABLES
from jacana.stages.systematics import SYSTEMATICS

NOMINAL = "nominal"
#: Fixed-cut operators: ``field op value``.
FIXED_OPS = {"above": np.greater, "below": np.less, "at_least": np.greater_equal, "at_most": np.less_equal,
             "equals": np.equal, "not_equal": np.not_equal}


def freeze(value):
    """A hashable copy of nested config values (dicts -> sorted item tuples, lists -> tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value):
    """The nested dicts and lists of a :func:`freeze`-d value."""
    if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value) \
            and value:
        return {k: thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class FixedCut:
    field: str
    op: str
    value: float
    abs: bool = False

    def mask(self, values: np.ndarray) -> np.ndarray:
        return FIXED_OPS[self.op](np.abs(values) if self.abs else values, self.value)


@dataclasses.dataclass(frozen=True)
class SoftCut:
    """``field > parameter`` (``above``) or ``field < parameter``, on ``|field|`` if ``abs``."""

    field: str
    param: str
    above: bool
    abs: bool = False


@dataclasses.dataclass(frozen=True)
class ObjectSet:
    name: str
    sources: tuple[tuple[str, tuple[FixedCut, ...]], ...]  # (collection, fixed cuts)
    cuts: tuple[SoftCut, ...]
    tag: SoftCut | None
    fields: tuple[str, ...]  # the fields densified (kinematic ones included where present)


@dataclasses.dataclass(frozen=True)
class CountRequirement:
    """``lo <= count <= hi`` (``hi`` None: no upper limit) of the selected (or tagged) objects of ``target``."""

    target: str
    tagged: bool
    lo: int
    hi: int | None

    @property
    def cap(self) -> int:
        """The count cap of a distribution that decides it ("cap or more" absorbing)."""
        return self.lo if self.hi is None else self.hi + 1

    def passes(self, n: int, capped_at: int) -> bool:
        """Whether count state ``n`` (``capped_at``: the absorbing ">= cap" state) satisfies it."""
        if n == capped_at:  # the state means "capped_at or more"
            return self.hi is None and n >= self.lo
        return self.lo <= n and (self.hi is None or n <= self.hi)


@dataclasses.dataclass(frozen=True)
class ObservableCut:
    """``observable > threshold`` (``above``) or ``<``: a parameter (soft, tunable) or a fixed number."""

    observable: str
    param: str | None
    value: float | None
    above: bool


@dataclasses.dataclass(frozen=True)
class RegionSpec:
    name: str
    require: tuple[CountRequirement, ...]  # the selection's and the region's own
    observable: str
    edges: tuple[float, ...]
    cuts: tuple[ObservableCut, ...] = ()  # event-level cuts on observables (the selection's and its own)


@dataclasses.dataclass(frozen=True)
class Definition:
    """The static (hashable) form of a general analysis config: what jit specialises on."""

    objects: tuple[ObjectSet, ...]
    regions: tuple[RegionSpec, ...]
    observables: tuple[tuple[str, str, Any], ...]  # (name, kind, frozen options)
    parameters: tuple[str, ...]
    kinematic: tuple[str, ...]  # nominal first, then each kinematic variation
    kinematic_target: tuple[tuple[str, str], ...]  # (variation, object set it varies)
    weight_systematics: tuple[tuple[str, str, Any], ...]  # (key, kind, frozen options)
    weight_variations: tuple[str, ...]
    bucket: str  # the object set whose multiplicity groups the events
    event_fields: tuple[str, ...]
    kernel: str = "normal"
    flow: bool = False

    # -- what the stages ask of a config (as of SoftConfig) ---------------------------------
    @property
    def relax_names(self) -> tuple[str, ...]:
        return self.parameters + ("trijet_pt", "bandwidth")

    @property
    def uses_nn(self) -> bool:
        return any(kind == "nn" for _, kind, _ in self.observables)

    def region(self, name: str) -> RegionSpec:
        return next(r for r in self.regions if r.name == name)

    def variations(self, nominal_file: bool, kinematic: Sequence[str] | None = None) -> tuple[str, ...]:
        kin = tuple(kinematic) if kinematic is not None else (self.kinematic if nominal_file else (NOMINAL,))
        return kin + (self.weight_variations if nominal_file else ())

    def set_variations(self, name: str, kinematic: Sequence[str]) -> tuple[str, ...]:
        """The pT variations an object set carries in a batch of ``kinematic`` variations (nominal first)."""
        target = dict(self.kinematic_target)
        return (NOMINAL,) + tuple(v for v in kinematic if v != NOMINAL and target.get(v) == name)

    @property
    def combinatorial(self) -> bool:
        return any(OBSERVABLES[kind].combinatorial for _, kind, _ in self.observables)


def _fixed_cut(where: str, raw: Mapping) -> FixedCut:
    ops = [k for k in raw if k in FIXED_OPS]
    if len(ops) != 1:
        raise ConfigError(f"{where}: a fixed cut needs exactly one of {sorted(FIXED_OPS)}, got {dict(raw)}")
    return FixedCut(raw["field"], ops[0], float(raw[ops[0]]), bool(raw.get("abs", False)))


def _soft_cut(where: str, raw: Mapping, parameters: Mapping) -> SoftCut:
    above = "above" in raw
    param = raw["above"] if above else raw["below"]
    if param not in parameters:
        raise ConfigError(f"{where}: {param!r} is not a parameter; parameters: {sorted(parameters)}")
    return SoftCut(raw["field"], param, above, bool(raw.get("abs", False)))


def _observable_cut(where: str, raw: Mapping, parameters: Mapping, observables: set) -> ObservableCut:
    if raw["observable"] not in observables:
        raise ConfigError(f"{where}: {raw['observable']!r} is not an observable; observables: {sorted(observables)}")
    above = "above" in raw
    t = raw["above"] if above else raw["below"]
    if isinstance(t, str):
        if t not in parameters:
            raise ConfigError(f"{where}: {t!r} is not a parameter; parameters: {sorted(parameters)}")
        return ObservableCut(raw["observable"], t, None, above)
    return ObservableCut(raw["observable"], None, float(t), above)


def _requirements(where: str, items, objects: Mapping, parameters: Mapping, observables: set):
    counts, cuts = [], []
    for i, r in enumerate(items):
        if "observable" in r:
            cuts.append(_observable_cut(f"{where}[{i}]", r, parameters, observables))
        else:
            counts.append(_count(f"{where}[{i}]", r, objects))
    return tuple(counts), tuple(cuts)


def _count(where: str, raw: Mapping, objects: Mapping) -> CountRequirement:
    target, _, sub = raw["count"].partition(".")
    if target not in objects:
        raise ConfigError(f"{where}: count of {raw['count']!r}: no object set {target!r}; sets: {sorted(objects)}")
    if sub not in ("", "tag"):
        raise ConfigError(f"{where}: count {raw['count']!r}: write '<set>' or '<set>.tag'")
    if sub == "tag" and "tag" not in objects[target]:
        raise ConfigError(f"{where}: {raw['count']!r} counts tagged objects but object set {target!r} has no tag")
    if "equals" in raw:
        lo, hi = int(raw["equals"]), int(raw["equals"])
    elif "veto" in raw:
        lo, hi = 0, 0
    elif "range" in raw:
        lo, hi = (int(x) for x in raw["range"])
    else:
        lo = int(raw.get("at_least", 0))
        hi = int(raw["at_most"]) if "at_most" in raw else None
    if hi is not None and hi < lo:
        raise ConfigError(f"{where}: count {raw['count']!r} asks for {lo} to {hi} objects (empty)")
    return CountRequirement(target, sub == "tag", lo, hi)


def build_definition(raw: Mapping, kernel: str = "normal", flow: bool = False) -> Definition:
    """The :class:`Definition` of a validated general config (the spec validates the schema first)."""
    params = raw["parameters"]
    collections = raw["collections"]
    objects_raw = raw["objects"]
    observables = []
    reads: dict[str, set] = {name: set() for name in objects_raw}
    event_reads: set = set()
    for name, o in raw["observables"].items():
        opts = {k: v for k, v in o.items() if k not in ("kind", "read", "label")}
        for target, fields in (o.get("read") or {}).items():  # extra fields a user's observable reads
            reads.setdefault(target, set()).update(fields)
        entry = OBSERVABLES[o["kind"]]
        entry.check_args(name, opts)
        for dep in (entry.depends(opts) if entry.depends else []):
            if dep not in raw["observables"]:
                raise ConfigError(f"observables.{name}: depends on {dep!r}, which is not an observable")
        for target, field in (entry.reads(opts) if entry.reads else []):
            if target == "event":
                event_reads.add(field)
            elif target in reads:
                reads[target].add(field)
        for key in ("of",):
            if key in opts and opts[key] not in objects_raw:
                raise ConfigError(f"observables.{name}: 'of' {opts[key]!r} is not an object set; sets: {sorted(objects_raw)}")
        observables.append((name, OBSERVABLES.canonical(o["kind"]), freeze(opts)))

    sets = []
    for name, o in objects_raw.items():
        sources = []
        for coll, fixed in o["from"].items():
            if coll not in collections:
                raise ConfigError(f"objects.{name}.from: no collection {coll!r}; collections: {sorted(collections)}")
            cuts = tuple(_fixed_cut(f"objects.{name}.from.{coll}", c) for c in fixed)
            for c in cuts:
                if c.field not in collections[coll]["fields"]:
                    raise ConfigError(f"objects.{name}.from.{coll}: field {c.field!r} is not among collection {coll!r}'s"
                                      f" fields {sorted(collections[coll]['fields'])}")
            sources.append((coll, cuts))
        soft = tuple(_soft_cut(f"objects.{name}.cuts", c, params) for c in o.get("cuts", []))
        tag = _soft_cut(f"objects.{name}.tag", o["tag"], params) if "tag" in o else None
        have = set.intersection(*(set(collections[c]["fields"]) for c, _ in sources))
        wanted = {c.field for c in soft} | ({tag.field} if tag else set()) | reads.get(name, set())
        missing = sorted(wanted - have)
        if missing:
            raise ConfigError(f"objects.{name}: field(s) {missing} are not in every source collection"
                              f" ({', '.join(c for c, _ in sources)}); fields they all have: {sorted(have)}")
        kin = [f for f in ("pt", "eta", "phi", "mass") if f in have]
        if "pt" not in have:
            raise ConfigError(f"objects.{name}: its collections need a 'pt' field")
        fields = tuple(dict.fromkeys(kin + sorted(wanted - set(kin))))
        sets.append(ObjectSet(name, tuple(sources), soft, tag, fields))

    set_names = {s.name for s in sets}
    obs_names = {n for n, _, _ in observables}
    common, common_cuts = _requirements("selection", raw.get("selection", []), objects_raw, params, obs_names)
    regions = []
    for name, r in raw["regions"].items():
        if r["observable"] not in obs_names:
            raise ConfigError(f"regions.{name}.observable {r['observable']!r} is not an observable; observables: {sorted(obs_names)}")
        own, own_cuts = _requirements(f"regions.{name}.require", r.get("require", []), objects_raw, params, obs_names)
        e = r["edges"]
        edges = (np.linspace(e["low"], e["high"], e["bins"] + 1) if isinstance(e, dict) else np.asarray(e, np.float64))
        regions.append(RegionSpec(name, common + own, r["observable"], tuple(float(x) for x in edges),
                                  common_cuts + own_cuts))

    kinematic, target, weight_systs, weight_vars = [NOMINAL], [], [], []
    for key, s in raw["systematics"].items():
        kind = SYSTEMATICS[s["kind"]]
        opts = {k: v for k, v in s.items() if k not in ("kind", "name")}
        if kind.category == "kinematic":
            t = kind.target(opts)
            if t not in set_names:
                raise ConfigError(f"systematics.{key}: object set {t!r} does not exist; sets: {sorted(set_names)}")
            for v in kind.kinematic_variations(opts):
                kinematic.append(v)
                target.append((v, t))
        elif kind.category == "weight":
            t = kind.target(opts)
            if t != "event" and t not in set_names:
                raise ConfigError(f"systematics.{key}: object set {t!r} does not exist; sets: {sorted(set_names)}")
            weight_systs.append((key, SYSTEMATICS.canonical(s["kind"]), freeze(opts)))
            weight_vars += kind.weight_variations(opts)
            if SYSTEMATICS.canonical(s["kind"]) == "event_weight":
                event_reads.update([opts["up"]] + ([opts["down"]] if "down" in opts else []))

    bucket = next((thaw(o).get("of", "jet") for _, kind, o in observables if OBSERVABLES[kind].combinatorial), None)
    if bucket is None:
        bucket = next((s.name for s in sets if s.tag is not None), sets[0].name)
    event_fields = raw.get("event_fields", {})
    missing_ev = sorted(event_reads - set(event_fields))
    if missing_ev:
        raise ConfigError(f"event field(s) {missing_ev} are used but not declared under event_fields"
                          f" (declared: {sorted(event_fields)})")
    return Definition(objects=tuple(sets), regions=tuple(regions), observables=tuple(observables),
                      parameters=tuple(params), kinematic=tuple(kinematic), kinematic_target=tuple(target),
                      weight_systematics=tuple(weight_systs), weight_variations=tuple(weight_vars),
                      bucket=bucket, event_fields=tuple(sorted(event_reads)), kernel=kernel, flow=flow)


def logical_branches(raw: Mapping) -> dict[str, str]:
    """Logical column name -> file branch: ``<collection>_<field>`` for object fields, the event fields as named."""
    out = {}
    for coll, c in raw["collections"].items():
        for field, branch in c["fields"].items():
            out[f"{coll}_{field}"] = f"{c['prefix']}_{branch}"
    out.update(raw.get("event_fields", {}))
    return out
