"""The run record that every training run leaves in its output directory.

- `run.json`: what was trained (size, rule, seed, feedback settings...) and a `status` of `running`, `completed`,
  `diverged` or `interrupted`, rewritten atomically whenever it changes.
- `metrics.jsonl`: one JSON object per logging or evaluation step with `step`, `tokens`, `flops`, `wall_time` and
  `train_loss` or `eval_loss` and `eval_perplexity`, plus any other logged value. Appended line by line, so a
  killed run leaves every finished line intact.
"""

import json
import math
import os
import time

from transformers import TrainerCallback

RUN_RECORD = "run.json"
METRICS = "metrics.jsonl"
STATUSES = ("running", "completed", "diverged", "interrupted")


def write_json_atomic(path: str, value) -> None:
    """Write `value` as JSON to `path` through a temporary file, so readers never see a partial file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_run_record(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, RUN_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def update_run_record(run_dir: str, **values) -> dict:
    """Merge `values` into `run.json` of `run_dir` and rewrite it atomically; return the new record."""
    if "status" in values and values["status"] not in STATUSES:
        raise ValueError(f"`status` must be one of {', '.join(STATUSES)}, got {values['status']!r}.")
    os.makedirs(run_dir, exist_ok=True)
    record = read_run_record(run_dir) or {}
    record.update(values)
    write_json_atomic(os.path.join(run_dir, RUN_RECORD), record)
    return record


def read_metrics(output_dir: str) -> list[dict]:
    """Return the rows of `metrics.jsonl`, skipping a truncated last line."""
    path = os.path.join(output_dir, METRICS)
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _finite_or_none(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


class RunRecorder(TrainerCallback):
    """Append one row to `metrics.jsonl` at every log and evaluation, on the main process only.

    On resume, rows logged after the checkpoint's step are dropped first, so the file never holds a step twice,
    and the wall time continues from the last kept row.

    Args:
        output_dir (`str`): the run's output directory.
        tokens_per_step (`int`): training tokens per optimiser step over all processes.
    """

    def __init__(self, output_dir: str, tokens_per_step: int):
        self.output_dir = output_dir
        self.tokens_per_step = tokens_per_step
        self.path = os.path.join(output_dir, METRICS)
        self.start = time.time()
        self.wall_offset = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()
        if not state.is_world_process_zero:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        kept = [row for row in read_metrics(self.output_dir) if row.get("step", 0) <= state.global_step]
        self.wall_offset = max((row.get("wall_time", 0.0) for row in kept), default=0.0)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            for row in kept:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {
            "step": state.global_step,
            "tokens": state.global_step * self.tokens_per_step,
            "flops": state.total_flos,
            "wall_time": round(self.wall_offset + time.time() - self.start, 3),
        }
        for key, value in logs.items():
            if key == "loss":
                row["train_loss"] = value
            elif key == "train_loss":
                # the end-of-training summary's mean over the run, not the loss at this step
                row["train_loss_mean"] = value
            elif key in ("total_flos", "step"):
                continue
            else:
                row[key] = value
        if "eval_loss" in row and _finite_or_none(row["eval_loss"]) is not None:
            row["eval_perplexity"] = math.exp(min(row["eval_loss"], 700.0))
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
