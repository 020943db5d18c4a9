"""Benchmark: one jitted ``value_and_grad`` of each objective vs pyhf's numpy inference.

Run ``python -m jacana.bench.likelihood`` (AGC-like model) or call
:func:`bench_likelihood` with any workspace spec. For every objective it
reports the compile time, the median wall time of one compiled
``jax.value_and_grad`` call on CPU, and, measured in the same run, the median
time pyhf (numpy backend, scipy/minuit) takes to compute the same number
without a gradient:

- ``sigma_mu``: :func:`pyhf_sigma_mu_reference`: pyhf's own profile-likelihood scan of the Asimov
  data (half the distance between the Delta(-2 ln L) = 1 crossings, :func:`pyhf_profile_scan`),
  timed alone. MINUIT's HESSE value is recorded beside it with MINUIT's covariance flags
  (:data:`MINUIT_COVARIANCE_FLAGS`), never used: on the AGC workspace of 60k events MINUIT says its
  covariance is inaccurate and forced positive definite (HESSE 0.022 against the scan's 0.144), and
  on a small model with all flags fine HESSE still gave 0.024-0.103 depending on MINUIT's strategy
  against the scan's 0.105 (docs/bench.md);
- ``z0``: ``pyhf.infer.test_statistics.q0`` on Asimov(POI=1) data (scipy);
- ``cls``: ``pyhf.infer.hypotest(1, asimov_bkg, return_expected=True)`` (scipy);
- ``upper_limit``: ``pyhf.infer.intervals.upper_limits.upper_limit(asimov_bkg, model)``
  (TOMS748 root finding, scipy); minutes per call on the AGC-like model, so timed
  ``--pyhf-slow-repeats`` times (default once).

The yields are passed as device arrays, as they reach the objective inside the
pipeline's jitted loss; the ``numpy in`` column times the same call on the numpy
template yields, which adds a host-to-device copy of every leaf (about 1 ms for
the ~300 leaves of the AGC-like model). The table also gives the fastest jacana
call (``min``; on a shared machine the median carries the load) and, for
``sigma_mu`` and ``z0``, whether the median meets the issue's target of 5 ms
(:data:`TARGET_MS`).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import pyhf

from jacana.stages.stats.likelihood import TracedModel
from jacana.stages.stats.objectives import OBJECTIVES

#: target for one compiled ``value_and_grad`` on CPU (issue: sigma_mu and z0 under 5 ms)
TARGET_MS = {"sigma_mu": 5.0, "z0": 5.0}
#: pyhf's upper limit scans many hypothesis tests (minutes on the AGC-like model): timed once
SLOW_PYHF = ("upper_limit",)


def _times(fn, repeats):
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return times, out


def _median_time(fn, repeats):
    times, out = _times(fn, repeats)
    return float(np.median(times)), out


#: MINUIT's covariance is flagged accurate where every one of these flags of its ``FunctionMinimum``
#: has the value given here (the bench reports them beside the HESSE value it does not use).
MINUIT_COVARIANCE_FLAGS = {"is_valid": True, "has_accurate_covar": True, "has_posdef_covar": True,
                           "has_made_posdef_covar": False, "hesse_failed": False}
#: The scan's crossings are found to this fraction of the POI's uncertainty.
SCAN_XTOL = 1e-4


def minuit_covariance(fmin) -> dict:
    """MINUIT's covariance flags (:data:`MINUIT_COVARIANCE_FLAGS`) of an iminuit ``FunctionMinimum``:
    ``{"flags": {name: bool}, "accurate": bool, "bad": [names off their required value]}``."""
    flags = {name: bool(getattr(fmin, name)) for name in MINUIT_COVARIANCE_FLAGS}
    bad = [name for name, want in MINUIT_COVARIANCE_FLAGS.items() if flags[name] != want]
    return {"flags": flags, "accurate": not bad, "bad": bad}


def pyhf_asimov(model, poi_value: float = 1.0) -> np.ndarray:
    """pyhf's own Asimov data (main and auxiliary) at POI = ``poi_value``, nuisances nominal (numpy)."""
    pars = np.asarray(model.config.suggested_init(), dtype=np.float64)
    pars[model.config.poi_index] = poi_value
    return np.asarray(model.expected_data(pars), dtype=np.float64)


def pyhf_profile_scan(model, data, step: float) -> dict:
    """pyhf's own profile-likelihood scan of the POI (numpy backend, scipy fits): the free fit, then
    fixed-POI fits (``pyhf.infer.mle.fixed_poi_fit``) at the points Brent's method picks to find where
    ``Delta(-2 ln L)`` is 1 on each side, bracketed outwards from the best fit in steps of ``step``
    (doubling). Returns ``{"best", "down", "up", "half_width", "fits"}`` (a crossing beyond the POI's
    bound is None, and the half width then the one distance found)."""
    from scipy.optimize import brentq

    poi = model.config.poi_index
    lo, hi = model.config.suggested_bounds()[poi]
    best, twice_min = pyhf.infer.mle.fit(data, model, return_fitted_val=True)
    mu_hat, twice_min = float(best[poi]), float(twice_min)
    fits = 1

    def excess(mu):  # Delta(-2 ln L) - 1 of the profile at mu
        nonlocal fits
        fits += 1
        return float(pyhf.infer.mle.fixed_poi_fit(mu, data, model, return_fitted_val=True)[1]) - twice_min - 1.0

    crossings = {}
    for key, side in (("down", -1.0), ("up", 1.0)):
        inner, width, crossing = mu_hat, abs(step), None
        while True:
            outer = float(np.clip(mu_hat + side * width, lo, hi))
            value = excess(outer)
            if value > 0:
                crossing = brentq(excess, min(inner, outer), max(inner, outer), xtol=SCAN_XTOL * abs(step))
                break
            if outer in (lo, hi):
                break
            inner, width = outer, 2 * width
        crossings[key] = None if crossing is None else float(crossing)
    widths = [abs(c - mu_hat) for c in crossings.values() if c is not None]
    return {"best": mu_hat, **crossings, "half_width": float(np.mean(widths)) if widths else None, "fits": fits}


def minuit_hesse(model, data) -> dict:
    """pyhf's MINUIT fit of ``data`` with HESSE: ``{"sigma"`` (the POI's HESSE uncertainty), ``"flags",
    "accurate", "bad"}`` (:func:`minuit_covariance`), and ``"error"`` where MIGRAD failed."""
    poi = model.config.poi_index
    previous = pyhf.get_backend()
    pyhf.set_backend("numpy", "minuit")
    try:
        fitted, result = pyhf.infer.mle.fit(data, model, return_uncertainties=True, return_result_obj=True)
        return {"sigma": float(fitted[poi, 1]), **minuit_covariance(result.minuit.fmin)}
    except pyhf.exceptions.FailedMinimization as exc:
        fmin = getattr(getattr(exc.result, "minuit", None), "fmin", None)
        flags = minuit_covariance(fmin) if fmin is not None else {"flags": {}, "accurate": False, "bad": ["is_valid"]}
        return {"sigma": None, **flags, "error": f"MINUIT failed: {exc.result.message}"}
    finally:
        pyhf.set_backend(*previous)


def pyhf_sigma_mu_reference(model, data=None, minuit: dict | None = None) -> dict:
    """pyhf's own expected uncertainty on the POI: the half width of :func:`pyhf_profile_scan` of the
    Asimov data (POI = 1; ``data`` default :func:`pyhf_asimov`), stepping out by MINUIT's HESSE value.
    MINUIT's fit (:func:`minuit_hesse`, or ``minuit`` if given) is recorded, not used: its flags
    catch some of its failures, not all (docs/bench.md).

    ``{"value", "method": "pyhf profile scan", "minuit": {...}, "scan": {...}}``."""
    data = pyhf_asimov(model) if data is None else np.asarray(data, dtype=np.float64)
    minuit = minuit_hesse(model, data) if minuit is None else minuit
    lo, hi = model.config.suggested_bounds()[model.config.poi_index]
    step = minuit["sigma"] if minuit.get("sigma") and np.isfinite(minuit["sigma"]) else 0.05 * (hi - lo)
    previous = pyhf.get_backend()
    pyhf.set_backend("numpy")  # pyhf's default optimiser (scipy) for the scan's fits
    try:
        scan = pyhf_profile_scan(model, data, step)
    finally:
        pyhf.set_backend(*previous)
    value = float("nan") if scan["half_width"] is None else scan["half_width"]
    return {"value": value, "method": "pyhf profile scan", "minuit": minuit, "scan": scan}


def _pyhf_reference(name, spec, asimov1, asimov0, details: dict | None = None):
    """pyhf's own numpy computation of objective ``name``; returns a callable -> value (``details``
    receives what the last call found: for ``sigma_mu`` :func:`pyhf_sigma_mu_reference`'s record)."""
    model = pyhf.Workspace(spec).model()
    init, bounds, fixed = (
        model.config.suggested_init(),
        model.config.suggested_bounds(),
        model.config.suggested_fixed(),
    )
    details = {} if details is None else details
    if name == "sigma_mu":
        # pyhf's own Asimov data: the traced model's floored yields put 1e-10 events in bins numpy
        # pyhf expects none in, where its logpdf is -inf. MINUIT once, untimed: only the scan counts
        data = pyhf_asimov(model)
        minuit = minuit_hesse(model, data)

        def run():
            details.update(pyhf_sigma_mu_reference(model, data, minuit))
            return details["value"]
    elif name == "z0":
        def run():
            return float(np.sqrt(pyhf.infer.test_statistics.q0(0.0, asimov1, model, init, bounds, fixed)))
    elif name == "cls":
        def run():
            return float(pyhf.infer.hypotest(1.0, asimov0, model, return_expected=True)[1])
    elif name == "upper_limit":
        def run():
            return float(pyhf.infer.intervals.upper_limits.upper_limit(asimov0, model)[1][2])
    else:
        raise KeyError(name)
    return run


def _host_cpu_time(f, tm, y_host, repeats: int) -> float | None:
    """Median time of the jitted ``value_and_grad`` on the host CPU from host yields, when JAX's default
    device is an accelerator (None otherwise: it is then the figure itself)."""
    from jacana.facility.devices import likelihood_device

    cpu = likelihood_device("auto")
    if cpu is None:
        return None
    vg = jax.jit(jax.value_and_grad(lambda yy: f(tm, yy)))
    run = lambda: vg(jax.device_put(y_host, cpu))  # noqa: E731  (committed to the CPU: runs there)
    jax.block_until_ready(run())  # compile
    return _median_time(run, repeats)[0]


def bench_likelihood(workspace_spec, repeats: int = 20, pyhf_repeats: int = 3, objectives=None,
                     pyhf_slow_repeats: int = 1) -> dict:
    """Time the jitted ``value_and_grad`` of each objective and pyhf's numpy inference.

    Returns ``{name: {"value", "pyhf_value", "pyhf_method", "relative_difference", "compile_s",
    "jacana_vg_ms" (median), "jacana_vg_min_ms", "jacana_vg_host_input_ms", "pyhf_numpy_ms",
    "pyhf_repeats", "speedup", "grad_finite"}}``, plus ``"pyhf_minuit"`` (MINUIT's HESSE value and
    flags) and ``"pyhf_scan"`` for ``sigma_mu``, ``"target_ms"`` and ``"target_met"`` for the
    objectives with a target (:data:`TARGET_MS`), and prints a table and each comparison
    (:func:`comparison`). pyhf's upper limit (:data:`SLOW_PYHF`) and profile scan are timed
    ``pyhf_slow_repeats`` times (at most ``pyhf_repeats``).
    """
    pyhf.set_backend("numpy")
    tm = TracedModel.from_workspace(workspace_spec)
    y_host = tm.yields_template()
    # the yields as they reach the objective in the pipeline: device arrays (296 leaves on
    # the AGC-like model; passing them as numpy adds a host-to-device copy per leaf)
    y = jax.device_put(y_host)
    asimov1 = np.asarray(tm.asimov_data(y, 1.0))
    asimov0 = np.asarray(tm.asimov_data(y, 0.0))
    results = {}
    for name in objectives or OBJECTIVES:
        f = OBJECTIVES[name]
        details: dict = {}
        ref = _pyhf_reference(name, workspace_spec, asimov1, asimov0, details)
        # first: a model pyhf cannot fit fails fast; a profile scan (seconds to minutes) is slow
        first, ref_value = _times(ref, 1)
        slow = name in SLOW_PYHF or details.get("method") == "pyhf profile scan"
        n_ref = min(pyhf_repeats, pyhf_slow_repeats) if slow else pyhf_repeats
        more, _ = _times(ref, n_ref - 1) if n_ref > 1 else ([], None)
        t_ref = float(np.median(first + more))
        vg = jax.jit(jax.value_and_grad(lambda yy, f=f: f(tm, yy)))
        t0 = time.perf_counter()
        compiled = vg.lower(y).compile()
        compile_s = time.perf_counter() - t0
        compiled(y)  # warm-up
        times, (value, grad) = _times(lambda compiled=compiled: compiled(y), repeats)
        t_vg = float(np.median(times))
        t_host, _ = _median_time(lambda compiled=compiled: compiled(y_host), repeats)
        t_cpu = _host_cpu_time(f, tm, y_host, repeats)
        print(f"  {name}: compiled in {compile_s:.1f} s, v&g {1e3 * t_vg:.3f} ms, "
              f"pyhf {1e3 * t_ref:.1f} ms", flush=True)
        results[name] = {
            "value": float(value),
            "pyhf_value": float(ref_value),
            "compile_s": compile_s,
            "jacana_vg_ms": 1e3 * t_vg,
            "jacana_vg_min_ms": 1e3 * float(np.min(times)),
            "jacana_vg_host_input_ms": 1e3 * t_host,
            # on an accelerator: the same on the host's CPU, from host yields (the objective stage's
            # placement, facility.devices.likelihood_device); None on a CPU machine
            "jacana_vg_cpu_ms": None if t_cpu is None else 1e3 * t_cpu,
            "pyhf_numpy_ms": 1e3 * t_ref,
            "pyhf_repeats": n_ref,
            "pyhf_method": details.get("method", PYHF_METHODS[name]),
            "relative_difference": _relative(float(value), ref_value),
            "speedup": t_ref / t_vg,
            "grad_finite": bool(all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grad))),
        }
        if "minuit" in details:  # what MINUIT said, used or not
            results[name]["pyhf_minuit"] = details["minuit"]
        if "scan" in details:
            results[name]["pyhf_scan"] = details["scan"]
        if name in TARGET_MS:
            results[name]["target_ms"] = TARGET_MS[name]
            results[name]["target_met"] = bool(1e3 * t_vg < TARGET_MS[name])
    print(f"model: {len(tm.channels)} channels, {len(tm.samples)} samples, {tm.nmaindata} bins, "
          f"{tm.npars} parameters; JAX {jax.__version__} on {jax.devices()[0].platform}")
    print(f"{'objective':<12}{'value':>12}{'pyhf value':>12}{'compile s':>10}{'jacana v&g ms':>15}"
          f"{'(min)':>8}{'(numpy in)':>11}{'pyhf numpy ms':>15}{'ratio':>8}  target")
    for name, r in results.items():
        target = (f"< {r['target_ms']:g} ms: {'met' if r['target_met'] else 'MISSED'}"
                  if "target_ms" in r else "-")
        print(f"{name:<12}{r['value']:>12.6g}{r['pyhf_value']:>12.6g}{r['compile_s']:>10.1f}"
              f"{r['jacana_vg_ms']:>15.3f}{r['jacana_vg_min_ms']:>8.3f}{r['jacana_vg_host_input_ms']:>11.3f}"
              f"{r['pyhf_numpy_ms']:>15.1f}"
              f"{r['speedup']:>8.0f}  {target}")
    for name, r in results.items():
        print(f"{name}: {comparison(r)}")
    return results


#: what pyhf computes for each objective
PYHF_METHODS = {"sigma_mu": "pyhf profile scan", "z0": "pyhf q0 (scipy)", "cls": "pyhf hypotest (scipy)",
                "upper_limit": "pyhf upper_limit (scipy, TOMS748)"}
#: values within this relative difference agree (the bench rows flag larger ones)
AGREE_RTOL = 0.02


def _relative(value: float, reference) -> float | None:
    if reference is None or not np.isfinite(reference) or reference == 0:
        return None
    return float(abs(value - reference) / abs(reference))


def comparison(r: dict) -> str:
    """One row's values in plain words: ``jacana 0.14382, pyhf profile scan 0.14381: agree to 0.0064 %``
    (``they differ by ... %`` beyond :data:`AGREE_RTOL`), and for ``sigma_mu`` MINUIT's unused HESSE
    value with the flags that were off."""
    method = r.get("pyhf_method", "pyhf")
    rel = r.get("relative_difference", _relative(r["value"], r.get("pyhf_value")))
    if rel is None:
        verdict = "no pyhf value to compare with"
    elif rel <= AGREE_RTOL:
        verdict = f"agree to {100 * rel:.2g} %"
    else:
        verdict = f"they differ by {100 * rel:.3g} %"
    text = f"jacana {r['value']:.5g}, {method} {r.get('pyhf_value', float('nan')):.5g}: {verdict}"
    minuit = r.get("pyhf_minuit")
    if minuit:
        hesse = "failed" if minuit.get("sigma") is None else f"{minuit['sigma']:.5g}"
        if minuit.get("error"):
            flags = minuit["error"]
        elif minuit.get("accurate"):
            flags = "covariance flagged accurate"
        else:
            flags = "covariance flagged " + ", ".join(f"{flag}={minuit['flags'][flag]}" for flag in minuit["bad"])
        text += f" (MINUIT HESSE {hesse}, not used: {flags})"
    return text


def agc_like_workspace(seed: int = 1) -> dict:
    """An AGC-shaped workspace: 2 regions x 5 samples x 11 bins, NormPlusShape
    systematics (normsys + histosys sharing a name), ttbar modelling histosys,
    per-region staterror, luminosity and W+jets normsys; POI ttbar_norm in [0, 10]."""
    rng = np.random.default_rng(seed)
    x = np.linspace(130, 530, 11)
    shapes = {
        "ttbar": lambda r: 900 * r * np.exp(-(((x - 250) / 120) ** 2)),
        "single_top_s_chan": lambda r: 8 * r * np.exp(-x / 300),
        "single_top_t_chan": lambda r: 60 * r * np.exp(-x / 250),
        "single_top_tW": lambda r: 40 * r * np.exp(-(((x - 220) / 150) ** 2)),
        "wjets": lambda r: 300 * np.exp(-x / 150) / r,
    }
    channels = []
    for region, r in (("4j1b", 1.0), ("4j2b", 0.6)):
        samples = []
        for name, f in shapes.items():
            nom = f(r) * rng.uniform(0.9, 1.1, 11)
            mods = [
                {"name": "Luminosity", "type": "normsys", "data": {"hi": 1.03, "lo": 0.97}},
                {"name": f"staterror_{region}", "type": "staterror",
                 "data": (np.sqrt(nom) * rng.uniform(0.3, 0.6, 11)).tolist()},
            ]
            for sys in ("Jet_energy_scale", "Jet_energy_res", "b_tag_NP_1", "b_tag_NP_2",
                        "b_tag_NP_3", "b_tag_NP_4"):
                up = nom * rng.uniform(1.0, 1.08, 11)
                dn = 2 * nom - up
                mods.append({"name": sys, "type": "normsys",
                             "data": {"hi": float(up.sum() / nom.sum()), "lo": float(dn.sum() / nom.sum())}})
                mods.append({"name": sys, "type": "histosys",
                             "data": {"hi_data": (up * nom.sum() / up.sum()).tolist(),
                                      "lo_data": (dn * nom.sum() / dn.sum()).tolist()}})
            if name == "ttbar":
                mods.append({"name": "ttbar_norm", "type": "normfactor", "data": None})
                for sys in ("ME_variation", "PS_variation", "tt_scale_var"):
                    up = nom * rng.uniform(0.95, 1.06, 11)
                    mods.append({"name": sys, "type": "histosys",
                                 "data": {"hi_data": up.tolist(), "lo_data": (2 * nom - up).tolist()}})
            if name == "wjets":
                mods.append({"name": "W+jets_norm", "type": "normsys", "data": {"hi": 1.025, "lo": 0.975}})
            samples.append({"name": name, "data": nom.tolist(), "modifiers": mods})
        channels.append({"name": region, "samples": samples})
    return {
        "channels": channels,
        "observations": [{"name": c["name"], "data": [100.0] * 11} for c in channels],
        "measurements": [{"name": "ttbar", "config": {"poi": "ttbar_norm", "parameters": [
            {"name": "ttbar_norm", "bounds": [[0, 10]]}]}}],
        "version": "1.0.0",
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", help="pyhf workspace JSON (default: AGC-like model)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--pyhf-repeats", type=int, default=3)
    parser.add_argument("--pyhf-slow-repeats", type=int, default=1,
                        help="repeats of pyhf's upper limit (minutes each on the AGC-like model)")
    parser.add_argument("--objectives", nargs="*", default=None)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.workspace:
        with open(args.workspace) as fh:
            spec = json.load(fh)
    else:
        spec = agc_like_workspace()
    res = bench_likelihood(spec, repeats=args.repeats, pyhf_repeats=args.pyhf_repeats,
                           objectives=args.objectives, pyhf_slow_repeats=args.pyhf_slow_repeats)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
