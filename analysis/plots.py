"""Plots a physicist looks at (PNG, mplhep CMS style): the optimisation and its result."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

# No matplotlib.use() here: in Jupyter it would switch off inline figures. The CLI asks for Agg
# (MPLBACKEND); without a display matplotlib falls back to Agg by itself.
import matplotlib.pyplot as plt
import mplhep
import numpy as np

from jacana.facility.atomic import atomic_path
from jacana.stages.spec import NOMINAL, AnalysisSpec
from jacana.stages.stats.quiet import captured_output, one_line

def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically, close it, and return ``path``."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def objective_label(objective: str, poi: str | None = None) -> str:
    """What a physicist calls an objective: sigma_mu is the expected uncertainty of the POI."""
    poi_text = poi.replace("_", " ") if poi else "POI"
    names = {"sigma_mu": rf"expected $\sigma$({poi_text})", "z0": "expected discovery significance $Z_0$",
             "cls": "expected CL$_s$", "upper_limit": "expected upper limit on the POI"}
    return names.get(objective, objective)


def objective_history(history: Sequence[Mapping], objective: str, path: Path, selected: Mapping | None = None,
                      held_out: tuple[float, float] | None = None, poi: str | None = None) -> Path:
    """Objective per step: relaxed (every step) and hard (where evaluated); the kept step, and the held-out
    hard values before and after (``held_out``) at the first and kept steps."""
    plt.style.use(mplhep.style.CMS)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["objective"] for h in history], label="relaxed (training)", color="#3f90da")
    hard = [(h["step"], h["hard_objective"]) for h in history if h.get("hard_objective") is not None]
    if hard:
        ax.plot(*zip(*hard), "o", label="hard limit (training)", color="#e42536")
    kept = selected.get("step") if selected else None
    if kept is not None:
        ax.axvline(min(kept, steps[-1]) if steps else kept, color="0.3", linestyle=":", label=f"kept: step {kept}")
    if held_out is not None and steps:
        ax.plot([steps[0], kept if kept is not None else steps[-1]], held_out, "s", color="k", markersize=8,
                label=f"held-out: {held_out[0]:.4g} $\\to$ {held_out[1]:.4g}")
    ax.set_xlabel("step")
    ax.set_ylabel(objective_label(objective, poi), fontsize=18)
    ax.legend(fontsize=12)
    return save_figure(fig, path)


def parameter_trajectories(history: Sequence[Mapping], spec: AnalysisSpec, path: Path) -> Path:
    """Each tunable parameter against the step, with its bounds and the AGC starting point."""
    plt.style.use(mplhep.style.CMS)
    names = list(spec.parameters)
    edge_keys = [k for k in (history[0]["params"] if history else {}) if k.startswith("edges_")]
    rows = len(names) + len(edge_keys)
    fig, axes = plt.subplots(rows, 1, figsize=(8, 2.4 * rows), sharex=True)
    axes = np.atleast_1d(axes)
    steps = [h["step"] for h in history]
    for ax, name in zip(axes, names):
        p = spec.parameters[name]
        ax.plot(steps, [h["params"][name] for h in history], color="#832db6")
        ax.axhline(p.value, ls=":", color="gray", label="start")
        ax.set_ylabel(f"{name}\n[{p.unit}]" if p.unit else name, fontsize=12)
        ax.tick_params(labelsize=11)
    for ax, key in zip(axes[len(names):], edge_keys):  # one line per bin edge: bins narrowing or widening
        ax.plot(steps, np.asarray([h["params"][key] for h in history]), color="#3f90da", lw=1)
        ax.set_ylabel(f"{key}\n(bin edges)", fontsize=12)
        ax.tick_params(labelsize=11)
    axes[-1].set_xlabel("step")
    return save_figure(fig, path)


def stacked_histograms(spec: AnalysisSpec, hists: Mapping, path: Path, title: str = "",
                       observations: Mapping | None = None) -> Path:
    """Stacked nominal templates of every region (and the pseudo-data as points)."""
    plt.style.use(mplhep.style.CMS)
    regions = list(spec.regions)
    fig, axes = plt.subplots(1, len(regions), figsize=(7.5 * len(regions), 6.5))
    axes = np.atleast_1d(axes)
    order = sorted(spec.samples, key=lambda s: float(np.sum(hists[regions[0]][s][NOMINAL]["sumw"])))
    for ax, region in zip(axes, regions):
        edges = np.asarray(hists[region][order[0]][NOMINAL]["edges"])
        mplhep.histplot([np.asarray(hists[region][s][NOMINAL]["sumw"]) for s in order], edges, ax=ax, stack=True,
                        histtype="fill", label=[spec.samples[s].get("label", s) for s in order],
                        color=[spec.samples[s].get("color") for s in order])
        if observations is not None:
            centres = 0.5 * (edges[1:] + edges[:-1])
            obs = np.asarray(observations[region])
            ax.errorbar(centres, obs, yerr=np.sqrt(np.maximum(obs, 0)), fmt="ko", label="pseudo-data")
        ax.set_xlabel(spec.observable_label(spec.regions[region].observable))
        ax.set_ylabel("events / bin")
        ax.set_title(f"{region} {title}".strip(), fontsize=16)
        ax.legend(fontsize=12)
    return save_figure(fig, path)


def impact_ranking(impacts: Sequence[Mapping], poi: str, path: Path, top: int = 15) -> Path:
    """Nuisance-parameter impacts on the POI (post-fit +/-1 sigma), largest first."""
    plt.style.use(mplhep.style.CMS)
    rows = [r for r in impacts if r["up"] is not None and r["down"] is not None]  # failed refits are left out
    rows = sorted(rows, key=lambda r: max(abs(r["up"]), abs(r["down"])), reverse=True)[:top][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 2))
    y = np.arange(len(rows))
    ax.barh(y, [r["up"] for r in rows], color="#3f90da", label=r"$+1\sigma$")
    ax.barh(y, [r["down"] for r in rows], color="#e42536", alpha=0.7, label=r"$-1\sigma$")
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=11)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(rf"$\Delta$ {poi}")
    ax.legend(fontsize=11)
    return save_figure(fig, path)


def _experiment_label(ax, spec: AnalysisSpec, text: str = "") -> None:
    """The label physicists look for: who made it, "Simulation" (the data are pseudo-data), luminosity, energy."""
    mplhep.label.exp_label(exp="jacana", text=text, data=False, lumi=spec.luminosity_pb / 1000.0,
                           lumi_format="{0:.2f}", com=13, ax=ax, fontsize=15)


def data_mc_figure(spec: AnalysisSpec, region: str, edges, yields: Mapping[str, np.ndarray], total_unc,
                   data, stage: str, label: str = ""):
    """One region: the samples stacked, the total-model uncertainty band, the (pseudo-)data and a
    data / model ratio panel with the band's relative width (what a physicist reads first)."""
    plt.style.use(mplhep.style.CMS)
    edges = np.asarray(edges, np.float64)
    fig, (ax, rax) = plt.subplots(2, 1, figsize=(8, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1],
                                                                                    "hspace": 0.05})
    order = sorted(yields, key=lambda s: float(np.sum(yields[s])))
    mplhep.histplot([np.asarray(yields[s]) for s in order], edges, ax=ax, stack=True, histtype="fill",
                    label=[spec.samples[s].get("label", s) if s in spec.samples else s for s in order],
                    color=[spec.samples[s].get("color") if s in spec.samples else None for s in order])
    total = np.sum([np.asarray(yields[s]) for s in order], axis=0)
    unc = np.asarray(total_unc, np.float64)
    band = dict(step="post", facecolor="none", edgecolor="0.3", hatch="////", linewidth=0)
    ax.fill_between(edges, np.append(total - unc, 0), np.append(total + unc, 0), label="model uncertainty", **band)
    centres = 0.5 * (edges[1:] + edges[:-1])
    data = np.asarray(data, np.float64)
    ax.errorbar(centres, data, yerr=np.sqrt(np.maximum(data, 0)), fmt="ko", label="pseudo-data", markersize=5)
    ax.set_ylabel("events / bin")
    ax.set_ylim(0, 1.45 * max(float(np.max(total + unc)), float(np.max(data)), 1e-9))
    ax.legend(fontsize=12, ncol=2, loc="upper right", title=f"{region}, {stage}", title_fontsize=13)
    _experiment_label(ax, spec, label)
    safe = np.where(total > 0, total, 1.0)
    rel = np.where(total > 0, unc / safe, 0.0)
    rax.fill_between(edges, np.append(1 - rel, 1), np.append(1 + rel, 1), **band)
    ratio = np.where(total > 0, data / safe, np.nan)
    rax.errorbar(centres, ratio, yerr=np.where(total > 0, np.sqrt(np.maximum(data, 0)) / safe, 0), fmt="ko",
                 markersize=5)
    rax.axhline(1.0, color="0.4", linestyle="--", linewidth=1)
    rax.set_ylim(0.5, 1.5)
    rax.set_ylabel("data / model", fontsize=16)
    rax.set_xlabel(spec.observable_label(spec.regions[region].observable))
    fig.align_ylabels([ax, rax])
    return fig


def data_mc(spec: AnalysisSpec, workspace: Mapping, folder: Path, postfit: bool = True) -> dict:
    """Per region, pre-fit and post-fit data/MC plots of a workspace (``<folder>/data_mc_<region>_<stage>.png``).

    Yields and the total-model uncertainty (every nuisance parameter, with the fit's correlations post-fit)
    come from cabinetry's ``model_utils.prediction``; the post-fit plots are left out, with the reason in
    the returned ``{"paths": {...}, "postfit": None | "fit failed: ...", "minuit": "N messages: ..."}``, when
    its MINUIT fit fails; what MINUIT printed is captured into that one line.
    """
    import warnings

    import cabinetry
    import pyhf

    previous = pyhf.get_backend()  # cabinetry sets pyhf's backend globally: restored below
    try:
        model, data = cabinetry.model_utils.model_and_data(dict(workspace))
        n_main = sum(model.config.channel_nbins.values())
        predictions = [("pre-fit", cabinetry.model_utils.prediction(model))]
        why, messages = None, []
        if postfit:
            try:
                with warnings.catch_warnings(), captured_output() as messages:  # MINUIT prints from C++
                    warnings.simplefilter("ignore")
                    fit = cabinetry.fit.fit(model, data)
                predictions.append(("post-fit", cabinetry.model_utils.prediction(model, fit_results=fit)))
            except Exception as exc:  # noqa: BLE001 -- a failed fit leaves the pre-fit plots; the reason is kept
                why = f"fit failed: {type(exc).__name__}: {exc}"
        observed = np.asarray(data[:n_main], np.float64)
        paths = {}
        for stage, pred in predictions:
            start = 0
            for c, channel in enumerate(model.config.channels):
                nb = model.config.channel_nbins[channel]
                yields = {sample: np.asarray(pred.model_yields[c][k], np.float64)
                          for k, sample in enumerate(model.config.samples)}
                unc = np.asarray(pred.total_stdev_model_bins[c][-1], np.float64)  # the last entry: all samples
                edges = spec.regions[channel].edges if channel in spec.regions else np.arange(nb + 1)
                fig = data_mc_figure(spec, channel, edges, yields, unc, observed[start:start + nb], stage)
                key = f"{channel}_{stage.replace('-', '')}"
                paths[key] = str(save_figure(fig, Path(folder) / f"data_mc_{key}.png"))
                start += nb
        return {"paths": paths, "postfit": why, "minuit": one_line(messages)}
    finally:
        pyhf.set_backend(*previous)


def _cabinetry_pulls_ranking(workspace: Mapping, staterror: bool) -> dict:
    """cabinetry's MINUIT fit to the workspace's observations and the impacts on the POI, pre- and post-fit.

    The impacts follow ``cabinetry.fit.ranking``'s procedure (each parameter fixed at its best fit
    +- its pre-fit and post-fit uncertainty, every other one profiled, with ``cabinetry.fit.fit``)
    over the nuisance parameters only, staterror gammas too when ``staterror`` (one per bin: they
    would dominate the time), with the refits started from the best fit (cabinetry starts them
    from the nominal point, from which MINUIT wanders into negative rates on sparse templates, or
    stops early in the valley of the normalisation parameters: docs/statistics.md), and with each
    shift stopped at the parameter's bound (``clipped_at_bounds``). A refit that fails at strategy 1
    and 2 leaves its impact None and is named in ``failed_refits``; when the best fit itself fails,
    this raises what cabinetry raises (``FailedMinimization``).
    """
    import cabinetry
    import pyhf

    model, data = cabinetry.model_utils.model_and_data(dict(workspace))
    retried: list[str] = []
    fit = _fit_with_retry(cabinetry, model, data, None, None, retried, "best fit")
    labels = list(fit.labels)
    poi = model.config.poi_name
    i_poi = labels.index(poi)
    prefit = cabinetry.model_utils.prefit_uncertainties(model)
    fixed = list(model.config.suggested_fixed())
    bounds = model.config.suggested_bounds()
    impacts, clipped, failed = [], [], []
    for i, name in enumerate(labels):
        if i == i_poi or fixed[i] or (name.startswith("staterror") and not staterror):
            continue
        shifts = {}
        for key, width in (("prefit", prefit[i]), ("postfit", fit.uncertainty[i])):
            for side, sign in (("up", 1.0), ("down", -1.0)):
                if width == 0:  # unconstrained: no pre-fit impact (cabinetry's convention)
                    shifts[f"{key}_{side}"] = 0.0
                    continue
                init = [float(v) for v in fit.bestfit]
                # a gamma whose MC-statistical uncertainty exceeds 100% would be shifted below its bound,
                # which pyhf refuses (cabinetry 0.6 raises there): the shift stops at the bound, and is named
                wanted = init[i] + sign * float(width)
                init[i] = min(max(wanted, bounds[i][0]), bounds[i][1])
                if init[i] != wanted:
                    clipped.append(f"{name} {key} {side}: {wanted:.4g} -> {init[i]:.4g}")
                try:
                    refit = _fit_with_retry(cabinetry, model, data, init, [f or k == i for k, f in enumerate(fixed)],
                                            retried, f"{name} {key} {side}")
                except pyhf.exceptions.FailedMinimization as exc:
                    # one refit MINUIT cannot finish even at strategy 2 (on the AGC's 100k-event evaluation: a
                    # gamma with 184 % MC-statistical uncertainty held at its bound, 0): that impact is unknown
                    # (None, not drawn) and named; the others stay cabinetry's
                    failed.append(f"{name} {key} {side}: {exc}")
                    shifts[f"{key}_{side}"] = None
                    continue
                shifts[f"{key}_{side}"] = float(refit.bestfit[i_poi] - fit.bestfit[i_poi])
        impacts.append({"name": name, **shifts})
    centre, width = _widths(model)
    pulls = [{"name": n, "pull": float((fit.bestfit[i] - centre[i]) / width[i]),
              "constraint": float(fit.uncertainty[i] / width[i])}
             for i, n in enumerate(labels) if np.isfinite(width[i]) and not n.startswith("staterror")]
    return {"source": "cabinetry", "data": "observations", "poi": poi,
            "poi_fit": {"value": float(fit.bestfit[i_poi]), "uncertainty": float(fit.uncertainty[i_poi]),
                        "twice_nll": float(fit.best_twice_nll)},
            "pulls": pulls, "impacts": impacts, "strategy_2": retried, "clipped_at_bounds": clipped,
            "failed_refits": failed}


def _fit_with_retry(cabinetry, model, data, init, fix, retried: list, what: str):
    """``cabinetry.fit.fit``, once more with MINUIT's strategy 2 when MIGRAD stops invalid (on the AGC's
    1M-event workspace one refit of 44 ends with its EDM above the limit at strategy 1 and converges at 2);
    ``what`` goes into ``retried`` then. A second failure is raised."""
    import pyhf

    try:
        return cabinetry.fit.fit(model, data, init_pars=init, fix_pars=fix)
    except pyhf.exceptions.FailedMinimization:
        retried.append(what)
        return cabinetry.fit.fit(model, data, init_pars=init, fix_pars=fix, strategy=2)


def _widths(model) -> tuple[np.ndarray, np.ndarray]:
    from jacana.stages.stats.inference import constraint_widths

    return constraint_widths(model)


def _jacana_pulls_ranking(workspace: Mapping, staterror: bool) -> dict:
    """The fallback: jacana's post-fit impacts on Asimov data (:func:`~jacana.stages.stats.inference.impacts`)
    and the Asimov constraints (pulls are 0 there by construction; their bars show what the data constrain)."""
    from jacana.stages.stats.inference import (asimov_point, asimov_uncertainties, impacts, model_and_data,
                                               numpy_backend, par_names)

    with numpy_backend():
        model, _ = model_and_data(workspace)
        best = asimov_point(model, 1.0)
        unc = asimov_uncertainties(model, best)
        centre, width = _widths(model)
        names = par_names(model)
    pulls = [{"name": n, "pull": float((best[i] - centre[i]) / width[i]), "constraint": float(unc[i] / width[i])}
             for i, n in enumerate(names) if np.isfinite(width[i]) and not n.startswith("staterror")]
    rows = impacts(workspace, include_staterror=staterror)
    return {"source": "jacana", "data": "asimov", "poi": model.config.poi_name, "pulls": pulls,
            "impacts": [{"name": r["name"], "prefit_up": None, "prefit_down": None, "postfit_up": r["up"],
                         "postfit_down": r["down"]} for r in rows]}


def pull_plot(pulls: Sequence[Mapping], path: Path, title: str = "") -> Path:
    """Nuisance-parameter pulls ``(theta_hat - theta_0) / sigma_prefit`` with their post-fit
    constraints as error bars, on the +-1 and +-2 sigma bands (green, yellow)."""
    plt.style.use(mplhep.style.CMS)
    rows = list(pulls)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 2))
    y = np.arange(len(rows))
    ax.axvspan(-2, 2, color="#ffdd44", alpha=0.6, lw=0)
    ax.axvspan(-1, 1, color="#44bb44", alpha=0.6, lw=0)
    ax.axvline(0, color="0.3", ls="--", lw=1)
    ax.errorbar([r["pull"] for r in rows], y, xerr=[r["constraint"] for r in rows], fmt="ko", markersize=5)
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=11)
    ax.set_xlim(-3, 3)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel(r"$(\hat{\theta} - \theta_0) / \Delta\theta$")
    ax.set_title(title, fontsize=13)
    return save_figure(fig, path)


def impact_plot(impacts: Sequence[Mapping], pulls: Sequence[Mapping], poi: str, path: Path, top: int = 20,
                title: str = "") -> Path:
    """The ranking plot physicists know: the largest ``top`` impacts on the POI, sorted by post-fit size,
    pre-fit (open bars, when known) and post-fit (filled) for +1 and -1 sigma, with the pulls and
    constraints on a second axis over the +-1 sigma band. Failed refits (None) are left out."""
    plt.style.use(mplhep.style.CMS)
    rows = [r for r in impacts if r["postfit_up"] is not None and r["postfit_down"] is not None]
    rows = sorted(rows, key=lambda r: max(abs(r["postfit_up"]), abs(r["postfit_down"])), reverse=True)[:top][::-1]
    pull_of = {p["name"]: p for p in pulls}
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 2.5))
    y = np.arange(len(rows))
    for key, colour in (("up", "#3f90da"), ("down", "#e42536")):
        pre = [np.nan if r[f"prefit_{key}"] is None else r[f"prefit_{key}"] for r in rows]
        if not np.all(np.isnan(pre)):  # the known ones (a failed refit's is None: no bar)
            ax.barh(y, pre, fill=False, edgecolor=colour, lw=1.2, height=0.7,
                    label=rf"pre-fit $\theta = \hat\theta {'+' if key == 'up' else '-'} \Delta\theta$")
        ax.barh(y, [r[f"postfit_{key}"] for r in rows], color=colour, alpha=0.75, height=0.7,
                label=rf"post-fit $\theta = \hat\theta {'+' if key == 'up' else '-'} \sigma_{{\hat\theta}}$")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=11)
    ax.set_ylim(-0.6, len(rows) + 1.2)
    ax.set_xlabel(rf"$\Delta\hat{{\mu}}$ ({poi})")
    ax.legend(fontsize=10, loc="upper right", ncol=2)
    ax.set_title(title, fontsize=13)
    span = max([abs(v) for r in rows for v in (r["postfit_up"], r["postfit_down"], r["prefit_up"] or 0,
                                                 r["prefit_down"] or 0)] + [1e-9])
    ax.set_xlim(-1.3 * span, 1.3 * span)
    top_ax = ax.twiny()  # the pulls on their own axis, as cabinetry and TRExFitter draw them
    shown = [(k, pull_of[r["name"]]) for k, r in enumerate(rows) if r["name"] in pull_of]
    if shown:
        top_ax.errorbar([p["pull"] for _, p in shown], [k for k, _ in shown],
                        xerr=[p["constraint"] for _, p in shown], fmt="ko", markersize=4, label="pull")
    top_ax.axvline(-1, color="0.5", ls=":", lw=1)
    top_ax.axvline(1, color="0.5", ls=":", lw=1)
    top_ax.set_xlim(-2, 2)
    top_ax.set_xlabel(r"$(\hat{\theta} - \theta_0) / \Delta\theta$", fontsize=14)
    return save_figure(fig, path)


def pulls_and_ranking(workspace: Mapping, folder: Path, top: int = 20, staterror: bool = False) -> dict:
    """Pull and impact (ranking) plots of a workspace: ``<folder>/pulls.png``, ``<folder>/ranking.png``
    and the numbers in ``<folder>/impacts.json``.

    cabinetry first (``cabinetry.fit.fit`` to the workspace's observations; pre- and post-fit impacts
    as ``cabinetry.fit.ranking`` computes them); when one of its MINUIT fits fails, jacana's own post-fit impacts on
    Asimov data (:func:`~jacana.stages.stats.inference.impacts`). Staterror gammas are left out of the
    ranking unless ``staterror``. Returns ``{"paths", "source": "cabinetry"|"jacana", "why": None or
    why cabinetry was not used, "minuit": what MINUIT printed, in one line, "impacts", "pulls"}``.
    """
    import json
    import warnings

    import pyhf

    previous = pyhf.get_backend()  # cabinetry sets pyhf's backend globally: restored below
    why, messages = None, []
    try:
        try:
            with warnings.catch_warnings(), captured_output() as messages:  # MINUIT prints from C++
                warnings.simplefilter("ignore")
                made = _cabinetry_pulls_ranking(workspace, staterror)
        except Exception as exc:  # noqa: BLE001 -- a failed MINUIT fit: jacana's impacts instead, reason kept
            why = f"cabinetry: {type(exc).__name__}: {exc}"
            made = _jacana_pulls_ranking(workspace, staterror)
    finally:
        pyhf.set_backend(*previous)
    folder = Path(folder)
    label = "cabinetry, fit to pseudo-data" if made["source"] == "cabinetry" else "jacana, Asimov"
    paths = {"pulls": str(pull_plot(made["pulls"], folder / "pulls.png", title=label)),
             "ranking": str(impact_plot(made["impacts"], made["pulls"], made["poi"], folder / "ranking.png",
                                        top=top, title=label))}
    out = {**made, "why": why, "minuit": one_line(messages), "paths": paths}
    with atomic_path(folder / "impacts.json") as tmp:
        Path(tmp).write_text(json.dumps(out, indent=1))
    paths["impacts"] = str(folder / "impacts.json")
    return out
