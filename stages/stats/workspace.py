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

Template hygiene (the config's optional ``hygiene:`` block, :func:`jacana.stages.spec.hygiene_settings`), as cabinetry
and TRExFitter users expect, identical in hard and soft mode: per systematic an explicit
symmetrisation (``auto``: one-sided variations mirrored, as before), optional smoothing of the
variation's ratio to nominal (off by default), and pruning of normsys factors and histosys shapes
whose effect is below a threshold. The pruning decision (:func:`pruning_decisions`) is taken from
concrete (hard or initial) templates and passed to :func:`build_channels` unchanged during an
optimisation, so the model's structure is constant and the objective differentiable.
:func:`template_hygiene` lists what was pruned, symmetrised and smoothed.

Histogram layout everywhere in jacana: ``{region: {sample: {variation: {"edges", "sumw", "sumw2"}}}}``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jacana.stages.errors import ConfigError
from jacana.stages.spec import NOMINAL, SMOOTHING_METHODS, AnalysisSpec
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

def _chosen(settings: Mapping, field: str, modifier: str, key: str, default: str) -> str:
    """A per-systematic setting: the modifier's own entry first, then its systematic's."""
    table = settings[field]
    return table.get(modifier, table.get(key, default))


def shape_systematics(spec: AnalysisSpec, sample: str) -> list[tuple[str, str, str | None]]:
    """``(modifier name, up variation, down variation or None to symmetrise)`` for ``sample``."""
    return [m for s in spec.systematics for m in SYSTEMATICS[s.kind].modifiers(s.key, s.options, sample)]


def _shape_entries(spec: AnalysisSpec, sample: str) -> list[tuple[str, str, str, str | None]]:
    """``(systematic key, modifier name, up variation, down variation or None)`` for ``sample``."""
    return [(s.key, *m) for s in spec.systematics for m in SYSTEMATICS[s.kind].modifiers(s.key, s.options, sample)]


def _windows(n: int, width: int) -> np.ndarray:
    """``[width, n]`` indices of each bin's ``width`` (odd) neighbours, the end bins repeated past the ends
    (static: one gather, also on traced arrays)."""
    half = width // 2
    return np.clip(np.arange(n)[None, :] + np.arange(-half, half + 1)[:, None], 0, n - 1)


def _running_median(x, width: int, xp):
    """Running median over ``width`` (odd) bins; ``sort`` is differentiable almost everywhere.
    With width 3 the end bins keep their value (their window is the end bin twice and its neighbour)."""
    return xp.sort(x[_windows(x.shape[0], width)], axis=0)[width // 2]


def _median3(a, b, c, xp):
    """Median of three scalars (a sort, as the running medians)."""
    return xp.sort(xp.stack([a, b, c]))[1]


def _set_ends(x, first, last, xp):
    """``x`` with new end values (a concatenation: works on traced arrays)."""
    return xp.concatenate([xp.reshape(first, (1,)), x[1:-1], xp.reshape(last, (1,))])


def _extrapolate(a, b):
    """``3 a - 2 b`` rounded as ROOT does (``3 a`` first). Written ``(a + 2 a) - 2 b``: the same double, since
    ``2 a`` and ``2 b`` are exact, but XLA cannot fuse it into one FMA, which rounds ``3 a - 2 b`` only once;
    that last bit decides ties in the end rule and the plateau test."""
    return (a + 2.0 * a) - 2.0 * b


def _divide(a, divisor: float, xp):
    """``a / divisor`` rounded as in ROOT. XLA would multiply by the rounded reciprocal instead (an ulp off
    at times, enough to break a tie in the second pass), so with jax this is
    :func:`jacana.stages.observables.objects.exact_divide`."""
    if xp is np:
        return a / divisor
    from jacana.stages.observables.objects import exact_divide
    return exact_divide(a, divisor)


def _353(x, xp):
    """Friedman's running medians of 3, 5 and 3 bins with ROOT's (HBOOK's) end rules."""
    n = x.shape[0]
    # median of 3; an end bin then takes the median of itself, its neighbour and the neighbour's
    # straight-line extrapolation from the next bin (the first end is done before the last one, which
    # matters for 3 bins, where the last end's rule sees the first end's new value)
    z = _running_median(x, 3, xp)
    first = _median3(z[1], z[0], _extrapolate(z[1], z[2]), xp)
    z = _set_ends(z, first, z[-1], xp)
    z = _set_ends(z, first, _median3(z[-2], z[-1], _extrapolate(z[-2], z[-3]), xp), xp)
    # median of 5 where the window fits, of 3 on the bins next to the ends; the end bins stay
    five = (np.arange(n) >= 2) & (np.arange(n) <= n - 3)
    z = xp.where(five, _running_median(z, 5, xp), _running_median(z, 3, xp))
    # median of 3 again; the end bins stay
    return _running_median(z, 3, xp)


def _quadratic_plateaus(z, xp):
    """ROOT's "quadratic interpolation for flat segments", which restores part of a peak or dip the
    medians flattened. Bin ``i`` is a plateau centre when bins ``i-1, i, i+1`` are equal and ``z[i-2]``,
    ``z[i+2]`` both lie above or both below them. Of those two, ``far`` is the one farther from the plateau
    (``z[i-2]`` on a tie) and ``near`` the other; bin ``i`` becomes ``-far/2 + z[i]/0.75 + near/6`` and its
    neighbour on the ``near`` side ``z[i] + (near - far)/2``. Plateau centres are at least 3 bins apart, so
    the replacements never overlap. The tests only pick which linear formula applies (``where``), so the
    gradient is that of the chosen one."""
    n = z.shape[0]
    if n < 5:
        return z
    c = np.arange(2, n - 2)  # candidate centres: two bins on each side
    zm2, zm1, z0, zp1, zp2 = (z[c + k] for k in (-2, -1, 0, 1, 2))
    flat = (zm1 == z0) & (z0 == zp1) & ((zm2 - z0) * (zp2 - z0) > 0)
    near_right = xp.abs(zp2 - z0) <= xp.abs(zm2 - z0)
    far, near = xp.where(near_right, zm2, zp2), xp.where(near_right, zp2, zm2)
    centre = -0.5 * far + _divide(z0, 0.75, xp) + _divide(near, 6.0, xp)
    side = 0.5 * (near - far) + z0

    def at(values, mask, shift):
        """Full-length ``(mask, values)`` with the centres' ``values``/``mask`` on bin ``centre + shift``."""
        lead, tail = 2 + shift, 2 - shift
        return (xp.concatenate([xp.zeros(lead, bool), mask, xp.zeros(tail, bool)]),
                xp.concatenate([z[:lead], values, z[n - tail:]]))

    out = z
    for values, mask, shift in ((centre, flat, 0), (side, flat & near_right, 1), (side, flat & ~near_right, -1)):
        replaced, full = at(values, mask, shift)
        out = xp.where(replaced, full, out)
    return out


def _hanning(y, xp):
    """Weights 1/4, 1/2, 1/4 on the inner bins (in ROOT's order of additions); the end bins stay."""
    w = y[_windows(y.shape[0], 3)]
    inner = (np.arange(y.shape[0]) > 0) & (np.arange(y.shape[0]) < y.shape[0] - 1)
    return xp.where(inner, 0.25 * w[0] + 0.5 * w[1] + 0.25 * w[2], y)


def _353qh(x, xp):
    """One 353QH pass: running medians 3, 5, 3, the plateaus' quadratic interpolation, Hanning."""
    return _hanning(_quadratic_plateaus(_353(x, xp), xp), xp)


def smooth_ratio(ratio, method: str, xp=np):
    """Smooth a variation's ratio to the nominal over the bins.

    ``"353H"``: ROOT's ``TH1::Smooth()`` (``TH1::SmoothArray(n, x, 1)``, HBOOK's ``hsmoof``), J. Friedman's
    353QH twice: running medians of 3, 5 and 3 bins, the quadratic interpolation of 3-bin plateaus and a
    Hanning average, then "twicing" (the same smoother applied to the residuals and added back); the
    result is floored at 0 unless the input has a negative bin. ``"median3"``: one running median of 3
    bins, the end bins kept. Fewer than 3 bins are returned unchanged (ROOT refuses them).
    """
    if method == "none" or ratio.shape[0] < 3:
        return ratio
    if method == "median3":
        return _running_median(ratio, 3, xp)
    if method == "353H":
        first = _353qh(ratio, xp)
        out = first + _353qh(ratio - first, xp)
        return xp.where(xp.min(ratio) < 0, out, xp.maximum(out, 0.0))
    raise ConfigError(f"unknown smoothing method {method!r}; choose from {list(SMOOTHING_METHODS)}")


def smoothed_variation(nominal, variation, method: str, xp=np):
    """``variation`` with its ratio to ``nominal`` smoothed and its total kept (only the shape is smoothed).
    Bins with an empty nominal keep their value."""
    present = nominal > YIELD_FLOOR
    safe = xp.where(present, nominal, 1.0)
    ratio = xp.where(present, variation / safe, 1.0)
    smoothed = xp.where(present, xp.maximum(smooth_ratio(ratio, method, xp), 0.0) * nominal, variation)
    total, new_total = xp.sum(variation), xp.sum(smoothed)
    return smoothed * xp.where(new_total > YIELD_FLOOR, total / xp.where(new_total > YIELD_FLOOR, new_total, 1.0), 1.0)


def roughness(nominal, variation) -> float:
    """Bin-to-bin fluctuation of a variation: the RMS of the differences of its relative deviation from
    the nominal between neighbouring bins with a nominal (what smoothing reduces)."""
    nominal, variation = np.asarray(nominal, np.float64), np.asarray(variation, np.float64)
    present = nominal > YIELD_FLOOR
    rel = variation[present] / nominal[present] - 1.0
    return float(np.sqrt(np.mean(np.diff(rel) ** 2))) if rel.size > 1 else 0.0


def hygienic_variations(nominal, up, down, symmetrize: str, smoothing: str, xp=np):
    """``(up, down or None, mode)``: the variation templates after smoothing and symmetrisation.

    Smoothing acts on each template's ratio to the nominal. Symmetrisation (``mode``, ``auto``
    resolved): ``one_sided`` mirrors the up variation (``down`` is then None: :func:`norm_plus_shape`
    mirrors after its norm/shape split, as cabinetry does; a given down template is ignored, as
    TRExFitter's ONESIDED does), ``two_sided`` replaces both by ``nominal +- (up - down) / 2``
    (TRExFitter's TWOSIDED; the down one floored at 0), ``none`` keeps both.
    """
    mode = ("one_sided" if down is None else "none") if symmetrize == "auto" else symmetrize
    if down is None and mode != "one_sided":
        raise ConfigError(f"symmetrisation {mode!r} needs a down variation; a one-sided one can only be mirrored")
    if smoothing != "none":
        up = smoothed_variation(nominal, up, smoothing, xp)
        down = None if down is None else smoothed_variation(nominal, down, smoothing, xp)
    if mode == "one_sided":
        return up, None, mode
    if mode == "two_sided":
        half = 0.5 * (up - down)
        return nominal + half, xp.maximum(nominal - half, 0.0), mode
    return up, down, mode


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


def _shape_templates(spec: AnalysisSpec, hists: Histograms, xp=np):
    """Per (region, sample, shape modifier): ``(region, sample, key, name, nominal, up, down or None, mode,
    smoothing)`` after hygiene (:func:`hygienic_variations`), negative bins floored at 0."""
    settings = spec.hygiene
    for region in spec.regions:
        for sample in spec.samples:
            h = hists[region][sample]
            nominal = xp.maximum(xp.asarray(h[NOMINAL]["sumw"]), 0.0)
            for key, name, up, down in _shape_entries(spec, sample):
                sym = _chosen(settings, "symmetrize", name, key, "auto")
                smooth = _chosen(settings, "smoothing", name, key, "none")
                up_t, down_t, mode = hygienic_variations(
                    nominal, xp.maximum(xp.asarray(h[up]["sumw"]), 0.0),
                    None if down is None else xp.maximum(xp.asarray(h[down]["sumw"]), 0.0), sym, smooth, xp)
                yield region, sample, key, name, nominal, up_t, down_t, mode, smooth


def _concrete(hists: Histograms, spec: AnalysisSpec) -> dict:
    """The nominal and variation sumw as float64 numpy arrays, or a clear error on traced (soft) arrays."""
    try:
        return {r: {s: {v: {"sumw": np.asarray(h["sumw"], dtype=np.float64)} for v, h in hists[r][s].items()}
                    for s in spec.samples} for r in spec.regions}
    except TypeError as exc:  # jax raises a TypeError subclass when a tracer is converted
        raise ConfigError("the pruning decision needs concrete templates: in soft mode take it once from the initial"
                          " templates (pruning_decisions) and pass it to build_channels as `pruned`") from exc


def _prune_measures(spec: AnalysisSpec, hists: Histograms) -> list[dict]:
    """Per (region, sample, modifier, part): the effect the pruning thresholds compare (numpy)."""
    thresholds = spec.hygiene["pruning"]
    out = []
    for region, sample, key, name, nominal, up, down, mode, _ in _shape_templates(spec, _concrete(hists, spec)):
        norm, shape = norm_plus_shape(nominal, up, down, floor=False)
        present = nominal > YIELD_FLOOR
        rel = [np.abs(np.asarray(shape[k])[present] / nominal[present] - 1.0) for k in ("hi_data", "lo_data")]
        effects = {"normsys": max(abs(float(norm["hi"]) - 1.0), abs(float(norm["lo"]) - 1.0)),
                   "histosys": max((float(np.max(r)) for r in rel if r.size), default=0.0)}
        for part, effect in effects.items():
            threshold = thresholds["norm" if part == "normsys" else "shape"]
            out.append({"region": region, "sample": sample, "modifier": name, "type": part, "effect": effect,
                        "threshold": threshold, "pruned": effect < threshold})
    for s in spec.systematics_of("normalization"):
        effect = max(abs(float(s.options["up"]) - 1.0), abs(float(s.options["down"]) - 1.0))
        for sample in spec.normalization_samples(s):
            for region in spec.regions:
                out.append({"region": region, "sample": sample, "modifier": s.key, "type": "normsys",
                            "effect": effect, "threshold": thresholds["norm"],
                            "pruned": effect < thresholds["norm"]})
    return out


def pruning_decisions(spec: AnalysisSpec, hists: Histograms) -> frozenset:
    """The pruned ``(region, sample, modifier, "normsys"|"histosys")`` of ``hists`` (concrete arrays).

    Taken once from the hard (or initial) templates and passed to :func:`build_channels`: in soft mode
    it stays fixed during an optimisation, so the model's structure never changes.
    """
    return frozenset((m["region"], m["sample"], m["modifier"], m["type"]) for m in _prune_measures(spec, hists)
                     if m["pruned"])


def build_channels(spec: AnalysisSpec, hists: Histograms, xp=np, pruned: frozenset | None = None) -> list[dict]:
    """pyhf ``channels`` (names, samples, modifiers) with array data in namespace ``xp``.

    ``pruned``: the modifiers left out (:func:`pruning_decisions`); None takes the decision from
    ``hists`` themselves, which must then be concrete (hard mode).
    """
    if pruned is None:
        pruned = pruning_decisions(spec, hists)
    poi = spec.poi
    shapes: dict = {}
    for region, sample, _, name, nominal, up, down, _, _ in _shape_templates(spec, hists, xp):
        shapes.setdefault((region, sample), []).append((name, nominal, up, down))
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
                if sample in spec.normalization_samples(s) and (region, sample, s.key, "normsys") not in pruned:
                    modifiers.append({"name": s.key, "type": "normsys",
                                      "data": {"hi": float(s.options["up"]), "lo": float(s.options["down"])}})
            for name, nom, up, down in shapes.get((region, sample), []):
                norm, shape = norm_plus_shape(nom, up, down, xp)
                for part, data in (("normsys", norm), ("histosys", shape)):
                    if (region, sample, name, part) not in pruned:
                        modifiers.append({"name": name, "type": part, "data": data})
            modifiers.append({"name": f"staterror_{region}", "type": "staterror",
                              "data": _sqrt_floored(h[NOMINAL]["sumw2"], xp)})
            samples.append({"name": sample, "data": nominal, "modifiers": modifiers})
        channels.append({"name": region, "samples": samples})
    return channels


def template_hygiene(spec: AnalysisSpec, hists: Histograms) -> dict:
    """What the hygiene did to the model of ``hists``, for ``result.json``'s ``template_hygiene``.

    ``{"settings", "pruned": [{"region", "sample", "modifier", "type", "effect", "threshold"}],
    "symmetrized": [{"modifier", "samples", "mode", "one_sided"}], "smoothed": [{"region", "sample",
    "modifier", "method", "roughness_before", "roughness_after"}], "removed_parameters": [names left
    with no modifier anywhere]}``.
    """
    concrete = _concrete(hists, spec)
    pruned = [{k: m[k] for k in ("region", "sample", "modifier", "type", "effect", "threshold")}
              for m in _prune_measures(spec, concrete) if m["pruned"]]
    symmetrized: dict = {}
    smoothed = []
    kept: set = set()
    decided = {(m["region"], m["sample"], m["modifier"], m["type"]) for m in pruned}
    raw = {(r, s): dict(_shape_templates_raw(spec, concrete, r, s)) for r in spec.regions for s in spec.samples}
    for region, sample, key, name, nominal, up, down, mode, smooth in _shape_templates(spec, concrete):
        if mode != "none":
            entry = symmetrized.setdefault(name, {"modifier": name, "samples": [], "mode": mode,
                                                  "one_sided": raw[(region, sample)][name][1] is None})
            if sample not in entry["samples"]:
                entry["samples"].append(sample)
        if smooth != "none":
            raw_up = raw[(region, sample)][name][0]
            smoothed.append({"region": region, "sample": sample, "modifier": name, "method": smooth,
                             "roughness_before": roughness(nominal, raw_up), "roughness_after": roughness(nominal, up)})
        kept.update(name for part in ("normsys", "histosys") if (region, sample, name, part) not in decided)
    for s in spec.systematics_of("normalization"):
        kept.update(s.key for sample in spec.normalization_samples(s) for r in spec.regions
                    if (r, sample, s.key, "normsys") not in decided)
    names = list(dict.fromkeys([m["modifier"] for m in pruned]))
    return {"settings": spec.hygiene, "pruned": pruned, "symmetrized": list(symmetrized.values()),
            "smoothed": smoothed, "removed_parameters": [n for n in names if n not in kept]}


def _shape_templates_raw(spec: AnalysisSpec, hists: Histograms, region: str, sample: str):
    """``(modifier name, (up, down or None))`` before hygiene, negative bins floored at 0 (numpy)."""
    h = hists[region][sample]
    for _, name, up, down in _shape_entries(spec, sample):
        yield name, (np.maximum(h[up]["sumw"], 0.0), None if down is None else np.maximum(h[down]["sumw"], 0.0))


def floored_templates(spec: AnalysisSpec, hists: Histograms) -> list[dict]:
    """What :func:`rate_floor` changed in the model :func:`build_channels` builds from ``hists``.

    One entry per (region, sample, modifier, template) with a changed value:
    ``{"region", "sample", "modifier", "template": "hi"|"lo"|"hi_data"|"lo_data", "bins",
    "before", "after"}`` (``bins`` is None for the normsys factors). Computed from the same
    inputs as :func:`build_channels` (numpy, after hygiene), once without and once with the floor;
    pruned modifiers are left out.
    """
    concrete = _concrete(hists, spec)
    pruned = pruning_decisions(spec, concrete)
    out = []
    for region, sample, _, name, nominal, up, down, _, _ in _shape_templates(spec, concrete):
        raw = norm_plus_shape(nominal, up, down, floor=False)
        kept = norm_plus_shape(nominal, up, down)
        for part, kind in ((0, "normsys"), (1, "histosys")):
            if (region, sample, name, kind) in pruned:
                continue
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


def build_workspace(spec: AnalysisSpec, hists: Histograms, observations: Mapping[str, Any] | None = None,
                    pruned: frozenset | None = None) -> dict:
    """A complete pyhf workspace (JSON-ready) with the AGC pseudo-data as observations (``pruned``: see
    :func:`build_channels`)."""
    observations = pseudo_data(spec, hists) if observations is None else observations
    poi = spec.poi
    return {
        "version": "1.0.0",
        "channels": _to_json(build_channels(spec, hists, pruned=pruned)),
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
