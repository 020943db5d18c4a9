"""Is a statistical model sound before it is fitted? Checks of histograms and written workspaces.

* :func:`histogram_warnings`: empty or negative-yield regions and samples, and negative bins
  (which the workspace floors at 0), named one by one, from the histograms.
* :func:`check_workspace`: every nuisance parameter on a grid over +-5 sigma of its constraint
  (the others nominal), with pyhf's numpy backend: each sample's expected rate in each bin must
  stay positive (where its nominal is) and never negative, and the logpdf of the workspace's
  data finite; a problem names the parameter, its value, the region, sample and bin. It also
  names the parameters without any effect on the expected rates and the bins whose MC statistical
  uncertainty lets their staterror gamma reach 0 within 5 sigma.
* :func:`prefit_warnings`: the lines of both, as :func:`jacana.analysis.evaluate.hard_evaluation`
  records them in ``result.json`` (``"model_warnings"``) before any fit.

Why (issue 22): one-sided variations symmetrised to an empty down template gave negative rates
at |alpha| = 1-2 under pyhf's code4/code4p interpolations, and MINUIT fits then failed on
``jacana evaluate``'s own workspaces; now :func:`jacana.stages.stats.workspace.rate_floor`
prevents that and this check proves it on every workspace written.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jacana.stages.spec import NOMINAL, AnalysisSpec
from jacana.stages.stats.inference import (
    constraint_widths,
    model_and_data,
    numpy_backend,
    par_names,
)
from jacana.stages.stats.workspace import ALPHA_MAX

#: Points of each parameter's grid (odd: the nominal is one; 41 gives steps of 0.25 sigma).
GRID_POINTS = 41
#: A bin whose relative MC statistical uncertainty reaches this lets its staterror gamma reach 0
#: within ``ALPHA_MAX`` sigma (fewer than 25 effective MC events).
LOW_MC_RELATIVE = 1.0 / ALPHA_MAX
#: Most problems listed per parameter (the count of all is kept).
MAX_LISTED = 20


def histogram_warnings(spec: AnalysisSpec, hists: Mapping) -> list[dict]:
    """Empty or negative-yield regions and samples, and samples with negative bins, before any fit.

    ``[{"kind", "message", ...}]`` with kinds ``"empty_region"``, ``"negative_region"`` (``region``,
    ``yield``), ``"sample_empty_everywhere"`` (``sample``), ``"empty_sample"``, ``"negative_sample"``
    (``region``, ``sample``, ``yield``) and ``"negative_bins"`` (``region``, ``sample``, ``bins``).
    An empty region is not repeated per sample, nor a sample empty everywhere per region.
    """
    totals = {r: {s: np.asarray(hists[r][s][NOMINAL]["sumw"], dtype=np.float64) for s in spec.samples}
              for r in spec.regions}
    empty = {r: {s for s, w in by_s.items() if not np.any(w != 0)} for r, by_s in totals.items()}
    dead_regions = {r for r in spec.regions if empty[r] == set(spec.samples)}
    dead_samples = {s for s in spec.samples if all(s in empty[r] for r in spec.regions)}
    out = []
    for region in spec.regions:
        region_total = float(sum(np.sum(w) for w in totals[region].values()))
        if region in dead_regions:
            out.append({"kind": "empty_region", "region": region, "yield": 0.0,
                        "message": f"region {region} is empty: no event passes its selection in any sample"})
            continue
        if region_total <= 0:
            out.append({"kind": "negative_region", "region": region, "yield": region_total,
                        "message": f"region {region} has a {'negative' if region_total < 0 else 'zero'} total "
                                   f"yield ({region_total:,.6g})"})
        for sample, sumw in totals[region].items():
            total = float(np.sum(sumw))
            negative = np.flatnonzero(sumw < 0)
            if total < 0:
                out.append({"kind": "negative_sample", "region": region, "sample": sample, "yield": total,
                            "message": f"sample {sample} in region {region} has a negative total yield "
                                       f"({total:,.6g}); its negative bins are floored at 0 in the model"})
            elif sample in empty[region] and sample not in dead_samples:
                out.append({"kind": "empty_sample", "region": region, "sample": sample, "yield": total,
                            "message": f"sample {sample} is empty in region {region}"})
            elif len(negative):
                out.append({"kind": "negative_bins", "region": region, "sample": sample, "bins": negative.tolist(),
                            "message": f"sample {sample} in region {region} has negative yields in bins "
                                       f"{negative.tolist()} (floored at 0 in the model)"})
    if len(dead_regions) < len(spec.regions):
        for sample in spec.samples:
            if sample in dead_samples:
                out.append({"kind": "sample_empty_everywhere", "sample": sample,
                            "message": f"sample {sample} is empty in every region: parameters acting only on "
                                       f"it have no effect"})
    return out


def _grid(centre: float, sigma: float, bounds, points: int, sigmas: float) -> np.ndarray:
    """``centre + k sigma`` for ``k`` in ``[-sigmas, sigmas]`` (``points`` values), clipped to ``bounds``
    (pyhf's: e.g. a staterror gamma never below 1e-10), each value once."""
    values = centre + sigma * np.linspace(-sigmas, sigmas, points)
    return np.unique(np.clip(values, bounds[0], bounds[1]))


def _bin_labels(model) -> list[tuple[str, int]]:
    out = []
    for channel in model.config.channels:
        sl = model.config.channel_slices[channel]
        out.extend((channel, k) for k in range(sl.stop - sl.start))
    return out


def check_workspace(workspace_spec: Mapping[str, Any], sigmas: float = ALPHA_MAX,
                    points: int = GRID_POINTS) -> dict:
    """The +-``sigmas`` validity grid of a workspace (pyhf, numpy backend).

    Every free constrained parameter is moved over ``points`` values in ``[-sigmas, +sigmas]`` of
    its constraint (clipped to its bounds), the others at their nominal values; at each value each
    sample's expected rate per bin must be ``>= 0``, ``> 0`` where its nominal rate is, and the
    logpdf of the workspace's data (observations and auxdata) finite. Returns::

        {"passed", "sigmas", "points", "parameters": checked count,
         "problems": [{"parameter", "value", "region", "sample", "bin", "rate", "nominal", "from_value"}
                      or {"parameter", "value", "logpdf"}],
         "problem_count", "no_effect": [parameter names], "undetermined": [the unconstrained
         ones among them: no fit can determine them], "low_mc_statistics":
         [{"parameter", "region", "bin", "relative_uncertainty"}], "warnings": [lines]}

    ``passed`` reflects the rates and the logpdf only; ``no_effect`` (free parameters whose
    every grid value, or ``nominal +- 1`` for an unconstrained one, leaves all rates unchanged) and
    ``low_mc_statistics`` are warnings. Per (parameter, sample, bin) only the lowest rate over the
    grid is listed (``value``: where; ``from_value``: the grid value nearest nominal that fails),
    at most :data:`MAX_LISTED` per parameter.
    """
    with numpy_backend(), np.errstate(all="ignore"):
        model, data = model_and_data(workspace_spec)
        names = par_names(model)
        samples = list(model.config.samples)
        bins = _bin_labels(model)
        init = np.asarray(model.config.suggested_init(), dtype=np.float64)
        bounds = np.asarray(model.config.suggested_bounds(), dtype=np.float64)
        fixed = np.asarray(model.config.suggested_fixed(), dtype=bool)
        centre, width = constraint_widths(model)

        def rates(pars):
            return np.asarray(model.main_model.expected_data(pars, return_by_sample=True), dtype=np.float64)

        def logpdf(pars):
            return float(np.asarray(model.logpdf(pars, data)).reshape(-1)[0])

        nominal = rates(init)
        problems, warnings, no_effect, checked = [], [], [], 0
        counts: dict[str, int] = {}
        for i, name in enumerate(names):
            if fixed[i]:
                continue
            constrained = np.isfinite(width[i])
            values = (_grid(centre[i], width[i], bounds[i], points, sigmas) if constrained
                      else np.unique(np.clip(init[i] + np.array([-1.0, 1.0]), bounds[i][0], bounds[i][1])))
            moved = False
            lowest: dict[tuple[int, int], tuple[float, float]] = {}  # (sample, bin) -> (rate, value)
            first: dict[tuple[int, int], float] = {}  # (sample, bin) -> the value nearest nominal where it fails
            bad_logpdf = []
            for value in values:
                pars = init.copy()
                pars[i] = value
                r = rates(pars)
                moved = moved or not np.array_equal(r, nominal)
                if not constrained:
                    continue
                bad = (r < 0) | ((nominal > 0) & ~(r > 0)) | ~np.isfinite(r)
                for s, b in zip(*np.nonzero(bad)):
                    if (s, b) not in lowest or not r[s, b] >= lowest[(s, b)][0]:
                        lowest[(s, b)] = (float(r[s, b]), float(value))
                    if (s, b) not in first or abs(value - centre[i]) < abs(first[(s, b)] - centre[i]):
                        first[(s, b)] = float(value)
                lp = logpdf(pars)
                if not np.isfinite(lp):
                    bad_logpdf.append((float(value), lp))
            if constrained:
                checked += 1
            if not moved:
                no_effect.append(name)
                warnings.append(f"parameter {name} has no effect on any expected rate")
            found = []
            for (s, b), (rate, value) in sorted(lowest.items(), key=lambda kv: kv[1][0]):
                region, k = bins[b]
                found.append({"parameter": name, "value": value, "region": region, "sample": samples[s],
                              "bin": k, "rate": rate, "nominal": float(nominal[s, b]), "from_value": first[(s, b)]})
            for value, lp in bad_logpdf:
                found.append({"parameter": name, "value": value, "logpdf": str(lp)})
            counts[name] = len(found)
            problems.extend(found[:MAX_LISTED])
            for p in found[:3]:
                if "logpdf" in p:
                    warnings.append(f"{name} = {p['value']:.4g}: the logpdf is {p['logpdf']}")
                else:
                    warnings.append(f"{name}: expected rate of {p['sample']} in {p['region']} bin {p['bin']} "
                                    f"(nominal {p['nominal']:.4g}) is not positive from {name} = {p['from_value']:.4g} "
                                    f"on ({p['rate']:.4g} at {p['value']:.4g})")
            if len(found) > 3:
                warnings.append(f"{name}: {len(found) - 3} more problems (result.json lists them)")
        low_mc = []
        for i, name in enumerate(names):
            if fixed[i] or not name.startswith("staterror") or not np.isfinite(width[i]):
                continue
            if width[i] >= LOW_MC_RELATIVE:
                region = name[len("staterror_"):].split("[")[0]  # build_channels' "staterror_<region>"
                region = region if region in model.config.channels else None
                k = int(name.split("[")[1].rstrip("]")) if "[" in name else 0
                low_mc.append({"parameter": name, "region": region, "bin": k,
                               "relative_uncertainty": float(width[i])})
                warnings.append(f"{name}: relative MC statistical uncertainty {width[i]:.2f} (about "
                                f"{1 / width[i] ** 2:.0f} effective events): its gamma reaches 0 within "
                                f"{sigmas:g} sigma")
    undetermined = [n for n in no_effect if not np.isfinite(width[names.index(n)])]
    return {"passed": not problems, "sigmas": float(sigmas), "points": int(points), "parameters": checked,
            "problems": problems, "problem_count": int(sum(counts.values())), "no_effect": no_effect,
            "undetermined": undetermined, "low_mc_statistics": low_mc, "warnings": warnings}


def prefit_warnings(hist_warnings: list[dict], check: Mapping) -> list[str]:
    """The lines recorded as ``result.json``'s ``"model_warnings"``: the histograms' warnings, then
    the workspace check's (grid problems, parameters without effect, low MC statistics)."""
    return [w["message"] for w in hist_warnings] + list(check.get("warnings", []))
