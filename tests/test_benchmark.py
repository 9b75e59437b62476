"""`benchmarks/step_cost.py`: the interleaving design, the report it writes and the JSON line it ends with."""

import importlib.util
import itertools
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "step_cost.py")


def load_script():
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", [2, 4, 6])
def test_williams_design_is_balanced(n):
    step_cost = load_script()
    rows = [step_cost.williams_order(n, row) for row in range(n)]
    for row in rows:
        assert sorted(row) == list(range(n))
    for position in range(n):
        assert sorted(row[position] for row in rows) == list(range(n))
    pairs = [(row[i], row[i + 1]) for row in rows for i in range(n - 1)]
    assert sorted(pairs) == sorted(itertools.permutations(range(n), 2))


def test_tiny_run_writes_report(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Notes before\n\n<!-- step_cost.py: begin -->\nold numbers\n<!-- step_cost.py: end -->\n\nNotes after\n"
    )
    command = [sys.executable, SCRIPT, "--quick", "--sizes", "0.4M", "--seq_len", "32", "--batch_size", "2"]
    command += ["--vocab_size", "128", "--steps", "4", "--warmup", "1", "--results", str(results)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    ratios = json.loads(done.stdout.strip().splitlines()[-1])
    r = ratios["0.4M"]
    assert r["timed_steps"] == 4
    # the default DFA adds one d x d projection per token to BP's products
    assert 1.0 < r["flop_ratio_dfa_bp"] < 1.05
    for key in ("step_ratio_dfa_bp", "tokens_ratio_dfatrainer_trainer", "step_ratio_shallow_bp", "peak_ratio_dfa_bp"):
        assert r[key] > 0, key
    # the feedback matrix is the only state DFA adds; the activations of a step are those of BP
    assert r["step_peak_ratio_dfa_bp"] == pytest.approx(1.0, abs=0.02)

    text = results.read_text()
    assert text.startswith("# Notes before\n")
    assert text.endswith("\nNotes after\n")
    assert "old numbers" not in text
    for label in ("Trainer, bp", "DFATrainer, bp", "DFATrainer, dfa", "DFATrainer, shallow"):
        assert f"| 0.4M | {label} |" in text
    assert "dfa step / bp step <= FLOP ratio + 0.02" in text
