"""Run `recipes/fit.py` end to end on a synthetic sweep written in a temporary directory."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "fit.py")
OUTCOMES = ("DFA better everywhere", "DFA better at scale", "BP better at scale", "BP better everywhere")

# L(N, D) = E + A / N^alpha + B / D^beta per rule, and the training FLOPs per parameter and token of each rule
LAWS = {
    "bp": dict(E=1.8, A=60.0, alpha=0.34, B=30.0, beta=0.28),
    "dfa": dict(E=2.0, A=80.0, alpha=0.30, B=40.0, beta=0.25),
    "shallow": dict(E=3.0, A=8.0, alpha=0.10, B=20.0, beta=0.20),
}
FLOPS_PER_PARAM_TOKEN = {"bp": 6.0, "dfa": 4.0, "shallow": 2.0}
SIZES = {"0.1M": 1e5, "0.3M": 3e5, "1M": 1e6, "3M": 3e6}


def write_run(root, name, meta, rows, truncated_tail=None):
    """Write `run.json` and `metrics.jsonl` of one run, optionally ending with a truncated line."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        if truncated_tail is not None:
            f.write(truncated_tail)
    return run_dir


def synthetic_run(rule, size, seed=0, learning_rate=1e-3, status="completed", n_evals=8, rng=None, alignment=False):
    """Return `(meta, rows)` of a run whose eval losses follow `LAWS[rule]` with 0.5% noise."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    law, n_params = LAWS[rule], SIZES[size]
    final_tokens = 20 * n_params
    tokens = np.geomspace(final_tokens / 100, final_tokens, n_evals)
    loss = law["E"] + law["A"] / n_params ** law["alpha"] + law["B"] / tokens ** law["beta"]
    loss *= 1 + 0.005 * rng.standard_normal(n_evals)
    if learning_rate != 1e-3:
        loss *= 1.05  # a worse learning rate
    flops = FLOPS_PER_PARAM_TOKEN[rule] * n_params * tokens

    rows = []
    for i in range(n_evals):
        step = int(tokens[i] // 1024)
        rows.append(
            {
                "step": step,
                "tokens": tokens[i],
                "flops": flops[i],
                "wall_time": float(i),
                "train_loss": float(loss[i] + 0.05),
                "learning_rate": learning_rate,
            }
        )
        row = {
            "step": step,
            "tokens": tokens[i],
            "flops": flops[i],
            "wall_time": float(i),
            "eval_loss": float(loss[i]),
            "eval_perplexity": float(np.exp(loss[i])),
        }
        if alignment:
            for block in range(2):
                row[f"alignment/block_{block}/update_cos"] = 0.1 + 0.05 * block + 0.01 * i
                row[f"alignment/block_{block}/feedback_cos"] = 0.4 + 0.02 * i
        rows.append(row)
    meta = {
        "size": size,
        "n_params_non_embedding": n_params,
        "n_params": n_params + 8192 * 128,
        "n_layer": 2,
        "d_model": 128,
        "vocab_size": 8192,
        "rule": rule,
        "seed": seed,
        "seq_len": 128,
        "learning_rate": learning_rate,
        "batch_size": 8,
        "dataset": "embedded",
        "tokenizer": "bpe:8192",
        "dfa": {"feedback": "gaussian"} if rule == "dfa" else None,
        "status": status,
        "final_eval_loss": float(loss[-1]),
        "tokens": float(tokens[-1]),
        "flops": float(flops[-1]),
    }
    return meta, rows


def write_synthetic_sweep(root, sizes=tuple(SIZES)):
    """Write a sweep of `sizes` x 3 rules plus a worse learning rate, a diverged and an interrupted run."""
    rng = np.random.default_rng(0)
    for rule in LAWS:
        for size in sizes:
            meta, rows = synthetic_run(rule, size, rng=rng, alignment=rule == "dfa")
            # runs nested one level deeper, as a sweep grouped by rule would be
            write_run(root, os.path.join(rule, f"{size}-seed0"), meta, rows)
    meta, rows = synthetic_run("bp", "1M", learning_rate=3e-3, rng=rng)
    write_run(root, "bp/1M-lr3e-3", meta, rows)
    meta, rows = synthetic_run("dfa", "1M", seed=1, status="diverged", rng=rng)
    write_run(root, "dfa/1M-seed1", meta, rows)
    meta, rows = synthetic_run("dfa", "0.3M", seed=2, status="interrupted", n_evals=4, rng=rng)
    write_run(root, "dfa/0.3M-seed2", meta, rows, truncated_tail='{"step": 99, "tokens": 12')


def load_recipe():
    """Import `recipes/fit.py` as a module, so that `main` runs without the start-up cost of a new interpreter."""
    spec = importlib.util.spec_from_file_location("fit_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_recipe(*args):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, RECIPE, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def fitted_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    out = tmp_path_factory.mktemp("report")
    write_synthetic_sweep(str(root))
    # the synthetic losses follow their laws from the first eval point on, with no warm-up transient to leave out
    result = run_recipe(str(root), "--out", str(out), "--bootstrap", "50", "--fit_from", "0")
    return root, out, result


def test_fit_recipe_writes_outputs(fitted_sweep):
    _, out, result = fitted_sweep
    assert result.returncode == 0, result.stderr
    for name in ("report.md", "fits.json"):
        assert (out / name).is_file()
    for figure in ("loss_vs_compute", "loss_vs_params", "breakeven", "alignment"):
        for extension in ("png", "svg"):
            assert (out / f"{figure}.{extension}").stat().st_size > 0


def test_fit_recipe_report_contents(fitted_sweep):
    root, out, result = fitted_sweep
    report = (out / "report.md").read_text()
    fits = json.loads((out / "fits.json").read_text())

    outcome = fits["breakeven"]["outcome"]
    assert outcome in OUTCOMES
    assert fits["conclusion"].startswith(outcome)
    assert fits["conclusion"] in report
    assert fits["conclusion"] in result.stdout
    assert "report.md" in result.stdout
    assert "dfa/1M-seed1 | diverged" in report
    assert "interrupted (partial)" in report
    assert "line 9: truncated" in report
    assert "## Alignment" in report
    assert set(fits["frontier_laws"]) == {"bp", "dfa", "shallow"}
    assert set(fits["parametric"]) == {"bp", "dfa", "shallow"}
    assert len(fits["runs"]) == 14
    assert fits["excluded"] == [{"path": str(root / "dfa" / "1M-seed1"), "reason": "diverged"}]


def test_fit_recipe_recovers_parametric_law(fitted_sweep):
    _, out, _ = fitted_sweep
    fits = json.loads((out / "fits.json").read_text())
    for rule, law in LAWS.items():
        fitted = fits["parametric"][rule]
        assert fitted["E"] == pytest.approx(law["E"], rel=0.1), rule
        assert fitted["alpha"] == pytest.approx(law["alpha"], rel=0.2), rule
        assert fitted["beta"] == pytest.approx(law["beta"], rel=0.2), rule


def test_fit_recipe_paper_compute(tmp_path, capsys):
    # one size per rule skips the parametric fits, the slowest part
    write_synthetic_sweep(str(tmp_path / "sweep"), sizes=("1M",))
    out = tmp_path / "out"
    assert (
        load_recipe().main([str(tmp_path / "sweep"), "--out", str(out), "--bootstrap", "0", "--compute", "paper"]) == 0
    )
    report = (out / "report.md").read_text()
    assert "FLOPs (6·N·D)" in report
    assert "Compute is 6 · N · D for every rule" in report
    assert json.loads((out / "fits.json").read_text())["compute"] == "paper"
    assert "compute: FLOPs (6·N·D)" in capsys.readouterr().out


def test_fit_recipe_missing_dir(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_recipe(str(sweep), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: Sweep directory {sweep} not found; pass the directory that contains the run folders."
    ]


def test_fit_recipe_empty_dir(tmp_path, capsys):
    (tmp_path / "sweep").mkdir()
    assert load_recipe().main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")]) == 1
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines() == [
        f"error: No run.json found under {tmp_path / 'sweep'}; pass the directory "
        "that contains one folder per training run."
    ]
    assert not (tmp_path / "out").exists()


def test_fit_recipe_rejects_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_recipe().main([str(tmp_path), "--out", str(tmp_path / "out"), "--max_saving", "0"])
    assert exit_info.value.code == 2
    assert "--max_saving must be positive, got 0.0." in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        load_recipe().main([str(tmp_path), "--out", str(tmp_path / "out"), "--fit_from", "1"])
    assert exit_info.value.code == 2
    assert "--fit_from must be at least 0 and below 1, got 1.0." in capsys.readouterr().err
