"""`recipes/train.py` end to end at toy size, launched as users launch it, and its errors on bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train.py"
TOY = ["--size", "0.4M", "--max_steps", "6", "--seq_len", "32", "--per_device_train_batch_size", "4"]
TOY += ["--max_eval_blocks", "8", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    values = dict(os.environ)
    values["HF_DFA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    values["HF_HUB_OFFLINE"] = "1"
    values["HF_DATASETS_OFFLINE"] = "1"
    values.pop("HF_DFA_TRACEBACK", None)
    return values


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    sentences = [
        "The quality of mercy is not strained; it droppeth as the gentle rain from heaven.",
        "In the beginning God created the heaven and the earth, and the earth was without form.",
        "All the world's a stage, and all the men and women merely players.",
        "Now is the winter of our discontent made glorious summer by this sun of York.",
    ]
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(" ".join(sentences[(i + j) % 4] for j in range(40)))
    return folder


def run(args, env, launcher="python", timeout=600):
    if launcher == "accelerate":
        command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(RECIPE)]
    else:
        command = [sys.executable, str(RECIPE)]
    return subprocess.run(command + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in error_lines[0]


@pytest.mark.parametrize("rule", ["dfa", "bp", "shallow"])
def test_recipe_trains_and_saves_loadable_model(tmp_path, env, small_corpus, rule):
    out = tmp_path / rule
    args = TOY + ["--rule", rule, "--dataset", str(small_corpus), "--tokenizer", "bpe:300", "--output_dir", str(out)]
    result = run(args, env, launcher="accelerate" if rule == "dfa" else "python")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation loss" in result.stdout

    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["rule"] == rule
    assert record["size"] == "0.4M"
    assert record["n_params_non_embedding"] == 12 * 2 * 128**2
    assert record["tokens"] == 6 * 4 * 32
    assert record["final_eval_loss"] > 0

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "tokens", "flops", "wall_time"} <= set(rows[0])
    assert any("train_loss" in row for row in rows)
    assert rows[-1]["step"] == 6
    assert any("eval_loss" in row and row["step"] == 6 for row in rows)
    assert [row["flops"] for row in rows] == sorted(row["flops"] for row in rows)

    # a process that never imports hf_dfa loads the model with plain transformers
    load = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r}); "
        "ids = t('mercy', return_tensors='pt').input_ids; print(m(ids).logits.shape[-1]); "
        "assert 'hf_dfa' not in sys.modules"
    )
    loaded = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == str(record["vocab_size"])
    assert json.loads((out / "dfa_config.json").read_text())["rule"] == rule


def test_recipe_default_corpus_and_gpt2_tokenizer(tmp_path, env):
    out = tmp_path / "embedded"
    result = run(TOY + ["--rule", "dfa", "--output_dir", str(out)], env)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["dataset"] == "embedded"
    assert record["vocab_size"] == 50257


def test_recipe_resumes_from_last_checkpoint(tmp_path, env, small_corpus):
    out = tmp_path / "resume"
    base = TOY + ["--dataset", str(small_corpus), "--tokenizer", "bpe:300", "--output_dir", str(out)]
    base += ["--save_steps", "3"]
    assert run(base, env).returncode == 0
    first = (out / "metrics.jsonl").read_text()

    # running again into the same directory would lose it
    again = run(base, env)
    assert_one_line_error(again, "already contains a completed run", "another --output_dir")

    resumed = run(base + ["--resume_from_checkpoint", "true"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the summary's wall time counts the first part too, not only the resumed one
    first_wall = max(json.loads(line)["wall_time"] for line in first.splitlines())
    summary_wall = float(re.search(r"wall time\s+([\d.]+) s", resumed.stdout).group(1))
    assert summary_wall >= first_wall
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)
    assert len(first) > 0


def test_recipe_marks_diverged_run(tmp_path, env, small_corpus):
    out = tmp_path / "diverged"
    args = TOY + ["--dataset", str(small_corpus), "--tokenizer", "bpe:300", "--output_dir", str(out)]
    args += ["--learning_rate", "1e6", "--warmup_steps", "0", "--max_grad_norm", "0", "--max_steps", "20"]
    args += ["--save_steps", "1", "--logging_steps", "1"]
    result = run(args, env)
    assert_one_line_error(result, "training diverged", "Lower --learning_rate")
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "diverged"
    # every checkpoint left on disk contains finite weights
    from safetensors.torch import load_file

    checkpoints = sorted(out.glob("checkpoint-*"))
    for checkpoint in checkpoints:
        weights = load_file(checkpoint / "model.safetensors")
        assert all(bool(t.isfinite().all()) for t in weights.values()), checkpoint


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--size", "7M"], ["Unknown size '7M'", "0.4M, 1.3M"]),
        (["--rule", "hebbian"], ["`rule` must be one of bp, dfa, shallow, got 'hebbian'"]),
        (["--dataset", "/no/such/corpus.txt"], ["/no/such/corpus.txt"]),
        (["--seq_len", "2048"], ["--seq_len 2048", "1024 positions"]),
        (["--seq_len", "100000"], ["100000"]),
        (["--feedback", "sparse"], ["`feedback` must be one of"]),
        (["--resume_from_checkpoint", "true"], ["No checkpoint found"]),
    ],
)
def test_recipe_bad_input_one_line(tmp_path, env, small_corpus, extra, fragments):
    args = TOY + ["--dataset", str(small_corpus), "--tokenizer", "bpe:300", "--output_dir", str(tmp_path / "o")]
    result = run(args + extra, env)
    assert_one_line_error(result, *fragments)


def test_recipe_marks_interrupted_run(tmp_path, env, small_corpus):
    out = tmp_path / "interrupted"
    args = TOY + ["--dataset", str(small_corpus), "--tokenizer", "bpe:300", "--output_dir", str(out)]
    args += ["--max_steps", "100000", "--save_steps", "2", "--logging_steps", "1"]
    process = subprocess.Popen(
        [sys.executable, str(RECIPE), *args], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while not list(out.glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert "--resume_from_checkpoint true" in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert list(out.glob("checkpoint-*"))

    # starting again without resuming would lose the checkpoints
    again = run(args, env)
    assert_one_line_error(again, "already contains checkpoints", "--resume_from_checkpoint true")


def test_recipe_short_corpus_one_line(tmp_path, env):
    short = tmp_path / "short.txt"
    short.write_text("Too short for one block.")
    result = run(TOY + ["--dataset", str(short), "--tokenizer", "bpe:300", "--output_dir", str(tmp_path / "o")], env)
    assert_one_line_error(result, str(short))


def test_recipe_empty_corpus_one_line(tmp_path, env):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run(TOY + ["--dataset", str(empty), "--output_dir", str(tmp_path / "o")], env)
    assert_one_line_error(result, str(empty))


def test_recipe_list_sizes(env):
    result = run(["--list_sizes"], env)
    assert result.returncode == 0
    assert "85M" in result.stdout
    assert "84,934,656" in result.stdout


def test_recipe_same_seed_same_run(tmp_path, env, small_corpus):
    base = TOY + ["--rule", "dfa", "--dataset", str(small_corpus), "--tokenizer", "bpe:300", "--seed", "7"]
    losses = []
    for name in ("first", "second"):
        out = tmp_path / name
        result = run(base + ["--output_dir", str(out)], env)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses.append([row["eval_loss"] for row in rows if "eval_loss" in row])
    assert losses[0] == losses[1]
