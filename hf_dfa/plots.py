"""Figures of a `SweepAnalysis`, drawn with matplotlib's Agg canvas and saved as PNG and SVG."""

import os

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .analysis import SweepAnalysis
from .breakeven import required_saving

RULE_COLORS = {"bp": "tab:blue", "dfa": "tab:orange", "shallow": "tab:green"}
ALIGNMENT_METRICS = ("update_cos", "feedback_cos")


def _color(rule: str, index: int) -> str:
    return RULE_COLORS.get(rule, f"C{(index + 3) % 10}")


def _new_figure(ncols: int = 1) -> tuple[Figure, list]:
    figure = Figure(figsize=(6.4 * ncols, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return figure, axes


def plot_loss_vs_compute(analysis: SweepAnalysis) -> Figure:
    """Draw every run's eval curve (thin), each rule's frontier points and fitted frontier law (bold), log-log."""
    figure, (ax,) = _new_figure()
    for index, rule in enumerate(analysis.sweep.rules()):
        color = _color(rule, index)
        for compute, loss in analysis.curves(rule):
            keep = np.isfinite(compute) & (compute > 0)
            ax.plot(compute[keep], loss[keep], color=color, linewidth=0.7, alpha=0.35)

        frontier = analysis.frontiers.get(rule)
        if frontier is None or len(frontier.compute) == 0:
            continue
        ax.scatter(frontier.compute, frontier.loss, color=color, s=16, zorder=3, label=f"{rule} frontier")
        grid = np.geomspace(frontier.compute[0], frontier.compute[-1], 200)
        for form, style in (("saturating", "-"), ("power", "--")):
            fit = analysis.laws.get(rule, {}).get(form)
            if fit is None:
                continue
            if form == "saturating":
                label = f"{rule}: {fit.E:.3g} + ({fit.C_c:.2e}/C)^{fit.alpha:.3g}"
            else:
                label = f"{rule}: ({fit.C_c:.2e}/C)^{fit.alpha:.3g}"
            ax.plot(grid, fit.loss(grid), style, color=color, linewidth=2.2, label=label)

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(analysis.compute_label)
    ax.set_ylabel("eval loss (nats)")
    ax.set_title("Eval loss against compute")
    ax.legend(fontsize="small")
    return figure


def _final_tokens_at(runs, n_params: np.ndarray) -> np.ndarray:
    """Interpolate the runs' final token counts at `n_params`, linearly in log-log, constant beyond the ends."""
    by_size: dict[float, list[float]] = {}
    for run in runs:
        by_size.setdefault(run.n_params, []).append(run.final_point()[0])
    sizes = np.array(sorted(by_size))
    tokens = np.array([np.mean(by_size[n]) for n in sizes])
    return np.exp(np.interp(np.log(n_params), np.log(sizes), np.log(tokens)))


def plot_loss_vs_params(analysis: SweepAnalysis) -> Figure:
    """Draw every run's final eval loss against N, and each rule's parametric law at the runs' final D."""
    figure, (ax,) = _new_figure()
    for index, rule in enumerate(analysis.sweep.rules()):
        color = _color(rule, index)
        runs = analysis.sweep.runs_of(rule)
        ax.scatter(
            [run.n_params for run in runs],
            [run.final_point()[1] for run in runs],
            color=color,
            s=18,
            label=f"{rule} final loss",
        )

        fit = analysis.parametric.get(rule)
        selected = analysis.parametric_runs.get(rule, [])
        if fit is None or not selected:
            continue
        sizes = [run.n_params for run in selected]
        grid = np.geomspace(min(sizes) / 1.5, max(sizes) * 1.5, 200)
        label = f"{rule}: {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3g} + {fit.B:.3g}/D^{fit.beta:.3g}"
        ax.plot(grid, fit.predict(grid, _final_tokens_at(selected, grid)), color=color, linewidth=2.2, label=label)

    finals = [run.final_point()[1] for run in analysis.sweep.runs]
    if finals:
        # the fitted curves can shoot far past the data where a law is poorly constrained; keep the data in view
        ax.set_ylim(min(finals) / 1.25, max(finals) * 1.25)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final eval loss (nats)")
    ax.set_title("Final loss against model size (fit at each size's final D)")
    ax.legend(fontsize="small")
    return figure


def plot_breakeven(analysis: SweepAnalysis) -> Figure | None:
    """Draw DFA's required saving k(C) against C, with the plausible saving as a horizontal line."""
    be = analysis.breakeven
    if be is None:
        return None
    figure, (ax,) = _new_figure()
    saving = np.where(np.isfinite(be.saving), be.saving, np.nan)
    ax.plot(be.compute, saving, "o-", color=RULE_COLORS["dfa"], linewidth=2, label="required saving k(C)")
    if be.crossing is not None and be.crossing_extrapolated:
        bp, dfa = analysis.laws["bp"][analysis.breakeven_form], analysis.laws["dfa"][analysis.breakeven_form]
        extension = np.geomspace(be.compute[-1], be.crossing * 3, 100)
        extended = required_saving(bp, dfa, extension)
        ax.plot(
            extension,
            np.where(np.isfinite(extended), extended, np.nan),
            "--",
            color=RULE_COLORS["dfa"],
            label="extrapolated",
        )
    if not np.isfinite(saving).any():
        ax.text(
            0.5,
            0.75,
            "k(C) is infinite at every budget:\nBP's loss is below DFA's fitted irreducible loss",
            transform=ax.transAxes,
            ha="center",
            va="center",
        )
        ax.set_xlim(be.compute[0] / 1.5, be.compute[-1] * 1.5)
        ax.set_ylim(0.5, max(10.0, 4 * be.max_saving))
    ax.axhline(be.max_saving, color="black", linestyle="-", linewidth=1, label=f"plausible saving {be.max_saving:g}x")
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="k = 1 (equal compute)")

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(analysis.compute_label)
    ax.set_ylabel("k(C) = C_dfa(L_bp(C)) / C")
    ax.set_title(f"Break-even of DFA against BP: {be.outcome}")
    ax.legend(fontsize="small")
    return figure


def plot_alignment(analysis: SweepAnalysis) -> Figure | None:
    """Draw `alignment/block_{i}/update_cos` and `feedback_cos` against the step, one line per run and block."""
    if not analysis.has_alignment():
        return None
    figure, axes = _new_figure(ncols=len(ALIGNMENT_METRICS))
    n_blocks = max(
        (max(run.block_alignment(m), default=-1) + 1 for run in analysis.sweep.runs for m in ALIGNMENT_METRICS),
        default=1,
    )
    cmap = colormaps["viridis"]
    for ax, metric in zip(axes, ALIGNMENT_METRICS):
        labelled = set()
        for run in analysis.sweep.runs:
            for block, (steps, values) in run.block_alignment(metric).items():
                label = f"block {block}" if block not in labelled else None
                labelled.add(block)
                color = cmap(block / max(n_blocks - 1, 1))
                ax.plot(steps, values, color=color, linewidth=1, alpha=0.8, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(f"cosine ({metric})")
        ax.set_title(metric)
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
        if labelled:
            ax.legend(fontsize="small")
    return figure


def write_figures(analysis: SweepAnalysis, out_dir: str) -> list[str]:
    """Draw every figure that the analysis supports, save each as PNG and SVG in `out_dir`, and return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    figures = {
        "loss_vs_compute": plot_loss_vs_compute(analysis),
        "loss_vs_params": plot_loss_vs_params(analysis),
        "breakeven": plot_breakeven(analysis),
        "alignment": plot_alignment(analysis),
    }
    paths = []
    for name, figure in figures.items():
        if figure is None:
            continue
        for extension in ("png", "svg"):
            path = os.path.join(out_dir, f"{name}.{extension}")
            figure.savefig(path, dpi=150)
            paths.append(path)
    return paths
