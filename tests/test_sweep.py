"""`recipes/sweep.py`: spec validation, and a killed sweep that completes when rerun without repeating runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "recipes" / "sweep.py"
sys.path.insert(0, str(ROOT / "recipes"))

import sweep  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    values = dict(os.environ)
    values["HF_DFA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    values["HF_HUB_OFFLINE"] = "1"
    values["HF_DATASETS_OFFLINE"] = "1"
    return values


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    text = "Now is the winter of our discontent made glorious summer by this sun of York. " * 60
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(f"Document {i}. " + text)
    return folder


def sweep_command(out, corpus):
    command = [sys.executable, str(SWEEP), "--sizes", "0.4M", "--rules", "bp,shallow,dfa", "--max_steps", "4"]
    command += ["--out", str(out), "--", "--seq_len", "32", "--per_device_train_batch_size", "2"]
    command += ["--dataset", str(corpus), "--tokenizer", "bpe:300", "--max_eval_blocks", "4", "--save_steps", "2"]
    return command


def status(out, name):
    path = out / name / "run.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


def test_killed_sweep_completes_without_repeating_runs(tmp_path, env, corpus):
    out = tmp_path / "sweep"
    first = "0.4M-bp-lr1x-seed0"
    process = subprocess.Popen(
        sweep_command(out, corpus), env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while status(out, first) != "completed" and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert status(out, first) == "completed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first_metrics = (out / first / "metrics.jsonl").read_text()

    result = subprocess.run(sweep_command(out, corpus), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{first}: completed, skipped" in result.stdout
    assert (out / first / "metrics.jsonl").read_text() == first_metrics
    for rule in ("bp", "shallow", "dfa"):
        name = f"0.4M-{rule}-lr1x-seed0"
        assert status(out, name) == "completed"
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        train_steps = [row["step"] for row in rows if "train_loss" in row]
        assert train_steps == sorted(set(train_steps)), name

    again = subprocess.run(sweep_command(out, corpus), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert again.stdout.count("completed, skipped") == 3


def test_spec_runs_are_ordered_and_named():
    spec = sweep.SweepSpec(sizes=["0.4M", "1.3M"], rules=["bp", "dfa"], lr_multipliers=[0.5, 1.0])
    names = [run["name"] for run in spec.runs()]
    assert names[0] == "0.4M-bp-lr0.5x-seed0"
    assert names[-1] == "1.3M-dfa-lr1x-seed0"
    assert len(names) == 8
    dfa = [run for run in spec.runs() if run["name"] == "0.4M-dfa-lr1x-seed0"][0]
    assert dfa["learning_rate"] == pytest.approx(sweep.get_size("0.4M").learning_rate("dfa"))


@pytest.mark.parametrize(
    "values, match",
    [
        ({"sizes": []}, "`sizes` must name at least one size"),
        ({"sizes": ["7M"]}, "Unknown size '7M'"),
        ({"sizes": ["0.4M"], "rules": ["hebbian"]}, "`rules` must contain only bp, dfa or shallow, got 'hebbian'"),
        ({"sizes": ["0.4M"], "lr_multipliers": [0]}, "`lr_multipliers` must be positive, got 0"),
        ({"sizes": ["0.4M"], "max_steps": {"1.3M": 10}}, "`max_steps` has no entry for size 0.4M"),
    ],
)
def test_spec_rejects_invalid(values, match):
    with pytest.raises(ValueError, match=match):
        sweep.SweepSpec(**values)


def test_presets_load():
    for preset in ("demo", "gpu_grid"):
        args = sweep.parse_args(["--preset", preset, "--out", "unused"])
        spec = sweep.load_spec(args)
        assert spec.rules == ["bp", "dfa", "shallow"]


def test_missing_spec_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SWEEP), "--spec", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "none.yaml not found" in result.stderr
    assert "demo" in result.stderr
