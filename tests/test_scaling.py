"""Tests of the scaling fits, the sweep reader and the analysis of a sweep, on synthetic data from known laws."""

import json
import logging
import math
import os

import numpy as np
import pytest

from hf_dfa import breakeven, scaling
from hf_dfa.analysis import SweepAnalysis, analyse_sweep, conclusion_sentence
from hf_dfa.report import write_report
from hf_dfa.scaling import FitError, PowerLawFit
from hf_dfa.sweep_reader import Sweep, SweepError, load_sweep


def curves_from_law(C_c, alpha, E=0.0, n_runs=8, seed=0, noise=0.005):
    """Return one `(compute, loss)` curve per run, each touching the law at its own compute and above it elsewhere."""
    rng = np.random.default_rng(seed)
    curves = []
    for i in range(n_runs):
        touch = 1e10 * 10 ** (0.5 * i)
        compute = touch * np.geomspace(0.1, 5, 15)
        excess = 0.005 * np.log(compute / touch) ** 2  # a run is worse than the frontier away from its best compute
        loss = (E + (C_c / compute) ** alpha) * (1 + excess) * (1 + noise * rng.standard_normal(15))
        curves.append((compute, loss))
    return curves


def write_run(root, name, meta, evals, tail="", extra=None):
    """Write a run whose `evals` are `(tokens, eval_loss)` pairs; flops are 6 N tokens."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir, exist_ok=True)
    meta = {
        "size": "1M",
        "n_params_non_embedding": 1e6,
        "rule": "bp",
        "seed": 0,
        "learning_rate": 1e-3,
        "status": "completed",
        **meta,
    }
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step, (tokens, loss) in enumerate(evals, start=1):
            row = {
                "step": step,
                "tokens": tokens,
                "flops": 6 * meta["n_params_non_embedding"] * tokens,
                "wall_time": step,
                "eval_loss": loss,
                **(extra or {}),
            }
            f.write(json.dumps({"step": step, "tokens": tokens, "train_loss": loss + 0.1}) + "\n")
            f.write(json.dumps(row) + "\n")
        f.write(tail)
    return run_dir


def decreasing_evals(start=6.0, n=6, tokens=1e6):
    return [(tokens * 2**i, start * 0.9**i) for i in range(n)]


# compute frontier


def test_frontier_crossing_curves():
    curve_a = (np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0, 4.0, 3.0, 2.0]))
    curve_b = (np.array([1.5, 2.5, 3.5, 4.5]), np.array([4.5, 3.5, 3.2, 3.1]))
    frontier = scaling.compute_frontier([curve_a, curve_b])
    np.testing.assert_array_equal(frontier.compute, [1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
    np.testing.assert_array_equal(frontier.loss, [5.0, 4.5, 4.0, 3.5, 3.0, 2.0])
    np.testing.assert_array_equal(frontier.curve, [0, 1, 0, 1, 0, 0])


def test_frontier_ties_and_invalid_points():
    curve_a = (np.array([0.0, 1.0, 2.0, 3.0]), np.array([9.0, 5.0, 4.0, np.nan]))
    curve_b = (np.array([1.0, 2.0, 3.0]), np.array([4.8, 4.5, 3.9]))
    frontier = scaling.compute_frontier([curve_a, curve_b])
    np.testing.assert_array_equal(frontier.compute, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(frontier.loss, [4.8, 4.0, 3.9])


# frontier laws


def test_power_law_fit_recovers_parameters():
    fit = scaling.fit_frontier(curves_from_law(1e17, 0.08), "power", n_bootstrap=100, seed=0)
    assert fit.alpha == pytest.approx(0.08, rel=0.1)
    assert fit.C_c == pytest.approx(1e17, rel=0.2)
    assert math.isclose(fit.E, 0.0)
    assert fit.n_bootstrap == 100
    for name, value in (("alpha", fit.alpha), ("C_c", fit.C_c)):
        low, high = fit.intervals[name]
        assert low <= value <= high, name


def test_saturating_fit_recovers_irreducible_loss():
    fit = scaling.fit_frontier(curves_from_law(1e12, 0.2, E=2.0), "saturating", n_bootstrap=50, seed=0)
    assert math.isclose(fit.E, 2.0, rel_tol=0.05), fit.E
    assert fit.alpha == pytest.approx(0.2, rel=0.1)
    assert abs(math.log(fit.C_c / 1e12)) < math.log(1.5)
    assert set(fit.intervals) == {"C_c", "alpha", "E"}


def test_bootstrap_seeded():
    curves = curves_from_law(1e17, 0.08)
    first = scaling.fit_frontier(curves, "power", n_bootstrap=20, seed=3)
    second = scaling.fit_frontier(curves, "power", n_bootstrap=20, seed=3)
    assert first.intervals == second.intervals


def test_power_law_fit_too_few_points():
    with pytest.raises(FitError, match="3 parameters but only 2"):
        scaling.fit_power_law([1e10, 1e11], [5.0, 4.0], "saturating")
    fit = scaling.fit_power_law([1e10, 1e11], [5.0, 4.0], "power")
    assert fit.loss(1e10) == pytest.approx(5.0, rel=1e-6)
    assert fit.loss(1e11) == pytest.approx(4.0, rel=1e-6)


def test_compute_for_loss_inverts_law():
    law = PowerLawFit("saturating", C_c=1e12, alpha=0.2, E=2.0)
    compute = np.geomspace(1e10, 1e16, 7)
    np.testing.assert_allclose(law.compute_for_loss(law.loss(compute)), compute, rtol=1e-9)
    assert np.isinf(law.compute_for_loss(1.9))


# parametric law

TRUE_LAW = dict(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)


def parametric_grid():
    N = np.repeat(np.geomspace(1e5, 1e9, 5), 8)
    D = np.tile(np.geomspace(1e7, 1e11, 8), 5)
    law = scaling.ParametricFit(**TRUE_LAW)
    return N, D, law.predict(N, D)


def test_fit_parametric_exact_data():
    N, D, loss = parametric_grid()
    fit = scaling.fit_parametric(N, D, loss)
    for name, value in TRUE_LAW.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-4), name


def test_fit_parametric_noisy_data():
    N, D, loss = parametric_grid()
    loss = loss * (1 + 0.01 * np.random.default_rng(0).standard_normal(loss.size))
    fit = scaling.fit_parametric(N, D, loss)
    # A and B trade off against the exponents, so their tolerances are wider
    tolerances = dict(E=0.05, A=0.2, B=0.25, alpha=0.05, beta=0.1)
    for name, tolerance in tolerances.items():
        assert getattr(fit, name) == pytest.approx(TRUE_LAW[name], rel=tolerance), name
    assert fit.n_points == 40


def test_fit_parametric_needs_two_sizes():
    with pytest.raises(FitError, match="2 distinct values of N"):
        scaling.fit_parametric(np.full(8, 1e6), np.geomspace(1e7, 1e9, 8), np.linspace(5, 3, 8))
    with pytest.raises(FitError, match="5 parameters but only 4"):
        scaling.fit_parametric([1e5, 1e6, 1e7, 1e8], [1e7, 1e8, 1e9, 1e10], [5, 4, 3, 2])


def test_compute_optimal_matches_numeric_minimum():
    law = scaling.ParametricFit(**TRUE_LAW)
    budget = 1e21
    n_opt, d_opt = scaling.compute_optimal(law, budget)
    assert 6 * n_opt * d_opt == pytest.approx(budget, rel=1e-9)
    candidates = np.geomspace(n_opt / 10, n_opt * 10, 20001)
    best = candidates[np.argmin(law.predict(candidates, budget / (6 * candidates)))]
    assert n_opt == pytest.approx(best, rel=1e-3)


# break-even


def test_required_saving_matches_closed_form():
    bp = PowerLawFit("power", C_c=1e15, alpha=0.08)
    dfa = PowerLawFit("power", C_c=5e16, alpha=0.1)
    compute = np.geomspace(1e12, 1e20, 9)
    expected = 5e16 * (1e15 / compute) ** (-0.08 / 0.1) / compute
    np.testing.assert_allclose(breakeven.required_saving(bp, dfa, compute), expected, rtol=1e-9)


def test_break_even_crossing_matches_closed_form():
    bp = PowerLawFit("power", C_c=1e15, alpha=0.08)
    dfa = PowerLawFit("power", C_c=5e16, alpha=0.1)
    # k(C) = K C^(p - 1) with p = ab / ad, so k(C*) = 1.5 at C* = (1.5 / K)^(1 / (p - 1))
    p = 0.08 / 0.1
    crossing = (1.5 / (5e16 * 1e15 ** (-p))) ** (1 / (p - 1))
    result = breakeven.break_even(bp, dfa, np.geomspace(crossing / 100, crossing * 100, 9), max_saving=1.5)
    assert result.outcome == "DFA better at scale"
    assert result.crossing == pytest.approx(crossing, rel=1e-6)
    assert not result.crossing_extrapolated
    assert result.trend == -1

    extrapolated = breakeven.break_even(bp, dfa, np.geomspace(crossing / 1e4, crossing / 10, 9), max_saving=1.5)
    assert extrapolated.outcome == "BP better everywhere"
    assert extrapolated.crossing == pytest.approx(crossing, rel=1e-6)
    assert extrapolated.crossing_extrapolated


def test_break_even_unreachable_loss():
    bp = PowerLawFit("saturating", C_c=1e12, alpha=0.2, E=1.5)
    dfa = PowerLawFit("saturating", C_c=1e12, alpha=0.2, E=2.0)
    result = breakeven.break_even(bp, dfa, np.geomspace(1e10, 1e20, 9))
    assert np.isinf(result.saving[-1])
    assert result.outcome == "BP better everywhere"


@pytest.mark.parametrize(
    "saving, outcome",
    [
        ([0.8, 1.0, 1.2], "DFA better everywhere"),
        ([3.0, 1.6, 1.2], "DFA better at scale"),
        ([1.2, 1.6, 3.0], "BP better at scale"),
        ([4.0, 3.0, 2.0], "BP better everywhere"),
        ([1.2, 2.0, np.inf], "BP better at scale"),
    ],
)
def test_classify_breakeven(saving, outcome):
    assert breakeven.classify_breakeven(saving, max_saving=1.5) == outcome


@pytest.mark.parametrize(
    "dfa_c_c, dfa_alpha, outcome",
    [
        (1e14, 0.08, "DFA better everywhere"),
        (1e16, 0.1, "DFA better at scale"),
        (5e15, 0.06, "BP better at scale"),
        (1e17, 0.08, "BP better everywhere"),
    ],
)
def test_break_even_outcomes_from_laws(dfa_c_c, dfa_alpha, outcome):
    bp = PowerLawFit("power", C_c=1e15, alpha=0.08)
    dfa = PowerLawFit("power", C_c=dfa_c_c, alpha=dfa_alpha)
    result = breakeven.break_even(bp, dfa, np.geomspace(1e12, 1e20, 9), max_saving=1.5)
    assert result.outcome == outcome


# sweep reader


def test_load_sweep_truncated_last_line(tmp_path, caplog):
    write_run(tmp_path, "run", {}, decreasing_evals(n=3), tail='{"step": 4, "tok')
    with caplog.at_level(logging.WARNING, logger="hf_dfa.sweep_reader"):
        sweep = load_sweep(str(tmp_path))
    assert len(sweep.runs) == 1
    assert len(sweep.runs[0].eval_loss) == 3
    metrics = os.path.join(str(tmp_path), "run", "metrics.jsonl")
    assert sweep.warnings == [
        f"{metrics} line 7: truncated (the run was probably killed while writing); line skipped."
    ]
    assert sweep.warnings[0] in caplog.text


def test_load_sweep_invalid_line_mid_file(tmp_path):
    run_dir = write_run(tmp_path, "run", {}, decreasing_evals(n=2))
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write("not json\n")
        f.write(json.dumps({"step": 9, "tokens": 1e8, "flops": 6e14, "eval_loss": 3.0}) + "\n")
    sweep = load_sweep(str(tmp_path))
    assert len(sweep.runs[0].eval_loss) == 3
    assert "line 5: invalid JSON" in sweep.warnings[0]


def test_load_sweep_malformed_run_json(tmp_path):
    write_run(tmp_path, "good", {}, decreasing_evals())
    bad = os.path.join(str(tmp_path), "bad")
    os.makedirs(bad)
    with open(os.path.join(bad, "run.json"), "w") as f:
        f.write('{"size": "1M", "rule": ')
    sweep = load_sweep(str(tmp_path))
    assert [run.name for run in sweep.runs] == ["good"]
    assert sweep.excluded[0][0] == bad
    assert sweep.excluded[0][1].startswith("unusable run.json: invalid JSON")
    assert os.path.join(bad, "run.json") in sweep.warnings[0]


def test_load_sweep_missing_keys(tmp_path):
    write_run(tmp_path, "good", {}, decreasing_evals())
    write_run(tmp_path, "no-status", {"status": None}, decreasing_evals())
    sweep = load_sweep(str(tmp_path))
    assert sweep.excluded == [(os.path.join(str(tmp_path), "no-status"), "unusable run.json: missing keys ['status']")]


def test_load_sweep_empty_dir(tmp_path):
    with pytest.raises(SweepError, match=f"No run.json found under {tmp_path}"):
        load_sweep(str(tmp_path))


def test_load_sweep_missing_dir(tmp_path):
    with pytest.raises(SweepError, match="not found"):
        load_sweep(str(tmp_path / "absent"))


def test_load_sweep_all_runs_excluded(tmp_path):
    write_run(tmp_path, "a", {"status": "diverged"}, decreasing_evals())
    with pytest.raises(SweepError, match="every run was excluded .a: diverged"):
        load_sweep(str(tmp_path))


def test_load_sweep_nested_runs_and_compute(tmp_path):
    write_run(tmp_path, "group/run", {"n_params_non_embedding": 2e6}, [(1e6, 5.0)])
    run = load_sweep(str(tmp_path)).runs[0]
    np.testing.assert_allclose(run.compute("paper"), [6 * 2e6 * 1e6])
    np.testing.assert_allclose(run.compute("counted"), [6 * 2e6 * 1e6])
    with pytest.raises(ValueError, match="`compute` must be one of counted, paper, got 'flops'"):
        run.compute("flops")


# analysis and report


def test_diverged_and_partial_runs_in_report(tmp_path):
    sweep_dir = tmp_path / "sweep"
    write_run(sweep_dir, "bp", {}, decreasing_evals())
    write_run(sweep_dir, "bp-diverged", {"status": "diverged"}, decreasing_evals())
    write_run(sweep_dir, "bp-killed", {"status": "interrupted", "seed": 1}, decreasing_evals(n=3))
    analysis = analyse_sweep(load_sweep(str(sweep_dir)), n_bootstrap=0)
    assert [run.name for run in analysis.sweep.runs] == ["bp", "bp-killed"]
    assert analysis.conclusion.startswith("No conclusion on DFA against BP: break-even skipped")

    with open(write_report(analysis, str(tmp_path / "out"), [], 0)) as f:
        report = f.read()
    assert "| bp-diverged | diverged |" in report
    assert "interrupted (partial)" in report
    assert analysis.conclusion in report


def test_rule_with_one_size(tmp_path):
    rng = np.random.default_rng(0)
    for n_params in (1e5, 1e6, 1e7):
        evals = [(d, 1.8 + 60 / n_params**0.34 + 30 / d**0.28) for d in np.geomspace(1e6, 1e8, 6)]
        evals = [(d, loss * (1 + 0.002 * rng.standard_normal())) for d, loss in evals]
        write_run(tmp_path, f"bp-{n_params:g}", {"size": f"{n_params:g}", "n_params_non_embedding": n_params}, evals)
    write_run(tmp_path, "dfa", {"rule": "dfa"}, decreasing_evals(start=7.0, tokens=3e6))

    analysis = analyse_sweep(load_sweep(str(tmp_path)), n_bootstrap=10, fit_from=0)
    assert set(analysis.laws["dfa"]) == {"power", "saturating"}
    assert "bp" in analysis.parametric
    assert "dfa" not in analysis.parametric
    assert "dfa: parametric law skipped, because the parametric law needs at least 2 distinct values of N" in (
        "\n".join(analysis.messages)
    )
    assert "bp" in analysis.extrapolation
    assert "dfa: extrapolation check skipped, because it needs at least 3 sizes." in analysis.messages
    assert analysis.breakeven is not None


def test_extrapolation_check_on_exact_law(tmp_path):
    law = scaling.ParametricFit(**TRUE_LAW)
    for n_params in (1e5, 1e6, 1e7, 1e8):
        evals = [(d, float(law.predict(n_params, d))) for d in np.geomspace(1e7, 1e11, 6)]
        write_run(tmp_path, f"bp-{n_params:g}", {"size": f"{n_params:g}", "n_params_non_embedding": n_params}, evals)
    analysis = analyse_sweep(load_sweep(str(tmp_path)), n_bootstrap=0)
    check = analysis.extrapolation["bp"]
    assert check["size"] == "1e+08"
    assert abs(check["runs"][0]["relative_error"]) < 1e-4


def test_ordering_disagreement_reported(tmp_path):
    alignment = {"alignment/block_0/update_cos": 0.2, "alignment/block_1/update_cos": 0.4}
    write_run(tmp_path, "bp-lr1", {}, decreasing_evals(start=6.0))
    write_run(tmp_path, "bp-lr3", {"learning_rate": 3e-3}, decreasing_evals(start=6.5))
    write_run(tmp_path, "dfa", {"rule": "dfa"}, decreasing_evals(start=5.0), extra=alignment)
    write_run(tmp_path, "shallow", {"rule": "shallow"}, decreasing_evals(start=8.0))
    analysis = analyse_sweep(load_sweep(str(tmp_path)), n_bootstrap=0)

    rows = analysis.ordering
    assert len(rows) == 3
    assert all(row["violations"] == ["dfa < bp"] for row in rows)
    assert rows[0]["learning_rates"] == {"bp": [1e-3, 3e-3], "dfa": [1e-3], "shallow": [1e-3]}
    assert rows[0]["mean_alignment"] == {"dfa": {"update_cos": pytest.approx(0.3)}}

    with open(write_report(analysis, str(tmp_path / "out"), [], 0)) as f:
        report = f.read()
    assert "dfa < bp (expected bp < dfa < shallow). Learning rates tried: bp 0.001, 0.003; dfa 0.001" in report
    assert "Mean alignment of dfa: update_cos 0.300." in report


@pytest.mark.parametrize(
    "dfa_c_c, dfa_alpha, expected",
    [
        (1e14, 0.08, "DFA better everywhere: from 1e+12 to 1e+20 training FLOPs (counted), DFA needs 0.1x BP's"),
        (1e16, 0.1, "DFA better at scale: to reach BP's loss, DFA needs 39.8x BP's compute at 1e+12 training"),
        (5e15, 0.06, "BP better at scale: to reach BP's loss, DFA needs 0.5x BP's compute at 1e+12 training"),
        (5e16, 0.1, "BP better everywhere: from 1e+12 to 1e+20 training FLOPs (counted), DFA needs 5x to 199x"),
    ],
)
def test_conclusion_sentence_from_numbers(dfa_c_c, dfa_alpha, expected):
    bp = PowerLawFit("power", C_c=1e15, alpha=0.08)
    dfa = PowerLawFit("power", C_c=dfa_c_c, alpha=dfa_alpha)
    analysis = SweepAnalysis(Sweep("sweep", [], [], []), "counted", 1.5)
    analysis.laws = {"bp": {"power": bp}, "dfa": {"power": dfa}}
    analysis.breakeven_form = "power"
    analysis.breakeven = breakeven.break_even(bp, dfa, np.geomspace(1e12, 1e20, 9), max_saving=1.5)
    assert conclusion_sentence(analysis).startswith(expected)


def test_early_points_are_drawn_but_not_fitted(tmp_path):
    # a plateau at the initial loss for the first 5% of the tokens, then an exact power law of compute
    n_params, C_c, alpha = 1e6, 1e12, 0.1
    tokens = np.geomspace(1e4, 1e8, 9)
    plateau = 8.0
    evals = [(d, plateau if d < 0.05 * tokens[-1] else (C_c / (6 * n_params * d)) ** alpha) for d in tokens]
    write_run(tmp_path, "bp", {}, evals)

    analysis = analyse_sweep(load_sweep(str(tmp_path)), n_bootstrap=0)
    frontier = analysis.frontiers["bp"]
    assert frontier.compute.min() >= 6 * n_params * 0.1 * tokens[-1]
    assert plateau not in frontier.loss
    fit = analysis.laws["bp"]["power"]
    assert fit.alpha == pytest.approx(alpha, rel=1e-3)
    assert fit.C_c == pytest.approx(C_c, rel=1e-2)
    # the figure still draws every point
    assert len(analysis.curves("bp")[0][0]) == len(tokens)

    everything = analyse_sweep(load_sweep(str(tmp_path)), n_bootstrap=0, fit_from=0)
    assert plateau in everything.frontiers["bp"].loss
    with pytest.raises(ValueError, match="fit_from"):
        analyse_sweep(load_sweep(str(tmp_path)), n_bootstrap=0, fit_from=1.0)


def test_loss_rise_is_reported(tmp_path):
    write_run(tmp_path, "steady", {}, decreasing_evals())
    rising = decreasing_evals()[:4] + [(16e6, 6.0), (32e6, 6.2)]
    write_run(tmp_path, "rising", {"seed": 1}, rising)

    analysis = analyse_sweep(load_sweep(str(tmp_path)), n_bootstrap=0)
    notes = [message for message in analysis.messages if "above its best" in message]
    assert len(notes) == 1
    assert notes[0].startswith("run rising: the final eval loss 6.2 is 42% above its best, 4.374 at step 4.")
