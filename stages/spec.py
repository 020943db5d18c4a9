"""The analysis definition: what every stage computes, loaded from a validated config file.

One :class:`AnalysisSpec` drives both the hard (conventional) and the soft
(differentiable) analysis. It is loaded from YAML, validated against
``schemas/analysis.schema.json`` and then against the physics rules a schema
cannot express (values inside bounds, increasing bin edges, samples that exist).

>>> from jacana.stages.spec import load_spec
>>> spec = load_spec(overrides=["jet_pt_min=25", "branches.jet_btag=Jet_btagDeepFlavB"])
>>> spec.param_values()["jet_pt_min"], spec.branches["jet_btag"]
(25.0, 'Jet_btagDeepFlavB')
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import jsonschema
import numpy as np
import yaml

from jacana.stages.errors import MAX_SHOWN, ConfigError, shorten
from jacana.stages.registry import import_plugins
from jacana.stages.systematics import SYSTEMATICS

DEFAULT_CONFIG = "agc_ttbar"
NOMINAL = "nominal"


@dataclasses.dataclass(frozen=True)
class Parameter:
    """A tunable, bounded, physical analysis parameter (e.g. ``jet_pt_min`` in GeV)."""

    name: str
    value: float
    lower: float
    upper: float
    unit: str = ""
    temperature: float = 0.0
    learning_rate: float = 1.0
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Region:
    """An analysis region: a b-tag multiplicity requirement and the observable it histograms."""

    name: str
    observable: str  # "ht" or "m_bjj"
    btag: str  # "exactly_1" or "at_least_2"
    edges: np.ndarray


@dataclasses.dataclass(frozen=True)
class Systematic:
    """One systematic uncertainty as the config defines it (``kind`` selects the options used)."""

    key: str
    kind: str
    name: str
    options: Mapping[str, Any]


# -- YAML with limits --------------------------------------------------------------------
#: A config is a few KB; a trained network's weights in it a few hundred KB.
MAX_YAML_BYTES = 4 * 2**20
#: Values after every alias is expanded: an alias bomb ("billion laughs") is a few lines that
#: expand to billions, which the schema check and error messages would then walk (1.8 GB, > 60 s).
MAX_YAML_NODES = 200_000


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader; :func:`load_yaml` checks the composed document before constructing it."""


def _check_yaml_nodes(root: yaml.Node, source: str) -> None:
    """Refuse duplicate mapping keys (naming key and lines) and documents that expand past
    :data:`MAX_YAML_NODES` values; aliases are followed once per node, so this costs the
    document's size, not its expansion."""
    size: dict[int, int] = {}
    open_nodes: set[int] = set()  # begun, not finished: meeting one again is a cycle ("&a [*a]")
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: sizes of children before their parent
        node, done = stack.pop()
        if id(node) in size:
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if not done:
            if id(node) in open_nodes:
                raise ConfigError(f"{source}: the value at line {node.start_mark.line + 1} contains itself"
                                  " (a recursive YAML alias)")
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)
            continue
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *base" then a key of its own overrides the base: not a duplicate
                if key.value in seen:
                    raise ConfigError(f"{source}: duplicate key {key.value!r} at line {key.start_mark.line + 1}"
                                      f" (first at line {seen[key.value]}); YAML would keep only the last")
                seen[key.value] = key.start_mark.line + 1
        size[id(node)] = 1 + sum(size.get(id(c), 0) for c in children)
        if size[id(node)] > MAX_YAML_NODES:
            raise ConfigError(f"{source}: the value at line {node.start_mark.line + 1} expands to more than"
                              f" {MAX_YAML_NODES:,} values (YAML aliases repeat what they point to); write it out")


def load_yaml(text: str | bytes, source: str) -> Any:
    """YAML ``text`` as Python objects, safely and within limits (size, alias expansion, nesting);
    duplicate keys are refused. ``source`` names the text in every error."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source} has {len(text):,} characters; a config has at most {MAX_YAML_BYTES:,}")
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_nodes(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {shorten(str(exc))}") from None
    except RecursionError:
        raise ConfigError(f"{source} is nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path, what: str = "analysis config") -> Any:
    """A YAML file through :func:`load_yaml`: missing, not a regular file, too large or not UTF-8 is a
    :class:`ConfigError` naming it (its size is checked before it is read)."""
    path = Path(path)
    name = f"{what} {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{name} does not exist" + (" as a regular file" if path.exists() else ""))
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{name} has {size:,} bytes; a config has at most {MAX_YAML_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return load_yaml(text, name)


def config_schema(general: bool = False) -> dict:
    name = "general" if general else "analysis"
    text = resources.files("jacana.stages").joinpath(f"schemas/{name}.schema.json").read_text()
    return json.loads(text)


def _default_config_path(name: str = DEFAULT_CONFIG) -> Path:
    return Path(str(resources.files("jacana.stages").joinpath(f"configs/{name}.yaml")))


def _format_schema_error(err: jsonschema.ValidationError, raw: Mapping) -> str:
    where = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    if err.validator == "additionalProperties":
        # Name the unknown key and the closest allowed one: the commonest typo.
        parent = raw
        for p in err.absolute_path:
            parent = parent[p]
        allowed = set(err.schema.get("properties", {})) | set()
        unknown = [k for k in parent if k not in allowed and not any(
            re.match(pat, k) for pat in err.schema.get("patternProperties", {}))]
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(allowed), n=1)
            hints.append(f"unknown key {k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if hints:
            return f"config {where}: " + "; ".join(hints)
    return f"config {shorten(where, 120)}: {shorten(err.message)}"


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like name=value (e.g. jet_pt_min=25)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no name before '='")
    parsed = load_yaml(value, f"override {shorten(text, 80)!r}") if value.strip() else ""
    return key, parsed


def apply_overrides(raw: dict, overrides: Iterable[str] | Mapping[str, Any] | None) -> dict:
    """Return a copy of ``raw`` with ``name=value`` overrides applied.

    A bare parameter name sets that parameter's value; a dotted path sets any config
    entry (``branches.jet_btag=Jet_btagDeepFlavB``, ``parameters.btag_min.temperature=0.01``).
    """
    out = copy.deepcopy(raw)
    if overrides is None:
        return out
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
    for key, value in items:
        if "." not in key and key in out.get("parameters", {}):
            path = ["parameters", key, "value"]
        else:
            path = key.split(".")
        node = out
        for depth, part in enumerate(path[:-1]):
            if path[0] == "hygiene" and isinstance(node, dict):  # optional block: --set hygiene.pruning.norm=0
                node.setdefault(part, {})
            if not isinstance(node, dict) or part not in node:
                known = sorted(node) if isinstance(node, dict) else []
                if depth == 0:
                    known = sorted(set(known) | set(out.get("parameters", {})))
                close = difflib.get_close_matches(part, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"override {key!r}: no config entry {'.'.join(path[:depth + 1])!r}{hint}")
            node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(path[:-1])!r} is not a mapping")
        if path[-1] not in node and len(path) == 1:
            known = sorted(set(node) | set(out.get("parameters", {})))
            close = difflib.get_close_matches(path[-1], known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"override {key!r}: unknown parameter or config key{hint}")
        node[path[-1]] = value
    return out


#: Axis labels of the AGC-specific config's observables (a general config gives its own ``label``).
OBSERVABLE_LABELS = {"ht": r"$H_T$ [GeV]", "m_bjj": r"$m_{bjj}$ [GeV]", "nn": "NN output"}

#: NaN/inf values masked per branch and chunk at most (a fraction of its values); more is an error.
DEFAULT_MAX_NONFINITE_FRACTION = 0.01


# -- template hygiene (the optional hygiene: block; applied by jacana.stages.stats.workspace) ----
#: Defaults of the config's ``hygiene:`` block (the schemas repeat them as ``default``). Pruning
#: thresholds: a normsys is dropped when ``max(|hi - 1|, |lo - 1|)`` is below ``norm``, a histosys
#: when its largest relative deviation from the nominal in any bin (the normalisation already
#: taken out by the NormPlusShape split) is below ``shape``; 0 keeps everything.
DEFAULT_PRUNING = {"norm": 0.001, "shape": 0.001}
#: ``auto``: one-sided variations are mirrored (``one_sided``), two-sided ones kept (``none``).
SYMMETRIZE_MODES = ("auto", "one_sided", "two_sided", "none")
#: Smoothing of a variation's ratio to the nominal (``none``: off, the default).
SMOOTHING_METHODS = ("none", "353H", "median3")


def hygiene_settings(block: Mapping | None, spec: "AnalysisSpec") -> dict:
    """The ``hygiene:`` block with defaults: ``{"pruning": {"norm", "shape"}, "symmetrize": {name: mode},
    "smoothing": {name: method}}``; ``name`` is a systematic's key or one of its modifiers' names
    (``btag_0``). Unknown names, modes or methods, and a mode that needs a down template missing
    from a one-sided systematic, are a :class:`ConfigError`."""
    block = dict(block or {})
    pruning = {**DEFAULT_PRUNING, **dict(block.get("pruning") or {})}
    for k, v in pruning.items():
        if k not in DEFAULT_PRUNING or not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
            raise ConfigError(f"hygiene.pruning.{k}: expected one of {sorted(DEFAULT_PRUNING)} with a number >= 0,"
                              f" got {v!r}")
    modifiers = {name: (s.key, down) for s in spec.systematics for sample in spec.samples
                 for name, _, down in SYSTEMATICS[s.kind].modifiers(s.key, s.options, sample)}
    keys = {s.key for s in spec.systematics if s.kind != "normalization"}
    out = {"pruning": {k: float(v) for k, v in pruning.items()}}
    for field, allowed in (("symmetrize", SYMMETRIZE_MODES), ("smoothing", SMOOTHING_METHODS)):
        chosen = dict(block.get(field) or {})
        for name, value in chosen.items():
            if name not in keys and name not in modifiers:
                raise ConfigError(f"hygiene.{field}.{name}: not a shape systematic or modifier; choose from "
                                  f"{sorted(keys | set(modifiers))}")
            if value not in allowed:
                raise ConfigError(f"hygiene.{field}.{name}: {value!r} is not one of {list(allowed)}")
            one_sided = [m for m, (key, down) in modifiers.items() if (m == name or key == name) and down is None]
            if field == "symmetrize" and value in ("two_sided", "none") and one_sided:
                raise ConfigError(f"hygiene.symmetrize.{name}: {value!r} needs a down variation, and {one_sided[0]}"
                                  f" has none (one-sided variations can only be mirrored: one_sided or auto)")
        out[field] = chosen
    return out


class AnalysisSpec:
    """A validated analysis definition. Immutable: overrides return a new spec."""

    def __init__(self, raw: Mapping[str, Any], source: str = "<dict>"):
        self.raw = copy.deepcopy(dict(raw))
        self.source = source
        self._validate()

    # -- construction -------------------------------------------------------------
    def _validate(self) -> None:
        validator = jsonschema.Draft202012Validator(config_schema(self.is_general))
        errors = sorted(validator.iter_errors(self.raw), key=lambda e: list(e.absolute_path))
        if errors:
            lines = [shorten(_format_schema_error(e, self.raw), 2 * MAX_SHOWN) for e in errors[:10]]
            raise ConfigError(f"invalid analysis config ({self.source}):\n  " + "\n  ".join(lines))
        for name, p in self.raw["parameters"].items():
            lo, hi = p["bounds"]
            if not lo < hi:
                raise ConfigError(f"parameter {name!r}: bounds {p['bounds']} must be [lower, upper] with lower < upper")
            if not lo <= p["value"] <= hi:
                raise ConfigError(
                    f"parameter {name!r} = {p['value']} is outside its bounds [{lo}, {hi}]"
                    f" (change the value, or the bounds with --set parameters.{name}.bounds=[lo,hi])")
        for name, region in self.regions.items():
            if len(region.edges) < 2 or np.any(np.diff(region.edges) <= 0):
                raise ConfigError(f"region {name!r}: bin edges must be strictly increasing, got {region.edges.tolist()}")
        samples = set(self.raw["samples"])
        if self.raw["poi"]["sample"] not in samples:
            raise ConfigError(f"poi.sample {self.raw['poi']['sample']!r} is not one of the samples {sorted(samples)}")
        for key, syst in self.raw["systematics"].items():
            names = [syst["sample"]] if "sample" in syst else syst.get("samples", [])
            for s in ([] if names == "all" else names):
                if s not in samples:
                    raise ConfigError(f"systematics.{key}: sample {s!r} is not one of {sorted(samples)}")
        for s in self.raw.get("pseudo_data", {}):
            if s not in samples:
                raise ConfigError(f"pseudo_data: sample {s!r} is not one of {sorted(samples)}")
        for key, syst in self.raw["systematics"].items():
            kind = SYSTEMATICS[syst["kind"]]  # a ConfigError naming the closest kind if unknown
            missing = [o for o in kind.required if o not in syst]
            if missing:
                raise ConfigError(f"systematics.{key} ({syst['kind']}): missing option(s) {missing}")
        if self.is_general:
            self._validate_general()
        self.hygiene  # noqa: B018 -- unknown systematics or modes in hygiene: an error at load, not at the fit
        if self.uses_nn():
            self.nn_weights()

    def _validate_general(self) -> None:
        from jacana.stages.definition import build_definition

        source = Path(self.source.split(" + ")[0])
        import_plugins(self.raw.get("plugins", []), base=source.parent if source.is_file() else None)
        if self.use_genweight_sign and "gen_weight" not in self.raw.get("event_fields", {}):
            raise ConfigError(f"{self.source}: use_genweight_sign needs event_fields.gen_weight (e.g. genWeight),"
                              " or set use_genweight_sign: false")
        self.definition = build_definition(self.raw)

    @property
    def is_general(self) -> bool:
        """The general config form (object sets, observables by kind) rather than the AGC-specific one."""
        return "objects" in self.raw

    def with_overrides(self, overrides: Iterable[str] | Mapping[str, Any] | None) -> "AnalysisSpec":
        """A new spec with ``name=value`` overrides (see :func:`apply_overrides`)."""
        return AnalysisSpec(apply_overrides(self.raw, overrides), source=f"{self.source} + overrides")

    def with_params(self, values: Mapping[str, Any]) -> "AnalysisSpec":
        """A new spec whose tunable parameters take ``values`` (unknown names are an error).

        Besides the named cuts, ``edges_<region>`` (a list of bin edges) sets a region's binning
        and ``nn`` (a dict of weight arrays) the trained neural-network observable.
        """
        known = set(self.parameters) | {f"edges_{r}" for r in self.raw["regions"]} | {"nn"}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown parameters {sorted(unknown)}; known: {sorted(known)}")
        raw = copy.deepcopy(self.raw)
        for k, v in values.items():
            if k in self.parameters:
                raw["parameters"][k]["value"] = float(v)
            elif k == "nn":
                from jacana.stages.observables.nn import weights_to_json

                raw.setdefault("nn", {})["weights"] = weights_to_json(v)
            else:
                raw["regions"][k[len("edges_"):]]["edges"] = [float(e) for e in np.asarray(v, dtype=np.float64)]
        return AnalysisSpec(raw, source=f"{self.source} + parameters")

    def nn_weights(self) -> dict[str, np.ndarray]:
        """The weights of the neural-network observable (``nn`` section; seeded init if untrained)."""
        from jacana.stages.observables.nn import weights_from_config

        try:
            return weights_from_config(self.raw.get("nn"))
        except ValueError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None

    def uses_nn(self) -> bool:
        if self.is_general:
            return any(o["kind"] == "nn" for o in self.raw["observables"].values())
        return any(r["observable"] == "nn" for r in self.raw["regions"].values())

    # -- views ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def tree(self) -> str:
        return self.raw["tree"]

    @property
    def luminosity_pb(self) -> float:
        return float(self.raw["luminosity_pb"])

    @property
    def use_genweight_sign(self) -> bool:
        return bool(self.raw.get("use_genweight_sign", True))

    def observable_label(self, observable: str) -> str:
        """An observable's axis label: the config's ``label`` (general form), else a known one, else its name."""
        own = (self.raw.get("observables", {}).get(observable) or {}).get("label") if self.is_general else None
        return own or OBSERVABLE_LABELS.get(observable, observable)

    def observable_axes(self) -> dict[str, tuple[str, str]]:
        """Each region's observable as ``{region: (name, axis label)}`` (histogram axes, plots).

        >>> load_spec().observable_axes()["4j2b"]
        ('m_bjj', '$m_{bjj}$ [GeV]')
        """
        return {r: (region.observable, self.observable_label(region.observable)) for r, region in self.regions.items()}

    @property
    def max_nonfinite_fraction(self) -> float:
        """The largest fraction of a branch's values in a chunk that may be NaN/inf and be masked;
        more is an error (a broken file should not silently change the yields). Default 1 %."""
        return float(self.raw.get("non_finite", {}).get("max_fraction", DEFAULT_MAX_NONFINITE_FRACTION))

    def masking_nonfinite(self) -> "AnalysisSpec":
        """This analysis with every NaN/inf input value masked, however many (``--mask-non-finite``)."""
        raw = copy.deepcopy(self.raw)
        raw["non_finite"] = {"max_fraction": 1.0}
        return AnalysisSpec(raw, source=f"{self.source} + non_finite.max_fraction=1")

    @property
    def branches(self) -> dict[str, str]:
        """Logical column -> file branch (general form: ``<collection>_<field>`` and the event fields)."""
        if self.is_general:
            from jacana.stages.definition import logical_branches

            return logical_branches(self.raw)
        return dict(self.raw["branches"])

    def event_columns(self) -> tuple[str, ...]:
        """The logical columns that hold one number per event (the others are per object)."""
        return tuple(self.raw.get("event_fields", {})) if self.is_general else ("gen_weight",)

    def collections(self) -> tuple[str, ...]:
        """The object collections (logical prefixes of the per-object columns)."""
        return tuple(self.raw["collections"]) if self.is_general else ("electron", "muon", "jet")

    @property
    def cuts(self) -> dict[str, float]:
        return dict(self.raw.get("cuts", {}))

    @cached_property
    def parameters(self) -> dict[str, Parameter]:
        return {
            name: Parameter(name=name, value=float(p["value"]), lower=float(p["bounds"][0]),
                            upper=float(p["bounds"][1]), unit=p.get("unit", ""),
                            temperature=float(p.get("temperature", 0.0)),
                            learning_rate=float(p.get("learning_rate", 1.0)),
                            description=p.get("description", ""))
            for name, p in self.raw["parameters"].items()
        }

    def param_values(self) -> dict[str, float]:
        return {name: p.value for name, p in self.parameters.items()}

    @cached_property
    def regions(self) -> dict[str, Region]:
        out = {}
        for name, r in self.raw["regions"].items():
            e = r["edges"]
            edges = (np.linspace(e["low"], e["high"], e["bins"] + 1) if isinstance(e, dict)
                     else np.asarray(e, dtype=np.float64))
            out[name] = Region(name=name, observable=r["observable"], btag=r.get("btag", ""), edges=edges)
        return out

    @property
    def samples(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self.raw["samples"].items()}

    @property
    def poi(self) -> dict:
        return dict(self.raw["poi"])

    @cached_property
    def systematics(self) -> list[Systematic]:
        return [Systematic(key=k, kind=v["kind"], name=v["name"],
                           options={kk: vv for kk, vv in v.items() if kk not in ("kind", "name")})
                for k, v in self.raw["systematics"].items()]

    def systematics_of(self, kind: str) -> list[Systematic]:
        return [s for s in self.systematics if s.kind == kind]

    @cached_property
    def hygiene(self) -> dict:
        """The ``hygiene:`` block (template pruning, symmetrisation, smoothing) with its defaults, checked."""
        return hygiene_settings(self.raw.get("hygiene"), self)

    # -- variations -----------------------------------------------------------------
    def kinematic_variations(self) -> list[str]:
        """Object-pT variations evaluated on nominal files: ``nominal`` first, then JES/JER names."""
        return [NOMINAL] + [v for s in self.systematics for v in SYSTEMATICS[s.kind].kinematic_variations(s.options)]

    def weight_variations(self) -> list[str]:
        """Event-weight variations evaluated on nominal files with nominal objects (b-tag NPs, ...)."""
        return [v for s in self.systematics for v in SYSTEMATICS[s.kind].weight_variations(s.options)]

    def alternative_variations(self, sample: str) -> list[str]:
        """File-level variations of ``sample`` (alternative generator, shower, scale samples)."""
        out: list[str] = [v for s in self.systematics for v in SYSTEMATICS[s.kind].file_variations(s.options, sample)]
        for s, variations in self.raw.get("pseudo_data", {}).items():
            if s == sample:
                out += list(variations)
        return list(dict.fromkeys(out))

    def histogram_variations(self, sample: str) -> list[str]:
        """Every histogram variation key produced for ``sample``."""
        return self.kinematic_variations() + self.weight_variations() + self.alternative_variations(sample)

    def file_variations(self, sample: str) -> list[str]:
        """The fileset variations of ``sample`` the analysis reads (``nominal`` first)."""
        return [NOMINAL] + self.alternative_variations(sample)

    def normalization_samples(self, syst: Systematic) -> list[str]:
        s = syst.options["samples"]
        return list(self.samples) if s == "all" else list(s)

    def needed_branches(self) -> list[str]:
        """The file branches the analysis reads (nothing else is read)."""
        return list(dict.fromkeys(self.branches.values()))

    def to_dict(self) -> dict:
        return copy.deepcopy(self.raw)


def load_spec(path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] | None = None) -> AnalysisSpec:
    """Load and validate an analysis config (the embedded AGC ttbar config when ``path`` is None)."""
    if path is None:
        path = _default_config_path()
    path = Path(path)
    raw = read_yaml_file(path)  # size, alias expansion, nesting and duplicate keys checked
    if not isinstance(raw, dict):
        raise ConfigError(f"analysis config {str(path)!r} must be a mapping at the top level")
    try:
        return AnalysisSpec(apply_overrides(raw, overrides), source=str(path))
    except ConfigError as exc:
        if not overrides:
            raise
        try:  # the file alone is valid: the overrides caused it, so the error names them
            AnalysisSpec(raw, source=str(path))
        except ConfigError:
            raise exc from None
        shown = list(overrides) if not isinstance(overrides, Mapping) else [f"{k}={v}" for k, v in overrides.items()]
        raise ConfigError(f"{exc}\n  (caused by the override(s) {', '.join(shown)})") from None
