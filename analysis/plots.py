"""Plots a physicist looks at (PNG, mplhep CMS style): the optimisation and its result."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mplhep  # noqa: E402
import numpy as np  # noqa: E402

from jacana.facility.atomic import atomic_path  # noqa: E402
from jacana.stages.spec import NOMINAL, AnalysisSpec  # noqa: E402

AXIS_LABELS = {"ht": r"$H_T$ [GeV]", "m_bjj": r"$m_{bjj}$ [GeV]", "nn": "NN output"}


def axis_label(spec, observable: str) -> str:
    """The x-axis label of an observable: the config's ``label`` (general form), else a known one, else its name."""
    own = spec.raw.get("observables", {}).get(observable, {}).get("label") if spec.is_general else None
    return own or AXIS_LABELS.get(observable, observable)


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically, close it, and return ``path``."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def objective_history(history: Sequence[Mapping], objective: str, path: Path) -> Path:
    """Objective per step: relaxed (every step) and hard (where evaluated)."""
    plt.style.use(mplhep.style.CMS)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["objective"] for h in history], label="relaxed", color="#3f90da")
    hard = [(h["step"], h["hard_objective"]) for h in history if h.get("hard_objective") is not None]
    if hard:
        ax.plot(*zip(*hard), "o", label="hard limit", color="#e42536")
    ax.set_xlabel("step")
    ax.set_ylabel(objective)
    ax.legend()
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
        ax.set_xlabel(axis_label(spec, spec.regions[region].observable))
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
