"""From histograms to the pyhf HistFactory model, as the AGC's cabinetry config builds it.

One code path serves hard and soft mode: :func:`build_channels` works on numpy arrays
(hard mode, written to ``workspace.json``) and on traced JAX arrays (soft mode, fed to
the differentiable likelihood) alike, through the array namespace ``xp``.

Model (cabinetry conventions): a ``ttbar_norm`` normfactor (the POI) on ttbar; for each
shape systematic a correlated ``normsys`` + ``histosys`` pair ("NormPlusShape": the
normsys carries sum(var)/sum(nominal), the histosys the variation scaled to the nominal
yield); one-sided variations are symmetrised after that split (down = 2 nominal - up,
norm_down = 2 - norm_up); normalisation systematics are plain ``normsys``; every sample
carries the channel's ``staterror`` with data sqrt(sumw2). Every NormPlusShape pair then
passes :func:`rate_floor`, which keeps each sample's expected rate in each bin positive for
``|alpha| <= 5`` under pyhf's default interpolations (:func:`floored_templates` lists what it changed).

Histogram layout everywhere in jacana: ``{region: {sample: {variation: {"edges", "sumw", "sumw2"}}}}``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jacana.stages.spec import NOMINAL, AnalysisSpec
from jacana.stages.systematics import SYSTEMATICS

#: Smallest yield used as a denominator: keeps ratios finite when a template is empty.
YIELD_FLOOR = 1e-9
#: Smallest normsys factor: pyhf's code4 interpolation takes its logarithm.
NORM_FLOOR = 1e-3
#: The range of every alpha (pyhf's default bounds of a normsys/histosys parameter) over which the
#: rate floor keeps each sample's expected rate in each bin positive.
ALPHA_MAX = 5.0
#: The smallest rate, as a fraction of the nominal, a histosys template may extrapolate to at
#: ``|alpha| = ALPHA_MAX``.
RATE_FLOOR_FRACTION = 0.01
#: Smallest histosys template per bin, as a fraction of the nominal: pyhf's code4p extrapolates
#: linearly beyond ``|alpha| = 1`` (``nominal + |alpha| (template - nominal)``), which stays above
#: ``RATE_FLOOR_FRACTION * nominal`` up to ``ALPHA_MAX`` only for templates above this.
SHAPE_FLOOR = 1.0 - (1.0 - RATE_FLOOR_FRACTION) / ALPHA_MAX
#: Largest histosys template per bin, as a multiple of the nominal: above about 12 code4p's
#: polynomial (``|alpha| < 1``) swings below zero on the opposite side.
SHAPE_CAP = 10.0
#: Largest normsys factor: above about 19 code4's polynomial (``|alpha| < 1``) swings below zero
#: when the other factor is at :data:`NORM_FLOOR`.
NORM_CAP = 10.0

Histograms = Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]


def shape_systematics(spec: AnalysisSpec, sample: str) -> list[tuple[str, str, str | None]]:
    """``(modifier name, up variation, down variation or None to symmetrise)`` for ``sample``."""
    return [m for s in spec.systematics for m in SYSTEMATICS[s.kind].modifiers(s.key, s.options, sample)]


def norm_plus_shape(nominal, up, down=None, xp=np, floor=True) -> tuple[dict, dict]:
    """cabinetry's NormPlusShape split: ``({"hi", "lo"}, {"hi_data", "lo_data"})``.

    Guards where cabinetry would give NaN or negative rates (only with very sparse
    templates): an empty nominal gives no normalisation effect, normalisation factors stay
    above :data:`NORM_FLOOR`, and symmetrised templates are floored at zero. With ``floor``
    (always, in the model) the result then passes through :func:`rate_floor`, which keeps
    every expected rate positive for ``|alpha| <= ALPHA_MAX``.
    """
    total = xp.sum(nominal)
    present = total > YIELD_FLOOR
    safe_total = xp.where(present, total, 1.0)

    def norm_of(variation):
        return xp.maximum(xp.where(present, xp.sum(variation) / safe_total, 1.0), NORM_FLOOR)

    norm_up = norm_of(up)
    hi_data = up / norm_up
    if down is None:
        norm_down = xp.maximum(2.0 - norm_up, NORM_FLOOR)
        lo_data = xp.maximum(2.0 * nominal - hi_data, 0.0)
    else:
        norm_down = norm_of(down)
        lo_data = down / norm_down
    norm, shape = {"hi": norm_up, "lo": norm_down}, {"hi_data": hi_data, "lo_data": lo_data}
    return rate_floor(nominal, norm, shape, xp) if floor else (norm, shape)


def rate_floor(nominal, norm: Mapping, shape: Mapping, xp=np) -> tuple[dict, dict]:
    """Clip a NormPlusShape pair so that pyhf's rates stay positive for ``|alpha| <= ALPHA_MAX``.

    pyhf's default interpolations (the workspace sets none: normsys code4, histosys code4p)
    multiply the nominal-plus-histosys rate by the normsys factor, so both must stay positive:

    * histosys templates are clipped per bin to ``[SHAPE_FLOOR, SHAPE_CAP] * nominal`` (code4p's
      linear extrapolation reaches ``RATE_FLOOR_FRACTION * nominal`` at ``|alpha| = ALPHA_MAX``
      at worst, and its polynomial stays positive); where the nominal is empty the templates
      are 0 (a shape effect there would swing negative);
    * normsys factors are clipped to ``[NORM_FLOOR, NORM_CAP]`` (code4 is exponential outside
      ``|alpha| <= 1`` and its polynomial stays positive inside).

    Identical where nothing reaches a bound; the clip is ``max``/``min``, so in soft mode the
    gradient is that of the template inside the bounds and 0 outside, never NaN.
    :func:`floored_templates` lists what it changed.
    """
    nominal = xp.maximum(nominal, 0.0)
    low, high = SHAPE_FLOOR * nominal, SHAPE_CAP * nominal
    return ({k: xp.minimum(xp.maximum(norm[k], NORM_FLOOR), NORM_CAP) for k in ("hi", "lo")},
            {k: xp.minimum(xp.maximum(shape[k], low), high) for k in ("hi_data", "lo_data")})


def _sqrt_floored(x, xp):
    """sqrt(x) with a zero (not infinite) derivative where x is empty: soft sumw2 reaches 0."""
    present = x > YIELD_FLOOR**2
    return xp.where(present, xp.sqrt(xp.where(present, x, 1.0)), 0.0)


def build_channels(spec: AnalysisSpec, hists: Histograms, xp=np) -> list[dict]:
    """pyhf ``channels`` (names, samples, modifiers) with array data in namespace ``xp``."""
    poi = spec.poi
    channels = []
    for region in spec.regions:
        samples = []
        for sample in spec.samples:
            h = hists[region][sample]
            # negative-weight MC events can leave a sparse bin below zero: a Poisson rate must not be
            nominal = xp.maximum(h[NOMINAL]["sumw"], 0.0)
            modifiers: list[dict] = []
            if sample == poi["sample"]:
                modifiers.append({"name": poi["name"], "type": "normfactor", "data": None})
            for s in spec.systematics_of("normalization"):
                if sample in spec.normalization_samples(s):
                    modifiers.append({"name": s.key, "type": "normsys",
                                      "data": {"hi": float(s.options["up"]), "lo": float(s.options["down"])}})
            for name, up, down in shape_systematics(spec, sample):
                norm, shape = norm_plus_shape(nominal, xp.maximum(h[up]["sumw"], 0.0),
                                              None if down is None else xp.maximum(h[down]["sumw"], 0.0), xp)
                modifiers.append({"name": name, "type": "normsys", "data": norm})
                modifiers.append({"name": name, "type": "histosys", "data": shape})
            modifiers.append({"name": f"staterror_{region}", "type": "staterror",
                              "data": _sqrt_floored(h[NOMINAL]["sumw2"], xp)})
            samples.append({"name": sample, "data": nominal, "modifiers": modifiers})
        channels.append({"name": region, "samples": samples})
    return channels


def floored_templates(spec: AnalysisSpec, hists: Histograms) -> list[dict]:
    """What :func:`rate_floor` changed in the model :func:`build_channels` builds from ``hists``.

    One entry per (region, sample, modifier, template) with a changed value:
    ``{"region", "sample", "modifier", "template": "hi"|"lo"|"hi_data"|"lo_data", "bins",
    "before", "after"}`` (``bins`` is None for the normsys factors). Computed from the same
    inputs as :func:`build_channels` (numpy), once without and once with the floor.
    """
    out = []
    for region in spec.regions:
        for sample in spec.samples:
            h = hists[region][sample]
            nominal = np.maximum(np.asarray(h[NOMINAL]["sumw"], dtype=np.float64), 0.0)
            for name, up, down in shape_systematics(spec, sample):
                args = (nominal, np.maximum(np.asarray(h[up]["sumw"], dtype=np.float64), 0.0),
                        None if down is None else np.maximum(np.asarray(h[down]["sumw"], dtype=np.float64), 0.0))
                raw = norm_plus_shape(*args, floor=False)
                kept = norm_plus_shape(*args)
                for part in (0, 1):
                    for key in raw[part]:
                        before, after = np.asarray(raw[part][key]), np.asarray(kept[part][key])
                        changed = before != after
                        if not np.any(changed):
                            continue
                        entry = {"region": region, "sample": sample, "modifier": name, "template": key}
                        if before.ndim:
                            bins = np.flatnonzero(changed)
                            entry.update(bins=bins.tolist(), before=before[bins].tolist(), after=after[bins].tolist())
                        else:
                            entry.update(bins=None, before=float(before), after=float(after))
                        out.append(entry)
    return out


def pseudo_data(spec: AnalysisSpec, hists: Histograms, xp=np) -> dict[str, Any]:
    """The AGC pseudo-data per region: averaged alternative ttbar samples plus nominal others."""
    out = {}
    for region in spec.regions:
        total = 0.0
        for sample in spec.samples:
            variations = spec.raw.get("pseudo_data", {}).get(sample, [NOMINAL])
            h = hists[region][sample]
            total = total + sum(h[v]["sumw"] for v in variations) / len(variations)
        out[region] = total
    return out


def _to_json(value):
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if value is None or isinstance(value, (str, int, float)):
        return value
    arr = np.asarray(value, dtype=np.float64)
    return arr.tolist() if arr.ndim else float(arr)


def build_workspace(spec: AnalysisSpec, hists: Histograms, observations: Mapping[str, Any] | None = None) -> dict:
    """A complete pyhf workspace (JSON-ready) with the AGC pseudo-data as observations."""
    observations = pseudo_data(spec, hists) if observations is None else observations
    poi = spec.poi
    return {
        "version": "1.0.0",
        "channels": _to_json(build_channels(spec, hists)),
        "observations": [{"name": r, "data": _to_json(observations[r])} for r in spec.regions],
        "measurements": [{
            "name": f"{spec.name}_measurement",
            "config": {"poi": poi["name"],
                       "parameters": [{"name": poi["name"], "bounds": [list(map(float, poi["bounds"]))], "inits": [1.0]}]},
        }],
    }


def histograms_to_json(hists: Histograms) -> dict:
    """The histogram layout as plain JSON (lists of floats)."""
    return _to_json({r: {s: {v: dict(h) for v, h in by_v.items()} for s, by_v in by_s.items()}
                     for r, by_s in hists.items()})


def channels_to_yields(channels: list[dict]) -> dict:
    """The likelihood's yields pytree from :func:`build_channels` output.

    ``{channel: {sample: {"data", "modifiers": {name: fields}}}}``; a normsys and a histosys
    of the same name (one nuisance parameter) share one entry with both sets of fields.
    """
    out: dict = {}
    for ch in channels:
        for s in ch["samples"]:
            mods: dict = {}
            for m in s["modifiers"]:
                if m["type"] == "staterror" or m["type"] == "shapesys":
                    mods.setdefault(m["name"], {})["data"] = m["data"]
                elif m["data"] is not None:
                    mods.setdefault(m["name"], {}).update(m["data"])
            out.setdefault(ch["name"], {})[s["name"]] = {"data": s["data"], "modifiers": mods}
    return out
