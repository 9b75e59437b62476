"""Break-even of DFA against BP: the compute saving DFA needs to match BP's loss, from two frontier laws.

For a budget C, k(C) = C_dfa(L_bp(C)) / C is the factor by which DFA's compute would have to shrink to reach the
loss that BP's frontier law gives at C. `break_even` evaluates it over a grid of budgets and classifies the result.
"""

from dataclasses import dataclass

import numpy as np
from scipy import optimize

from .scaling import PowerLawFit

OUTCOMES = ("DFA better everywhere", "DFA better at scale", "BP better at scale", "BP better everywhere")


def required_saving(bp: PowerLawFit, dfa: PowerLawFit, compute):
    """Return k(C) = C_dfa(L_bp(C)) / C, the factor by which DFA's compute must shrink to match BP at budget C.

    k(C) < 1 means DFA already reaches BP's loss with less compute. k(C)
    is infinite where BP's loss is below DFA's irreducible term E. For two pure power laws
    L_bp = (Cb / C)^ab and L_dfa = (Cd / C)^ad, C_dfa(L) = Cd * L^(-1/ad), so

        k(C) = Cd * (Cb / C)^(-ab / ad) / C = (Cd / Cb^(ab / ad)) * C^(ab / ad - 1),

    which falls with C when DFA's exponent is larger (ad > ab) and rises when it is smaller.
    """
    compute = np.asarray(compute, dtype=float)
    return dfa.compute_for_loss(bp.loss(compute)) / compute


def classify_breakeven(saving, max_saving: float = 1.5) -> str:
    """Classify a break-even curve into one of `OUTCOMES`.

    DFA is better at a budget when its required saving k(C) is at most `max_saving`. The outcome compares the
    lowest and the highest budget: better at both ends is "everywhere", better only at the highest is "at scale".

    Args:
        saving (`array-like`): k(C) at increasing budgets C.
        max_saving (`float`, defaults to 1.5): the largest saving factor of DFA's compute considered plausible.
    """
    saving = np.asarray(saving, dtype=float)
    if saving.size == 0 or np.isnan(saving).any():
        raise ValueError(f"`saving` must be a non-empty array without NaN, got {saving}.")
    dfa_low, dfa_high = saving[0] <= max_saving, saving[-1] <= max_saving
    if dfa_low and dfa_high:
        return "DFA better everywhere"
    if dfa_high:
        return "DFA better at scale"
    if dfa_low:
        return "BP better at scale"
    return "BP better everywhere"


@dataclass
class BreakEven:
    """Required saving k(C) of DFA over a grid of budgets, and its classification.

    `crossing` is the budget where k(C) equals `max_saving`, searched up to `horizon` times the largest budget,
    and `crossing_extrapolated` is True when it lies above the largest budget. `trend` is the sign of
    d log s / d log C at the largest budget: -1 when DFA gains with compute, +1 when it loses, 0 when flat.
    """

    compute: np.ndarray
    bp_loss: np.ndarray
    dfa_compute: np.ndarray
    saving: np.ndarray
    max_saving: float
    outcome: str
    trend: int
    crossing: float | None
    crossing_extrapolated: bool
    horizon: float

    def to_dict(self) -> dict:
        return {
            "compute": self.compute.tolist(),
            "bp_loss": self.bp_loss.tolist(),
            "dfa_compute": [float(c) if np.isfinite(c) else None for c in self.dfa_compute],
            "required_saving": [float(s) if np.isfinite(s) else None for s in self.saving],
            "max_saving": self.max_saving,
            "outcome": self.outcome,
            "trend": self.trend,
            "crossing": self.crossing,
            "crossing_extrapolated": self.crossing_extrapolated,
            "horizon": self.horizon,
        }


def _find_crossing(bp: PowerLawFit, dfa: PowerLawFit, max_saving: float, low: float, high: float):
    """Return the first budget in [low, high] where k(C) crosses `max_saving`, or None."""
    log_c = np.linspace(np.log(low), np.log(high), 2001)
    gap = np.log(required_saving(bp, dfa, np.exp(log_c))) - np.log(max_saving)  # +inf where unreachable
    sign = np.sign(gap)
    changes = np.flatnonzero(sign[1:] != sign[:-1])
    if changes.size == 0:
        return None
    i = changes[0]
    if not (np.isfinite(gap[i]) and np.isfinite(gap[i + 1])):
        return float(np.exp(log_c[i + 1]))

    def gap_at(x):
        return np.log(required_saving(bp, dfa, np.exp(x))) - np.log(max_saving)

    return float(np.exp(optimize.brentq(gap_at, log_c[i], log_c[i + 1])))


def break_even(bp: PowerLawFit, dfa: PowerLawFit, budgets, max_saving: float = 1.5, horizon: float = 1e3) -> BreakEven:
    """Evaluate the required saving k(C) at `budgets` and classify it with `classify_breakeven`.

    Args:
        bp (`PowerLawFit`): BP's frontier law.
        dfa (`PowerLawFit`): DFA's frontier law.
        budgets (`array-like`): increasing compute budgets in FLOPs, normally inside both frontiers' ranges.
        max_saving (`float`, defaults to 1.5): the largest saving factor of DFA's compute considered plausible.
        horizon (`float`, defaults to 1e3): how far above the largest budget, as a factor, to search for the
            budget where k(C) reaches `max_saving`.
    """
    if not max_saving > 0:
        raise ValueError(f"`max_saving` must be positive, got {max_saving}.")
    compute = np.asarray(budgets, dtype=float)
    if compute.ndim != 1 or compute.size == 0 or not (compute > 0).all() or (np.diff(compute) <= 0).any():
        raise ValueError(f"`budgets` must be a non-empty, increasing array of positive FLOPs, got {compute}.")
    bp_loss = bp.loss(compute)
    dfa_compute = dfa.compute_for_loss(bp_loss)
    saving = dfa_compute / compute

    top = compute[-1]
    with np.errstate(invalid="ignore"):
        slope = np.log(required_saving(bp, dfa, top * 1.01)) - np.log(required_saving(bp, dfa, top))
    trend = 0 if not np.isfinite(slope) or abs(slope) < 1e-12 else int(np.sign(slope))
    if np.isinf(saving[-1]):
        trend = 1
    crossing = _find_crossing(bp, dfa, max_saving, compute[0], top * horizon)
    return BreakEven(
        compute,
        bp_loss,
        dfa_compute,
        saving,
        max_saving,
        classify_breakeven(saving, max_saving),
        trend,
        crossing,
        crossing is not None and crossing > top,
        horizon,
    )
