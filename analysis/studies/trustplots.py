"""Plots for trusting an optimum (PNG, mplhep CMS style): the hard-scan landscape, the
multi-start spread, and the convergence of the gradient-free baselines."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping, Sequence

# no matplotlib.use(): it would switch off inline figures in Jupyter (the CLI asks for Agg)
import matplotlib.pyplot as plt
from matplotlib import patheffects
import mplhep
import numpy as np

from jacana.analysis.plots import save_figure  # noqa: E402
from jacana.stages.spec import AnalysisSpec  # noqa: E402


def _label(spec: AnalysisSpec, name: str) -> str:
    unit = spec.parameters[name].unit if name in spec.parameters else ""
    return f"{name} [{unit}]" if unit else name


#: colours of several gradient optima (one optimum is red)
_PALETTE = ("#e42536", "#832db6", "#e76300", "#a96b59", "#5790fc", "#92dadd", "#717581", "#b9ac70", "#f89c20")


def _markers(result: Mapping):
    """(label, params, sigma_mu, style, path) of the AGC point and each gradient optimum (open: worse
    than the grid's best beyond the noise; ``path``: its optimisation's steps, when known)."""
    out = []
    agc = result.get("agc")
    if agc:
        out.append(("config", agc["params"], agc.get("sigma_mu"), {"marker": "*", "color": "white", "ms": 20, "mec": "k"},
                    None))
    gradients = result.get("gradients") or []
    for i, g in enumerate(gradients):
        # its other cuts (or bin edges, network) may differ from the grid's: then it is a projection
        moved = g.get("other_params_differ_from_grid") or g.get("also_set")
        noise = g.get("bootstrap")
        beyond = bool(noise) and not noise["within_noise"]
        judged = "" if not noise else (", worse than the best beyond the noise" if beyond
                                       else ", within the noise of the best")
        name = "gradient optimum" if len(gradients) == 1 else g.get("label", f"optimum {i + 1}")
        color = _PALETTE[i % len(_PALETTE)]
        out.append((name + (" (other cuts differ)" if moved else "") + judged, g["params"], g.get("sigma_mu"),
                    {"marker": "D", "color": color, "ms": 11 if len(gradients) == 1 else 9,
                     "mec": color if beyond else "k", "mfc": "none" if beyond else color, "mew": 2.5 if beyond else 1},
                    g.get("path")))
    return out


def _bootstrap_grid(result: Mapping, field: str) -> np.ndarray | None:
    """A per-point bootstrap number of a scan (``sigma_mu_sd``, ``within_noise``) on the grid's shape; NaN where none."""
    if not result.get("within_noise_of_best"):
        return None
    out = np.full([a["n"] for a in result["parameters"]], np.nan)
    for p in result["points"]:
        value = (p.get("bootstrap") or {}).get(field)
        if value is not None:
            out[tuple(p["index"])] = float(value)
    return out


def _within_noise(result: Mapping) -> tuple | None:
    """(grid indices per axis of the points within the noise of the best, ..., legend label), or None."""
    within = _bootstrap_grid(result, "within_noise")
    if within is None or not np.nansum(within) > 0:
        return None
    return (*np.nonzero(within == 1),
            f"within the MC noise of the best ({result['within_noise_of_best']['z']:g} robust sd, paired)")


def _legend(ax, fontsize: int) -> None:
    """Inside the axes while it is short; below them, in two columns, once several optima would hide the map."""
    if len(ax.get_legend_handles_labels()[1]) <= 6:
        ax.legend(fontsize=fontsize, loc="best", framealpha=0.8)
    else:
        ax.legend(fontsize=fontsize - 1, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)


def scan_landscape(result: Mapping, spec: AnalysisSpec, path: Path) -> Path:
    """The hard expected sigma_mu over the scanned grid: a curve (1D) or a heat map (2D)."""
    plt.style.use(mplhep.style.CMS)
    axes = result["parameters"]
    sigma = np.asarray(result["sigma_mu"], dtype=float)
    best = result["best"]
    held = ", ".join(f"{k} {v:.3g}" for k, v in result.get("fixed_params", {}).items())
    if len(axes) == 1:
        a = axes[0]
        fig, ax = plt.subplots(figsize=(8.5, 6))
        std = _bootstrap_grid(result, "sigma_mu_sd")
        if std is not None:
            ax.fill_between(a["values"], sigma - std, sigma + std, color="#3f90da", alpha=0.25, lw=0,
                            label=f"+-1 robust sd per point ({result['within_noise_of_best']['replicas']} bootstrap replicas)")
        ax.plot(a["values"], sigma, "o-", color="#3f90da", label="hard scan (held-out)")
        within = _within_noise(result)
        if within is not None:
            on = within[0]
            ax.plot(np.asarray(a["values"])[on], sigma[on], "s", ms=11, mfc="none", mec="#ffa90e", mew=1.8, ls="none",
                    label=within[-1])
        ax.plot(best["params"][a["name"]], best["sigma_mu"], "o", color="#3f90da", ms=14, mfc="none", mew=2,
                label="grid best")
        for label, params, s, style, _ in _markers(result):
            if s is not None:
                ax.plot(params[a["name"]], s, ls="none", label=f"{label} ({s:.4f})", **style)
            ax.axvline(params[a["name"]], color=style["color"] if style["color"] != "white" else "gray", ls=":")
        ax.set_xlabel(_label(spec, a["name"]))
        ax.set_ylabel(r"expected $\sigma_\mu$ (pyhf)")
        _legend(ax, fontsize=12)
    else:
        a, b = axes
        fig, ax = plt.subplots(figsize=(9.5, 7.5))
        xs, ys = np.asarray(a["values"]), np.asarray(b["values"])

        def edges(v):
            if len(v) == 1:
                return np.array([v[0] - 0.5, v[0] + 0.5])
            mid = 0.5 * (v[1:] + v[:-1])
            return np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]])

        mesh = ax.pcolormesh(edges(xs), edges(ys), np.ma.masked_invalid(sigma.T), cmap="viridis_r", shading="flat")
        fig.colorbar(mesh, ax=ax, label=r"expected $\sigma_\mu$ (pyhf)")
        if np.isfinite(sigma).sum() >= 4 and min(sigma.shape) >= 2:
            lo = np.nanmin(sigma)
            levels = [lo * f for f in (1.01, 1.03, 1.1)]
            cs = ax.contour(xs, ys, sigma.T, levels=levels, colors="white", linewidths=1)
            ax.clabel(cs, fmt={lv: f"+{round(100 * (lv / lo - 1))}%" for lv in levels}, fontsize=10)
        within = _within_noise(result)
        if within is not None:
            ix, iy, label = within
            ax.plot(xs[ix], ys[iy], "s", ms=7, mfc="none", mec="#ffa90e", mew=1.5, ls="none", label=label)
        ax.plot(best["params"][a["name"]], best["params"][b["name"]], "o", ms=16, mfc="none", mec="white", mew=2.5,
                label=f"grid best ({best['sigma_mu']:.4f})",  # outlined: seen on the map and on a white legend
                path_effects=[patheffects.Stroke(linewidth=4.5, foreground="k"), patheffects.Normal()])
        for label, params, s, style, steps in _markers(result):
            if steps is not None:  # its steps, from where it began (a small circle; clipped to the map)
                xs_path, ys_path = steps[a["name"]], steps[b["name"]]
                ax.plot(xs_path, ys_path, "-", lw=1.2, color=style["color"], alpha=0.9)
                ax.plot(xs_path[0], ys_path[0], "o", ms=6, mfc="none", mec=style["color"], mew=1.5)
            ax.plot(params[a["name"]], params[b["name"]], ls="none",
                    label=f"{label}" + (f" ({s:.4f})" if s is not None else ""), **style)
        ax.set_xlim(edges(xs)[0], edges(xs)[-1])  # the map, not a start far outside it
        ax.set_ylim(edges(ys)[0], edges(ys)[-1])
        ax.set_xlabel(_label(spec, a["name"]))
        ax.set_ylabel(_label(spec, b["name"]))
        _legend(ax, fontsize=11)
    if held:
        ax.set_title(f"held: {held}", fontsize=11)
    return save_figure(fig, path)


def multistart_spread(starts: Sequence[Mapping], spec: AnalysisSpec, path: Path) -> Path:
    """Each start's initial -> final parameters (one panel per parameter) and its held-out sigma_mu."""
    plt.style.use(mplhep.style.CMS)
    ok = [s for s in starts if s.get("final_params")]
    names = [n for n in spec.parameters if all(n in s["final_params"] for s in ok)] if ok else list(spec.parameters)
    # a cut no start moves or starts elsewhere (held fixed, e.g. not in --free) gets no panel
    moved = [n for n in names if len({s["initial_params"][n] for s in starts}
                                     | {s["final_params"][n] for s in ok}) > 1]
    names = moved or names
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.6 * (len(names) + 1), 0.55 * max(len(starts), 4) + 2.5),
                             sharey=True)
    axes = np.atleast_1d(axes)
    ys = np.arange(len(starts))
    for ax, name in zip(axes, names):
        p = spec.parameters[name]
        for y, s in zip(ys, starts):
            x0 = s["initial_params"][name]
            if s.get("final_params"):
                x1 = s["final_params"][name]
                ax.annotate("", xy=(x1, y), xytext=(x0, y), arrowprops={"arrowstyle": "->", "color": "#832db6"})
                ax.plot(x1, y, "o", color="#832db6")
            ax.plot(x0, y, "o", mfc="none", color="gray")
        ax.axvline(p.value, color="gray", ls=":")
        ax.set_xlim(p.lower, p.upper)
        ax.set_xlabel(_label(spec, name), fontsize=12)
        ax.tick_params(labelsize=10)
    ax = axes[-1]
    for y, s in zip(ys, starts):
        before, after = s.get("heldout_sigma_mu_initial"), s.get("heldout_sigma_mu")
        if before is not None:
            ax.plot(before, y, "o", mfc="none", color="gray", label="start" if y == 0 else None)
        if after is not None:
            ax.plot(after, y, "o", color="#e42536", label="final" if y == 0 else None)
    ax.set_xlabel(r"held-out $\sigma_\mu$", fontsize=12)
    ax.tick_params(labelsize=10)
    ax.legend(fontsize=10)
    axes[0].set_yticks(ys, [f"start {s['start']}" for s in starts], fontsize=10)
    return save_figure(fig, path)


def baseline_convergence(rows: Sequence[Mapping], path: Path, reference: float | None = None) -> Path:
    """Best training-event sigma_mu so far against full passes, one line per method."""
    plt.style.use(mplhep.style.CMS)
    fig, ax = plt.subplots(figsize=(8.5, 6))
    for row in rows:
        trace = row.get("best_so_far") or []
        if trace:
            xs, ys = [t[0] for t in trace], [t[1] for t in trace]
            if row.get("passes") and row["passes"] > xs[-1]:  # flat to the end of its budget
                xs, ys = xs + [row["passes"]], ys + [ys[-1]]
            ax.step(xs, ys, where="post", label=f"{row['method']} ({row.get('passes', xs[-1])} passes)")
    if reference is not None:
        ax.axhline(reference, color="gray", ls=":", label="reference")
    ax.set_xlabel("full passes over the training events")
    ax.set_ylabel(r"best hard $\sigma_\mu$ so far (training events)")
    ax.legend(fontsize=12)
    return save_figure(fig, path)
