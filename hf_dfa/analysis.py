"""Apply the scaling fits to a sweep: frontier and parametric laws per rule, break-even, extrapolation and ordering.

`analyse_sweep` fits, per rule, the frontier laws and the parametric law, computes DFA's break-even against BP,
refits without the largest size to check extrapolation, and compares the rules at equal compute per size.
`hf_dfa.report` writes the results.
"""

import logging
from dataclasses import dataclass, field

import numpy as np

from .breakeven import BreakEven, break_even
from .scaling import (
    FitError,
    Frontier,
    ParametricFit,
    PowerLawFit,
    compute_frontier,
    compute_optimal,
    fit_frontier,
    fit_parametric,
)
from .sweep_reader import KNOWN_RULES, Run, Sweep

logger = logging.getLogger(__name__)

# Expected order of the rules by loss at equal compute, lowest first.
EXPECTED_ORDER = KNOWN_RULES
COMPUTE_LABELS = {"counted": "training FLOPs (counted)", "paper": "FLOPs (6·N·D)"}
N_BREAKEVEN_BUDGETS = 9
N_ORDERING_BUDGETS = 3
# Eval points before this fraction of a run's final token count are left out of the fits: the loss there is still
# near its initial value or falling through the warm-up transient, which no power law of compute describes.
DEFAULT_FIT_FROM = 0.1
# A run whose final eval loss is this fraction above its best one is reported: its loss rose without becoming NaN.
LOSS_RISE_TOLERANCE = 0.05


@dataclass
class SweepAnalysis:
    """All fits of one sweep, with the messages of the fits that could not be made."""

    sweep: Sweep
    compute_mode: str
    max_saving: float
    fit_from: float = DEFAULT_FIT_FROM
    frontiers: dict[str, Frontier] = field(default_factory=dict)
    laws: dict[str, dict[str, PowerLawFit]] = field(default_factory=dict)  # rule -> form -> fit
    parametric: dict[str, ParametricFit] = field(default_factory=dict)
    parametric_runs: dict[str, list[Run]] = field(default_factory=dict)
    compute_optimal: dict[str, list[dict]] = field(default_factory=dict)
    breakeven: BreakEven | None = None
    breakeven_form: str | None = None
    extrapolation: dict[str, dict] = field(default_factory=dict)
    ordering: list[dict] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    conclusion: str = ""

    @property
    def compute_label(self) -> str:
        return COMPUTE_LABELS[self.compute_mode]

    def curves(self, rule: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Return `(compute, eval_loss)` of every run of `rule`, in the analysis' compute mode."""
        return [(run.compute(self.compute_mode), run.eval_loss) for run in self.sweep.runs_of(rule)]

    def fitted_points(self, run: Run) -> np.ndarray:
        """Return the mask of `run`'s eval points that the fits use: those at `fit_from` of its tokens or later."""
        return run.tokens >= self.fit_from * run.tokens[-1]

    def fit_curves(self, runs: list[Run]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Return `(compute, eval_loss)` of each of `runs`, restricted to the points the fits use."""
        curves = []
        for run in runs:
            keep = self.fitted_points(run)
            curves.append((run.compute(self.compute_mode)[keep], run.eval_loss[keep]))
        return curves

    def has_alignment(self) -> bool:
        return any(run.block_alignment("update_cos") or run.block_alignment("feedback_cos") for run in self.sweep.runs)

    def to_dict(self) -> dict:
        """Return every number of the analysis as JSON-compatible values, with None for NaN and infinity."""
        return _to_json(
            {
                "sweep": self.sweep.directory,
                "compute": self.compute_mode,
                "compute_label": self.compute_label,
                "max_saving": self.max_saving,
                "fit_from": self.fit_from,
                "conclusion": self.conclusion,
                "frontier_laws": {
                    rule: {f: fit.to_dict() for f, fit in forms.items()} for rule, forms in self.laws.items()
                },
                "frontiers": {
                    rule: {"compute": fr.compute.tolist(), "loss": fr.loss.tolist()}
                    for rule, fr in self.frontiers.items()
                },
                "parametric": {rule: fit.to_dict() for rule, fit in self.parametric.items()},
                "compute_optimal": self.compute_optimal,
                "breakeven": None
                if self.breakeven is None
                else {"form": self.breakeven_form, **self.breakeven.to_dict()},
                "extrapolation": self.extrapolation,
                "ordering": self.ordering,
                "messages": self.messages,
                "runs": [_run_summary(run) for run in self.sweep.runs],
                "excluded": [{"path": path, "reason": reason} for path, reason in self.sweep.excluded],
                "warnings": self.sweep.warnings,
            }
        )


def _to_json(value):
    """Convert numpy values to Python ones and non-finite floats to None, recursively."""
    if isinstance(value, dict):
        return {str(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_to_json(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _run_summary(run: Run) -> dict:
    tokens, loss = run.final_point()
    return {
        "path": run.path,
        "size": run.size,
        "n_params_non_embedding": run.n_params,
        "rule": run.rule,
        "seed": run.seed,
        "learning_rate": run.learning_rate,
        "status": run.status,
        "partial": run.partial,
        "eval_points": len(run.eval_loss),
        "final_tokens": tokens,
        "final_eval_loss": loss,
    }


def _note(analysis: SweepAnalysis, message: str) -> None:
    logger.info(message)
    analysis.messages.append(message)


def select_best_runs(runs: list[Run]) -> list[Run]:
    """Keep, for each size, the runs at the learning rate with the lowest mean final eval loss over seeds."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.size, run.learning_rate), []).append(run)
    best: dict[str, tuple[float, list[Run]]] = {}
    for (size, _), group in groups.items():
        mean_loss = float(np.mean([run.eval_loss[-1] for run in group]))
        if size not in best or mean_loss < best[size][0]:
            best[size] = (mean_loss, group)
    return sorted((run for _, group in best.values() for run in group), key=lambda run: (run.n_params, run.path))


def _parametric_points(analysis: SweepAnalysis, runs: list[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keeps = [analysis.fitted_points(run) for run in runs]
    N = np.concatenate([np.full(int(keep.sum()), run.n_params) for run, keep in zip(runs, keeps)])
    D = np.concatenate([run.tokens[keep] for run, keep in zip(runs, keeps)])
    loss = np.concatenate([run.eval_loss[keep] for run, keep in zip(runs, keeps)])
    return N, D, loss


def _check_loss_rises(analysis: SweepAnalysis) -> None:
    """Note every run whose final eval loss is more than `LOSS_RISE_TOLERANCE` above the best it reached."""
    for run in analysis.sweep.runs:
        if len(run.eval_loss) < 2:
            continue
        best = int(np.argmin(run.eval_loss))
        final = float(run.eval_loss[-1])
        lowest = float(run.eval_loss[best])
        if final > lowest * (1 + LOSS_RISE_TOLERANCE):
            _note(
                analysis,
                f"run {run.name}: the final eval loss {final:.4g} is {final / lowest - 1:.0%} above its best, "
                f"{lowest:.4g} at step {int(run.step[best])}. The loss rose without becoming NaN, so the run is "
                "not marked diverged. The compute frontier keeps only its lower points, but the parametric law "
                "fits every point of it. Check its learning rate.",
            )


def _fit_rule(analysis: SweepAnalysis, rule: str, n_bootstrap: int, seed: int) -> None:
    curves = analysis.fit_curves(analysis.sweep.runs_of(rule))
    analysis.frontiers[rule] = compute_frontier(curves)
    analysis.laws[rule] = {}
    for form in ("power", "saturating"):
        try:
            analysis.laws[rule][form] = fit_frontier(curves, form, n_bootstrap=n_bootstrap, seed=seed)
        except FitError as err:
            _note(analysis, f"{rule}: {form} frontier law skipped, because {err}")

    runs = select_best_runs(analysis.sweep.runs_of(rule))
    analysis.parametric_runs[rule] = runs
    try:
        fit = fit_parametric(*_parametric_points(analysis, runs))
    except FitError as err:
        _note(analysis, f"{rule}: parametric law skipped, because {err}")
        return
    analysis.parametric[rule] = fit

    frontier = analysis.frontiers[rule]
    if len(frontier.compute) and fit.alpha > 0 and fit.beta > 0:
        budgets = np.geomspace(frontier.compute[0], 100 * frontier.compute[-1], 5)
        n_opt, d_opt = compute_optimal(fit, budgets)
        analysis.compute_optimal[rule] = [
            {"compute": float(c), "n_params": float(n), "tokens": float(d), "loss": float(fit.predict(n, d))}
            for c, n, d in zip(budgets, n_opt, d_opt)
        ]


def _check_extrapolation(analysis: SweepAnalysis, rule: str) -> None:
    """Refit the parametric law without the largest size and compare its prediction with that size's final loss."""
    runs = analysis.parametric_runs.get(rule, [])
    largest = max((run.n_params for run in runs), default=None)
    smaller_runs = [run for run in runs if run.n_params != largest]
    held_out = [run for run in runs if run.n_params == largest]
    if len({run.n_params for run in smaller_runs}) < 2:
        _note(analysis, f"{rule}: extrapolation check skipped, because it needs at least 3 sizes.")
        return
    try:
        fit = fit_parametric(*_parametric_points(analysis, smaller_runs))
    except FitError as err:
        _note(analysis, f"{rule}: extrapolation check skipped, because {err}")
        return

    rows = []
    for run in held_out:
        tokens, actual = run.final_point()
        predicted = float(fit.predict(run.n_params, tokens))
        rows.append(
            {
                "run": run.name,
                "tokens": tokens,
                "predicted": predicted,
                "actual": actual,
                "relative_error": (predicted - actual) / actual,
            }
        )
    analysis.extrapolation[rule] = {
        "size": held_out[0].size,
        "n_params": largest,
        "fit_without_largest": fit.to_dict(),
        "runs": rows,
        "mean_abs_relative_error": float(np.mean([abs(row["relative_error"]) for row in rows])),
    }


def _best_loss_at(frontier: Frontier, budget: float) -> float:
    reached = frontier.loss[frontier.compute <= budget * (1 + 1e-12)]
    return float(reached.min()) if reached.size else float("nan")


def _check_ordering(analysis: SweepAnalysis) -> None:
    """Compare, per size and at common budgets, the rules' best losses with the expected order bp < dfa < shallow."""
    sizes = sorted({(run.n_params, run.size) for run in analysis.sweep.runs})
    for n_params, size in sizes:
        runs = [run for run in analysis.sweep.runs if run.size == size]
        rules = [rule for rule in EXPECTED_ORDER if any(run.rule == rule for run in runs)]
        if len(rules) < 2:
            continue
        frontiers = {
            rule: compute_frontier(analysis.fit_curves([r for r in runs if r.rule == rule])) for rule in rules
        }
        if any(len(fr.compute) == 0 for fr in frontiers.values()):
            continue
        low = max(fr.compute[0] for fr in frontiers.values())
        high = min(fr.compute[-1] for fr in frontiers.values())
        if low > high:
            _note(analysis, f"size {size}: the rules' compute ranges do not overlap, so they are not compared.")
            continue

        for budget in np.unique(np.geomspace(low, high, N_ORDERING_BUDGETS)):
            losses = {rule: _best_loss_at(frontiers[rule], budget) for rule in rules}
            violations = [(a, b) for a, b in zip(rules, rules[1:]) if losses[a] > losses[b]]
            row = {
                "size": size,
                "n_params": n_params,
                "compute": float(budget),
                "losses": losses,
                "order": sorted(rules, key=lambda rule: losses[rule]),
                "expected": rules,
                "violations": [f"{b} < {a}" for a, b in violations],
            }
            if violations:
                row["learning_rates"] = {
                    rule: sorted({r.learning_rate for r in runs if r.rule == rule and r.learning_rate is not None})
                    for rule in rules
                }
                row["mean_alignment"] = mean_alignment_by_rule([r for r in runs if r.alignment])
            analysis.ordering.append(row)


def mean_alignment_by_rule(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Return `{rule: {metric: mean}}`, averaging each run's mean alignment over the runs of a rule."""
    per_rule: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for metric, value in run.mean_alignment().items():
            per_rule.setdefault(run.rule, {}).setdefault(metric, []).append(value)
    return {rule: {m: float(np.mean(v)) for m, v in metrics.items()} for rule, metrics in per_rule.items()}


def _breakeven(analysis: SweepAnalysis) -> None:
    if "bp" not in analysis.laws or "dfa" not in analysis.laws:
        _note(analysis, "break-even skipped, because it needs runs of both bp and dfa.")
        return
    form = next((f for f in ("saturating", "power") if f in analysis.laws["bp"] and f in analysis.laws["dfa"]), None)
    if form is None:
        _note(analysis, "break-even skipped, because bp and dfa have no frontier law of the same form.")
        return
    bp, dfa = analysis.frontiers["bp"], analysis.frontiers["dfa"]
    low, high = max(bp.compute[0], dfa.compute[0]), min(bp.compute[-1], dfa.compute[-1])
    if not low < high:
        _note(
            analysis,
            f"break-even skipped, because the bp and dfa frontiers share no compute range "
            f"(bp {bp.compute[0]:.3g} to {bp.compute[-1]:.3g}, dfa {dfa.compute[0]:.3g} to "
            f"{dfa.compute[-1]:.3g} FLOPs).",
        )
        return
    budgets = np.geomspace(low, high, N_BREAKEVEN_BUDGETS)
    analysis.breakeven_form = form
    analysis.breakeven = break_even(
        analysis.laws["bp"][form], analysis.laws["dfa"][form], budgets, analysis.max_saving
    )


def _saving_range(saving: np.ndarray) -> str:
    low, high = f"{saving.min():.3g}x", f"{saving.max():.3g}x"
    return low if low == high else f"{low} to {high}"


def conclusion_sentence(analysis: SweepAnalysis) -> str:
    """Build the conclusion from the break-even numbers: the outcome, then the savings that support it."""
    be = analysis.breakeven
    if be is None:
        reasons = [m for m in analysis.messages if m.startswith("break-even")]
        return "No conclusion on DFA against BP: " + (reasons[0] if reasons else "no break-even was computed.")

    unit = analysis.compute_label
    plausible = f"the plausible saving of {be.max_saving:g}x"
    finite = np.isfinite(be.saving)
    # k(C) is infinite where BP's loss is below DFA's irreducible loss, which happens only at the high budgets
    unreachable = ""
    if not finite.all():
        e_dfa = analysis.laws["dfa"][analysis.breakeven_form].E
        unreachable = f" BP's loss there is below DFA's fitted irreducible loss E = {e_dfa:.3g}."

    if be.outcome in ("DFA better at scale", "BP better at scale"):
        sentence = (
            f"{be.outcome}: to reach BP's loss, DFA needs {be.saving[0]:.3g}x BP's compute at {be.compute[0]:.3g} "
            f"{unit}"
        )
        if finite[-1]:
            sentence += f" and {be.saving[-1]:.3g}x at {be.compute[-1]:.3g}."
        else:
            sentence += f" and cannot reach it at {be.compute[-1]:.3g}."
        if be.crossing is not None:
            sentence += f" The required saving crosses {plausible} at {be.crossing:.3g} FLOPs."
        return sentence + unreachable

    relation = "at most" if be.outcome == "DFA better everywhere" else "more than"
    sentence = f"{be.outcome}: from {be.compute[0]:.3g} to {be.compute[-1]:.3g} {unit}, "
    if finite.all():
        sentence += f"DFA needs {_saving_range(be.saving)} BP's compute to reach BP's loss, {relation} {plausible}."
    elif finite.any():
        sentence += (
            f"DFA needs {_saving_range(be.saving[finite])} BP's compute to reach BP's loss up to "
            f"{be.compute[finite][-1]:.3g}, {relation} {plausible}, and cannot reach it above that."
        )
    else:
        sentence += "DFA cannot reach BP's loss."
    sentence += unreachable

    if be.crossing is not None and be.crossing_extrapolated:
        sentence += (
            f" If the fitted laws hold beyond the data, the required saving reaches {be.max_saving:g}x at "
            f"{be.crossing:.3g} FLOPs."
        )
    elif be.outcome == "BP better everywhere" and be.trend < 0:
        sentence += (
            f" The required saving falls with compute but stays above {be.max_saving:g}x up to {be.horizon:g}x the "
            "largest budget."
        )
    return sentence


def analyse_sweep(
    sweep: Sweep,
    compute: str = "counted",
    max_saving: float = 1.5,
    n_bootstrap: int = 200,
    seed: int = 0,
    fit_from: float = DEFAULT_FIT_FROM,
) -> SweepAnalysis:
    """Fit the scaling laws of every rule in `sweep` and compare DFA with BP.

    Args:
        sweep (`Sweep`): runs read by `hf_dfa.sweep_reader.load_sweep`.
        compute (`str`, defaults to `"counted"`): `"counted"` uses the FLOPs logged for the rule that was run,
            `"paper"` uses 6 * N * D for every rule.
        max_saving (`float`, defaults to 1.5): the largest saving factor of DFA's compute considered plausible.
        n_bootstrap (`int`, defaults to 200): resamples of the runs for the frontier laws' intervals.
        seed (`int`, defaults to 0): seed of the bootstrap.
        fit_from (`float`, defaults to 0.1): eval points before this fraction of each run's final token count are
            left out of every fit and of the ordering; 0 keeps all.
    """
    if compute not in COMPUTE_LABELS:
        raise ValueError(f"`compute` must be one of {', '.join(COMPUTE_LABELS)}, got {compute!r}.")
    if not max_saving > 0:
        raise ValueError(f"`max_saving` must be positive, got {max_saving}.")
    if n_bootstrap < 0:
        raise ValueError(f"`n_bootstrap` must be 0 or positive, got {n_bootstrap}.")
    if not 0 <= fit_from < 1:
        raise ValueError(f"`fit_from` must be at least 0 and below 1, got {fit_from}.")

    analysis = SweepAnalysis(sweep, compute, max_saving, fit_from)
    if compute == "counted":
        missing = [run.name for run in sweep.runs if np.isnan(run.flops).any()]
        if missing:
            _note(
                analysis,
                f"eval points without `flops` are left out in runs {', '.join(missing)}; "
                "pass `--compute paper` to use 6 N D instead.",
            )
    _check_loss_rises(analysis)
    for rule in sweep.rules():
        _fit_rule(analysis, rule, n_bootstrap, seed)
        _check_extrapolation(analysis, rule)
    _breakeven(analysis)
    _check_ordering(analysis)
    analysis.conclusion = conclusion_sentence(analysis)
    return analysis
