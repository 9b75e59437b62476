"""Write a `SweepAnalysis` as `report.md` and `fits.json`."""

import json
import os

import numpy as np

from .analysis import EXPECTED_ORDER, SweepAnalysis, mean_alignment_by_rule

COMPUTE_EXPLANATIONS = {
    "counted": "Compute is the training FLOPs logged by each run, counted for the rule that was run, so DFA's "
    "cheaper steps are included.",
    "paper": "Compute is 6 · N · D for every rule, with N the non-embedding parameters and D the training tokens, "
    "so DFA's cheaper steps are not included.",
}


def write_fits_json(analysis: SweepAnalysis, out_dir: str) -> str:
    """Write every number of `analysis` to `fits.json` in `out_dir` and return the file's path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "fits.json")
    with open(path, "w") as f:
        json.dump(analysis.to_dict(), f, indent=2, allow_nan=False)
        f.write("\n")
    return path


def _g(value, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return "–" if value is None or np.isnan(value) else "∞"
    return f"{value:.{digits}g}"


def _with_interval(fit, name: str) -> str:
    value = _g(getattr(fit, name))
    if name in fit.intervals:
        low, high = fit.intervals[name]
        return f"{value} [{_g(low)}, {_g(high)}]"
    return value


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _frontier_section(analysis: SweepAnalysis, n_bootstrap: int) -> list[str]:
    lines = [
        "## Frontier laws",
        "",
        "The frontier of a rule is the lowest eval loss reached with at most a given compute by any of its runs. "
        "Two laws are fitted to it in log space: `power` is L(C) = (C_c / C)^alpha and `saturating` is "
        f"L(C) = E + (C_c / C)^alpha. Brackets give 95% bootstrap intervals over {n_bootstrap} resamples of the "
        "runs. "
        + (
            f"Every fit and the ordering use the eval points from {analysis.fit_from:g} of each run's final token "
            "count on (`--fit_from`); the earlier ones, near the initial loss or in the warm-up, are only drawn."
            if analysis.fit_from > 0
            else "Every fit and the ordering use all eval points (`--fit_from 0`)."
        ),
        "",
    ]
    rows = []
    for rule, forms in analysis.laws.items():
        n_runs = len(analysis.sweep.runs_of(rule))
        for form, fit in forms.items():
            rows.append(
                [
                    rule,
                    form,
                    _with_interval(fit, "C_c"),
                    _with_interval(fit, "alpha"),
                    _with_interval(fit, "E") if form == "saturating" else "0",
                    fit.n_points,
                    n_runs,
                    f"{fit.n_bootstrap}/{n_bootstrap}",
                    _g(fit.rmse_log),
                ]
            )
    if rows:
        header = [
            "rule",
            "law",
            "C_c (FLOPs)",
            "alpha",
            "E",
            "frontier points",
            "runs",
            "resamples fitted",
            "RMSE (log loss)",
        ]
        lines += _table(header, rows)
    else:
        lines += ["No frontier law could be fitted.", ""]
    return lines


def _parametric_section(analysis: SweepAnalysis) -> list[str]:
    lines = [
        "## Parametric law",
        "",
        "L(N, D) = E + A / N^alpha + B / D^beta, fitted per rule to every eval point of the runs at the learning rate "
        "with the lowest final loss for each size, by minimising the Huber loss (delta = 1e-3) of the log-loss "
        "residuals with L-BFGS-B from a grid of starts (approach 3 of Hoffmann et al., 2022).",
        "",
    ]
    rows = []
    for rule, fit in analysis.parametric.items():
        n_sizes = len({run.size for run in analysis.parametric_runs[rule]})
        rows.append([rule, _g(fit.E), _g(fit.A), _g(fit.alpha), _g(fit.B), _g(fit.beta), fit.n_points, n_sizes])
    if not rows:
        return lines + ["No parametric law could be fitted.", ""]
    lines += _table(["rule", "E", "A", "alpha", "B", "beta", "points", "sizes"], rows)

    rows = [
        [
            rule,
            _g(row["compute"]),
            _g(row["n_params"]),
            _g(row["tokens"]),
            _g(row["tokens"] / row["n_params"]),
            _g(row["loss"]),
        ]
        for rule, table in analysis.compute_optimal.items()
        for row in table
    ]
    if rows:
        lines += [
            "Compute-optimal allocation with C = 6 N D, from the fitted law (the largest budgets lie beyond "
            "the data):",
            "",
        ]
        lines += _table(["rule", "C (FLOPs)", "N_opt", "D_opt (tokens)", "D/N", "predicted loss"], rows)
    return lines


def _breakeven_section(analysis: SweepAnalysis) -> list[str]:
    lines = ["## Break-even of DFA against BP", ""]
    be = analysis.breakeven
    if be is None:
        return lines + [m for m in analysis.messages if m.startswith("break-even")] + [""]
    lines += [
        f"Laws used: `{analysis.breakeven_form}` frontier laws of bp and dfa. At each budget C in the range both "
        "frontiers cover, k(C) = C_dfa(L_bp(C)) / C is the factor by which DFA's compute would have to shrink to "
        "reach BP's loss L_bp(C). DFA counts as better at C when k(C) is at most the "
        f"plausible saving of {be.max_saving:g}x. k(C) is ∞ where L_bp(C) is below DFA's fitted irreducible loss.",
        "",
    ]
    if analysis.compute_mode == "counted":
        lines += [
            "With counted FLOPs, DFA's compute already includes the saving of its implementation, so k(C) ≤ 1 "
            "means DFA wins as measured.",
            "",
        ]
    rows = [
        [_g(c), _g(loss), _g(dfa_c), _g(s), "yes" if s <= be.max_saving else "no"]
        for c, loss, dfa_c, s in zip(be.compute, be.bp_loss, be.dfa_compute, be.saving)
    ]
    lines += _table(["C (FLOPs)", "L_bp(C)", "C_dfa(L_bp(C))", "k(C)", "DFA better"], rows)
    lines += [f"Outcome: **{be.outcome}**.", ""]
    return lines


def _extrapolation_section(analysis: SweepAnalysis) -> list[str]:
    lines = [
        "## Extrapolation check",
        "",
        "The parametric law is refitted without the largest size, and its prediction at that size's N and final D "
        "is compared with the final eval loss.",
        "",
    ]
    rows = [
        [
            rule,
            check["size"],
            _g(check["n_params"]),
            row["run"],
            _g(row["tokens"]),
            _g(row["predicted"], 4),
            _g(row["actual"], 4),
            f"{100 * row['relative_error']:+.1f}%",
        ]
        for rule, check in analysis.extrapolation.items()
        for row in check["runs"]
    ]
    if rows:
        lines += _table(["rule", "held-out size", "N", "run", "tokens", "predicted", "actual", "relative error"], rows)
    lines += [m for m in analysis.messages if "extrapolation check skipped" in m]
    return lines + [""]


def _ordering_section(analysis: SweepAnalysis) -> list[str]:
    lines = [
        "## Rule ordering at equal compute",
        "",
        f"Expected order by loss: {' < '.join(EXPECTED_ORDER)}. Losses are the lowest eval loss that the runs of a "
        "size reached with at most the given compute.",
        "",
    ]
    if not analysis.ordering:
        return lines + ["No size has runs of two rules over a common compute range.", ""]
    rules = [rule for rule in EXPECTED_ORDER if any(rule in row["losses"] for row in analysis.ordering)]
    rows = [
        [row["size"], _g(row["compute"])]
        + [_g(row["losses"].get(rule), 4) for rule in rules]
        + [" < ".join(row["order"]), "yes" if not row["violations"] else "no"]
        for row in analysis.ordering
    ]
    lines += _table(["size", "C (FLOPs)", *rules, "observed order", "as expected"], rows)

    for row in analysis.ordering:
        if not row["violations"]:
            continue
        rates = "; ".join(
            f"{rule} {', '.join(_g(lr) for lr in lrs) or 'not recorded'}"
            for rule, lrs in row["learning_rates"].items()
        )
        sentence = (
            f"- Size {row['size']} at {_g(row['compute'])} FLOPs: {', '.join(row['violations'])} "
            f"(expected {' < '.join(row['expected'])}). Learning rates tried: {rates}."
        )
        for rule, metrics in row["mean_alignment"].items():
            means = ", ".join(f"{name} {value:.3f}" for name, value in sorted(metrics.items()))
            sentence += f" Mean alignment of {rule}: {means}."
        lines.append(sentence)
    return lines + [""]


def _runs_section(analysis: SweepAnalysis) -> list[str]:
    sweep = analysis.sweep
    lines = ["## Runs", "", f"{len(sweep.runs)} runs used, {len(sweep.excluded)} excluded.", ""]
    rows = []
    for run in sorted(sweep.runs, key=lambda run: (run.rule, run.n_params, str(run.seed), run.path)):
        tokens, loss = run.final_point()
        status = f"{run.status} (partial)" if run.partial else run.status
        rows.append(
            [
                os.path.relpath(run.path, sweep.directory),
                run.size,
                _g(run.n_params),
                run.rule,
                run.seed,
                _g(run.learning_rate) if run.learning_rate is not None else "–",
                status,
                len(run.eval_loss),
                _g(tokens),
                _g(loss, 4),
            ]
        )
    header = [
        "run",
        "size",
        "N",
        "rule",
        "seed",
        "learning rate",
        "status",
        "eval points",
        "final tokens",
        "final loss",
    ]
    lines += _table(header, rows)
    if sweep.excluded:
        lines += ["Excluded from the fits:", ""]
        lines += _table(["run", "reason"], [[os.path.relpath(p, sweep.directory), r] for p, r in sweep.excluded])
    if analysis.messages:
        lines += ["Fit messages:", ""] + [f"- {message}" for message in analysis.messages] + [""]
    if sweep.warnings:
        lines += ["Warnings while reading the records:", ""] + [f"- {warning}" for warning in sweep.warnings] + [""]
    return lines


def write_report(analysis: SweepAnalysis, out_dir: str, figures: list[str], n_bootstrap: int) -> str:
    """Write `report.md` to `out_dir` and return its path.

    Args:
        analysis (`SweepAnalysis`): the fits to report.
        out_dir (`str`): output directory, created if missing.
        figures (`list[str]`): paths of the PNG figures to embed.
        n_bootstrap (`int`): number of bootstrap resamples requested for the frontier laws.
    """
    lines = [
        f"# Scaling fits of {analysis.sweep.directory}",
        "",
        f"{COMPUTE_EXPLANATIONS[analysis.compute_mode]} Axis label: {analysis.compute_label}.",
        "",
        "## Conclusion",
        "",
        analysis.conclusion,
        "",
    ]
    lines += _frontier_section(analysis, n_bootstrap)
    lines += _parametric_section(analysis)
    lines += _breakeven_section(analysis)
    lines += _extrapolation_section(analysis)
    lines += _ordering_section(analysis)
    if analysis.has_alignment():
        lines += [
            "## Alignment",
            "",
            "`alignment.png` plots, against the step and for each run and block i, `alignment/block_{i}/update_cos` "
            "(cosine between the block's DFA gradient and its BP gradient) and `alignment/block_{i}/feedback_cos` "
            "(cosine between the feedback B_i e at the block's output and the true gradient there).",
            "",
        ]
        for rule, metrics in mean_alignment_by_rule(analysis.sweep.runs).items():
            means = ", ".join(f"{name} {value:.3f}" for name, value in sorted(metrics.items()))
            lines += [f"- Mean over the runs, blocks and steps of {rule}: {means}."]
        lines += [""]
    if figures:
        lines += ["## Figures", ""]
        for path in figures:
            name = os.path.relpath(path, out_dir)
            lines += [f"![{os.path.splitext(name)[0]}]({name})", ""]
    lines += _runs_section(analysis)

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path
