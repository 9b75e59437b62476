"""Scaling-law fits: loss-compute frontiers, power laws in compute and the parametric law L(N, D).

Compute C is in FLOPs, N is the non-embedding parameter count, D is the number of training tokens and losses are
cross-entropies in nats. The functions here take arrays and return fit results. `hf_dfa.breakeven` compares two
frontier laws, and `hf_dfa.analysis` applies both modules to a sweep.
"""

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, special

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: without it, BLAS keeps its default thread count
    threadpool_limits = None

# "power": L(C) = (C_c / C)^alpha. "saturating": L(C) = E + (C_c / C)^alpha, E being the irreducible loss.
FORMS = ("power", "saturating")

# Initialisations of the parametric fit: the grid of Hoffmann et al. (2022), "Training Compute-Optimal Large
# Language Models", appendix D.2, over a = log A, b = log B, e = log E, alpha and beta.
HOFFMANN_GRID = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}


class FitError(ValueError):
    """Raised when a fit cannot be made from the points given, e.g. fewer points than parameters."""


@dataclass(frozen=True)
class Frontier:
    """Lower envelope of loss against compute: points sorted by compute with strictly decreasing loss.

    `curve` stores, for each point, the index of the input curve it comes from.
    """

    compute: np.ndarray
    loss: np.ndarray
    curve: np.ndarray


def compute_frontier(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> Frontier:
    """Compute the lower envelope of loss against compute over the union of the points of several curves.

    A point is on the frontier when its loss is strictly lower than the loss of every point at lower or equal
    compute, so the frontier is the best loss reached with at most that compute by any curve. Points with
    non-positive or non-finite compute or loss are left out, because the laws are fitted in log space.

    Args:
        curves (`Sequence[tuple[np.ndarray, np.ndarray]]`):
            One `(compute, loss)` pair of equal-length arrays per run.
    """
    compute, loss, curve = [], [], []
    for index, (c, y) in enumerate(curves):
        c, y = np.asarray(c, dtype=float), np.asarray(y, dtype=float)
        keep = np.isfinite(c) & np.isfinite(y) & (c > 0) & (y > 0)
        compute.append(c[keep])
        loss.append(y[keep])
        curve.append(np.full(int(keep.sum()), index))
    if not compute:
        return Frontier(np.array([]), np.array([]), np.array([], dtype=int))
    compute, loss, curve = np.concatenate(compute), np.concatenate(loss), np.concatenate(curve)

    # sort by compute, ties by loss, then keep each point that beats the best loss so far
    order = np.lexsort((loss, compute))
    compute, loss, curve = compute[order], loss[order], curve[order]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(loss)[:-1]])
    keep = loss < best_before
    return Frontier(compute[keep], loss[keep], curve[keep].astype(int))


@dataclass
class PowerLawFit:
    """Fitted law L(C) = E + (C_c / C)^alpha, with E = 0 for the `power` form.

    `intervals` maps a parameter name to its bootstrap interval `(low, high)`, and `n_bootstrap` is the number of
    resamples whose fit succeeded. `rmse_log` is the root-mean-square residual in log loss.
    """

    form: str
    C_c: float
    alpha: float
    E: float = 0.0
    n_points: int = 0
    rmse_log: float = float("nan")
    intervals: dict = field(default_factory=dict)
    n_bootstrap: int = 0

    def loss(self, compute):
        """Return the predicted loss at `compute` FLOPs."""
        return self.E + (self.C_c / np.asarray(compute, dtype=float)) ** self.alpha

    def compute_for_loss(self, loss):
        """Return the compute that reaches `loss`: C_c * (loss - E)^(-1/alpha), infinite where loss <= E."""
        excess = np.asarray(loss, dtype=float) - self.E
        with np.errstate(divide="ignore", invalid="ignore"):
            compute = self.C_c * np.where(excess > 0, excess, np.nan) ** (-1.0 / self.alpha)
        return np.where(excess > 0, compute, np.inf)

    def to_dict(self) -> dict:
        params = {"C_c": self.C_c, "alpha": self.alpha, "E": self.E}
        return {
            "form": self.form,
            **params,
            "n_points": self.n_points,
            "rmse_log": self.rmse_log,
            "intervals_95": {name: list(bounds) for name, bounds in self.intervals.items()},
            "n_bootstrap": self.n_bootstrap,
        }


def _power_residuals(x, log_c, log_l):
    log_cc, log_alpha = x
    return np.exp(log_alpha) * (log_cc - log_c) - log_l


def _saturating_residuals(x, log_c, log_l):
    log_e, log_cc, log_alpha = x
    return np.logaddexp(log_e, np.exp(log_alpha) * (log_cc - log_c)) - log_l


def _regression_start(log_c, log_l) -> tuple[float, float]:
    """Return `(log C_c, log alpha)` of the least-squares line through log L against log C."""
    if np.ptp(log_c) == 0:
        return float(np.mean(log_c) + np.mean(log_l) / 0.05), float(np.log(0.05))
    slope, intercept = np.polyfit(log_c, log_l, 1)
    alpha = max(-slope, 1e-3)
    return float(intercept / alpha), float(np.log(alpha))


def fit_power_law(compute, loss, form: str = "power", start: PowerLawFit | None = None) -> PowerLawFit:
    """Fit L(C) = (C_c / C)^alpha or L(C) = E + (C_c / C)^alpha by least squares in log loss.

    The parameters are fitted as logarithms, so C_c, alpha and E stay positive. Without `start`, the `saturating`
    form starts from several values of E below the smallest loss and keeps the best fit.

    Args:
        compute (`array-like`): compute of each point in FLOPs.
        loss (`array-like`): loss of each point.
        form (`str`, defaults to `"power"`): `"power"` or `"saturating"`.
        start (`PowerLawFit`, *optional*): a previous fit of the same form to start from, as the bootstrap does.

    Raises:
        `FitError`: if there are fewer points than parameters (2 for `power`, 3 for `saturating`).
    """
    if form not in FORMS:
        raise ValueError(f"`form` must be one of {', '.join(FORMS)}, got {form!r}.")
    log_c, log_l = np.log(np.asarray(compute, dtype=float)), np.log(np.asarray(loss, dtype=float))
    n_params = 2 if form == "power" else 3
    if len(log_c) < n_params:
        raise FitError(f"the {form} law has {n_params} parameters but only {len(log_c)} frontier points were given.")

    if form == "power":
        residuals = _power_residuals
        if start is not None:
            starts = [np.array([np.log(start.C_c), np.log(start.alpha)])]
        else:
            starts = [np.array(_regression_start(log_c, log_l))]
    else:
        residuals = _saturating_residuals
        if start is not None:
            starts = [np.log([max(start.E, 1e-12), start.C_c, start.alpha])]
        else:
            starts = []
            min_loss = np.exp(log_l.min())
            for fraction in (0.1, 0.5, 0.8, 0.95):
                excess = np.log(np.exp(log_l) - fraction * min_loss)
                starts.append(np.array([np.log(fraction * min_loss), *_regression_start(log_c, excess)]))

    best = None
    for x0 in starts:
        result = optimize.least_squares(residuals, x0, args=(log_c, log_l), x_scale="jac", method="trf")
        if best is None or result.cost < best.cost:
            best = result
    params = np.exp(best.x)
    rmse = float(np.sqrt(np.mean(best.fun**2)))
    if form == "power":
        return PowerLawFit("power", C_c=float(params[0]), alpha=float(params[1]), n_points=len(log_c), rmse_log=rmse)
    return PowerLawFit(
        "saturating",
        C_c=float(params[1]),
        alpha=float(params[2]),
        E=float(params[0]),
        n_points=len(log_c),
        rmse_log=rmse,
    )


def fit_frontier(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
    form: str = "power",
    n_bootstrap: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
) -> PowerLawFit:
    """Fit a law to the frontier of `curves`, with bootstrap intervals from resampling the curves.

    Each resample draws as many curves as given, with replacement, recomputes the frontier and refits from the
    full fit. Resamples whose fit fails are dropped, and `n_bootstrap` of the result counts the others.

    Args:
        curves (`Sequence[tuple[np.ndarray, np.ndarray]]`): one `(compute, loss)` pair per run.
        form (`str`, defaults to `"power"`): `"power"` or `"saturating"`.
        n_bootstrap (`int`, defaults to 200): number of resamples; 0 skips the intervals.
        seed (`int`, defaults to 0): seed of the resampling.
        confidence (`float`, defaults to 0.95): coverage of the percentile intervals.

    Raises:
        `FitError`: if the frontier has fewer points than the law has parameters.
    """
    frontier = compute_frontier(curves)
    fit = fit_power_law(frontier.compute, frontier.loss, form)

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_bootstrap):
        chosen = rng.integers(0, len(curves), size=len(curves))
        resampled = compute_frontier([curves[i] for i in chosen])
        try:
            sample = fit_power_law(resampled.compute, resampled.loss, form, start=fit)
        except FitError:
            continue
        samples.append((sample.C_c, sample.alpha, sample.E))

    if samples:
        tail = 100 * (1 - confidence) / 2
        low, high = np.percentile(np.array(samples), [tail, 100 - tail], axis=0)
        names = ("C_c", "alpha", "E") if form == "saturating" else ("C_c", "alpha")
        fit.intervals = {name: (float(low[i]), float(high[i])) for i, name in enumerate(names)}
    fit.n_bootstrap = len(samples)
    return fit


@dataclass(frozen=True)
class ParametricFit:
    """Fitted law L(N, D) = E + A / N^alpha + B / D^beta, with N parameters and D training tokens.

    `objective` is the minimised sum of Huber losses and `n_points` the number of points fitted.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = float("nan")
    n_points: int = 0

    def predict(self, N, D):
        """Return the predicted loss of a model with `N` parameters trained on `D` tokens."""
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in ("E", "A", "B", "alpha", "beta", "objective", "n_points")}


def _huber_objective(x, log_n, log_d, log_l, delta):
    """Return the sum of Huber losses of the log-space residuals, and its gradient in (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = x
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, n)
    # log-sum-exp by hand: scipy.special.logsumexp costs more than the rest of this function
    shift = terms.max(axis=0)
    exp_terms = np.exp(terms - shift)
    total = exp_terms.sum(axis=0)
    log_pred = shift + np.log(total)
    weights = exp_terms / total  # softmax over the three terms, (3, n)
    residual = log_pred - log_l
    dloss = np.clip(residual, -delta, delta)  # derivative of Huber(delta, r) in r
    grad = np.array(
        [
            np.sum(dloss * weights[0]),
            np.sum(dloss * weights[1]),
            np.sum(dloss * weights[2]),
            -np.sum(dloss * weights[0] * log_n),
            -np.sum(dloss * weights[1] * log_d),
        ]
    )
    return float(np.sum(special.huber(delta, residual))), grad


def _single_blas_thread():
    """Limit BLAS to one thread when threadpoolctl is installed.

    scipy's L-BFGS-B makes BLAS calls on 5-element vectors. A multi-threaded OpenBLAS slowed 16 starts from 0.4 s
    to 10-17 s on a 2-core machine running other jobs (scipy 1.17, OpenBLAS 0.3.31), and one thread avoids that.
    """
    if threadpool_limits is None:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def fit_parametric(
    N, D, loss, *, delta: float = 1e-3, init_grid: dict | None = None, max_starts: int | None = 64
) -> ParametricFit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta as in approach 3 of Hoffmann et al. (2022).

    The fit minimises the sum over points of Huber(delta) of log L_pred - log L, where log L_pred is
    LSE(a - alpha log N, b - beta log D, e) with a = log A, b = log B and e = log E. L-BFGS-B starts from the
    points of `init_grid` and the best result is kept. alpha and beta are bounded below by 0.

    Args:
        N (`array-like`): non-embedding parameter count of each point.
        D (`array-like`): training tokens of each point.
        loss (`array-like`): eval loss of each point.
        delta (`float`, defaults to 1e-3): Huber threshold on the log-loss residual.
        init_grid (`dict`, *optional*): values of `a`, `b`, `e`, `alpha` and `beta` to start from, combined as a
            grid. Defaults to `HOFFMANN_GRID` (4,500 starts).
        max_starts (`int`, *optional*, defaults to 64): run L-BFGS-B only from this many grid points, those with
            the lowest objective. `None` runs it from every grid point.

    Raises:
        `FitError`: if there are fewer than 5 points, or fewer than 2 distinct values of N or of D.
    """
    N, D, loss = (np.asarray(v, dtype=float).ravel() for v in (N, D, loss))
    if not len(N) == len(D) == len(loss):
        raise ValueError(f"`N`, `D` and `loss` must have the same length, got {len(N)}, {len(D)} and {len(loss)}.")
    keep = np.isfinite(N) & np.isfinite(D) & np.isfinite(loss) & (N > 0) & (D > 0) & (loss > 0)
    N, D, loss = N[keep], D[keep], loss[keep]
    if len(N) < 5:
        raise FitError(f"the parametric law has 5 parameters but only {len(N)} points with positive N, D and loss.")
    for name, values in (("N", N), ("D", D)):
        if len(np.unique(values)) < 2:
            raise FitError(f"the parametric law needs at least 2 distinct values of {name}, got {np.unique(values)}.")
    log_n, log_d, log_l = np.log(N), np.log(D), np.log(loss)

    # rank the grid by its objective, computed for all grid points at once
    grid = init_grid or HOFFMANN_GRID
    starts = np.array(list(itertools.product(*(grid[k] for k in ("a", "b", "e", "alpha", "beta")))), dtype=float)
    terms = np.stack(
        [
            starts[:, :1] - starts[:, 3:4] * log_n,
            starts[:, 1:2] - starts[:, 4:5] * log_d,
            np.repeat(starts[:, 2:3], len(log_n), axis=1),
        ]
    )  # (3, n_starts, n)
    start_objective = special.huber(delta, special.logsumexp(terms, axis=0) - log_l).sum(axis=1)
    order = np.argsort(start_objective)
    if max_starts is not None:
        order = order[:max_starts]

    bounds = [(None, None), (None, None), (None, None), (0.0, None), (0.0, None)]
    best = None
    with _single_blas_thread():
        for x0 in starts[order]:
            # tolerances far below scipy's defaults: with delta = 1e-3 the objective and its gradient are small
            result = optimize.minimize(
                _huber_objective,
                x0,
                args=(log_n, log_d, log_l, delta),
                jac=True,
                method="L-BFGS-B",
                bounds=bounds,
                options={"maxiter": 1000, "ftol": 1e-14, "gtol": 1e-12},
            )
            if best is None or result.fun < best.fun:
                best = result
    a, b, e, alpha, beta = best.x
    return ParametricFit(
        E=float(np.exp(e)),
        A=float(np.exp(a)),
        B=float(np.exp(b)),
        alpha=float(alpha),
        beta=float(beta),
        objective=float(best.fun),
        n_points=len(N),
    )


def compute_optimal(fit: ParametricFit, budget):
    """Return the compute-optimal `(N, D)` of `fit` for `budget` FLOPs, with C = 6 N D.

    Minimising A / N^alpha + B / D^beta with D = C / (6 N) gives N_opt = G (C / 6)^(beta / (alpha + beta)) and
    D_opt = (C / 6)^(alpha / (alpha + beta)) / G, where G = (alpha A / (beta B))^(1 / (alpha + beta)).
    """
    if fit.alpha <= 0 or fit.beta <= 0:
        raise FitError(f"compute-optimal sizes need alpha > 0 and beta > 0, got {fit.alpha:.3g} and {fit.beta:.3g}.")
    scaled = np.asarray(budget, dtype=float) / 6.0
    total = fit.alpha + fit.beta
    g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1.0 / total)
    return g * scaled ** (fit.beta / total), scaled ** (fit.alpha / total) / g
