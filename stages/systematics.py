"""The systematic-uncertainty registry: one unit per kind, saying what variations it makes and how
the statistical model takes them.

Four ways a systematic enters an analysis, one per kind:

* **kinematic** (``pt_scale``, ``pt_smear``): the objects' pT changes, so the selection and every
  observable are recomputed; nominal files only; a ``normsys`` + ``histosys`` pair, symmetrised.
* **weight** (``leading_object_weight``, ``event_weight``): the event weight changes, nominal
  objects; nominal files only; up/down templates.
* **file** (``alternative_sample``): another file set of one sample (generator, shower, scales).
* **normalization**: a rate factor on some samples (``normsys``), no template.

The AGC config's names (``jet_pt_scale``, ``jet_pt_smear``, ``btag_weight``) are aliases, with the
jets as the varied object set.

>>> SYSTEMATICS["jet_pt_scale"].kinematic_variations({"variation": "pt_scale_up", "factor": 1.03})
['pt_scale_up']
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from jacana.stages.registry import Registry

Options = Mapping[str, Any]
Modifier = tuple  # (modifier name, up variation, down variation or None to symmetrise)


@dataclasses.dataclass(frozen=True)
class SystematicKind:
    """What one kind of systematic does; every method takes the config entry's options."""

    category: str  # "kinematic" | "weight" | "file" | "normalization"
    required: tuple[str, ...] = ()  # options a config entry of this kind must give
    kinematic_variations: Callable[[Options], list[str]] = lambda o: []
    weight_variations: Callable[[Options], list[str]] = lambda o: []
    file_variations: Callable[[Options, str], list[str]] = lambda o, sample: []
    modifiers: Callable[[str, Options, str], list[Modifier]] = lambda key, o, sample: []
    #: kinematic kinds: ``varied_pt(options, pt, smear)`` -> the varied pT (``smear``: a callable giving
    #: the N(1, sigma) factors of these objects for (sigma, seed)), with the conventional arithmetic
    varied_pt: Callable[..., np.ndarray] | None = None
    #: weight kinds: ``factors(options, objects, event) -> [(up, down or None)]``: per-event factors of
    #: the nominal weight, from the nominal objects (:class:`~.observables.objects.Objects`) and event fields
    factors: Callable[..., list] | None = None
    #: the object set a kinematic or weight kind acts on
    target: Callable[[Options], str] = lambda o: o.get("object", "jet")


SYSTEMATICS: Registry[SystematicKind] = Registry("systematic kind")


def _kinematic(o: Options) -> list[str]:
    return [o["variation"]]


SYSTEMATICS.register("pt_scale", aliases=("jet_pt_scale",))(SystematicKind(
    category="kinematic", required=("factor", "variation"), kinematic_variations=_kinematic,
    modifiers=lambda key, o, sample: [(key, o["variation"], None)],
    varied_pt=lambda o, pt, smear: pt * float(o["factor"])))

SYSTEMATICS.register("pt_smear", aliases=("jet_pt_smear",))(SystematicKind(
    category="kinematic", required=("sigma", "seed", "variation"), kinematic_variations=_kinematic,
    modifiers=lambda key, o, sample: [(key, o["variation"], None)],
    varied_pt=lambda o, pt, smear: pt * smear(float(o["sigma"]), int(o["seed"]))))


def _leading_n(o: Options) -> int:
    return int(o.get("n", o.get("n_jets", 0)))


def _leading_prefix(o: Options) -> str:
    return o.get("variation", "btag_var")


def _leading_names(o: Options) -> list[str]:
    p = _leading_prefix(o)
    return [name for i in range(_leading_n(o)) for name in (f"{p}_{i}_up", f"{p}_{i}_down")]


def _leading_factors(o: Options, objects, event) -> list:
    """``1 +/- rate x pT_i / pt_ref`` of the i-th selected object (AGC's b-tag nuisance parameters)."""
    from jacana.stages.observables.objects import exact_divide
    from jacana.stages.selection.multiplicity import nth_selected_value

    rate, ref = float(o["rate"]), float(o["pt_ref"])
    objs = objects[o.get("object", "jet")]
    lead = nth_selected_value(objs.pt, objs.w, _leading_n(o))  # [B, n]: expected pT of the i-th selected
    out = []
    for i in range(_leading_n(o)):
        shift = exact_divide(rate * lead[:, i], ref)
        out.append((1.0 + shift, 1.0 - shift))
    return out


SYSTEMATICS.register("leading_object_weight", aliases=("btag_weight",))(SystematicKind(
    category="weight", required=("rate", "pt_ref"), weight_variations=_leading_names,
    modifiers=lambda key, o, sample: [(f"{key}_{i}", f"{_leading_prefix(o)}_{i}_up", f"{_leading_prefix(o)}_{i}_down")
                                      for i in range(_leading_n(o))],
    factors=_leading_factors))


def _event_weight_names(o: Options) -> list[str]:
    return [f"{o['variation']}_up"] + ([f"{o['variation']}_down"] if "down" in o else [])


def _event_factors(o: Options, objects, event) -> list:
    """The weight ratios stored in event fields ``up`` (and ``down``)."""
    return [(event[o["up"]], event[o["down"]] if "down" in o else None)]


SYSTEMATICS.register("event_weight")(SystematicKind(
    category="weight", required=("up", "variation"), weight_variations=_event_weight_names, factors=_event_factors,
    modifiers=lambda key, o, sample: [(key, f"{o['variation']}_up", f"{o['variation']}_down" if "down" in o else None)],
    target=lambda o: "event"))

SYSTEMATICS.register("alternative_sample")(SystematicKind(
    category="file", required=("sample", "up"),
    file_variations=lambda o, sample: ([o["up"]] + ([o["down"]] if "down" in o else [])) if o["sample"] == sample else [],
    modifiers=lambda key, o, sample: [(key, o["up"], o.get("down"))] if o["sample"] == sample else []))

SYSTEMATICS.register("normalization")(SystematicKind(category="normalization", required=("samples", "up", "down")))
