"""Read the run records of a sweep: one `run.json` and one `metrics.jsonl` per training run.

A sweep directory contains one subdirectory per run, possibly nested one level deeper. Every directory under it
that contains a `run.json` is read as a run. Damaged records do not stop the reading. A `run.json` that cannot be
parsed excludes its run, and a `metrics.jsonl` line that cannot be parsed (often the last line of a killed run) is
skipped. Each case is logged as a warning that names the file and line, and kept in `Sweep.warnings`.
"""

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .records import METRICS as METRICS_FILE
from .records import RUN_RECORD as RUN_FILE
from .records import STATUSES

logger = logging.getLogger(__name__)

KNOWN_RULES = ("bp", "dfa", "shallow")
# Statuses of runs that stopped before their planned end. Their eval points are used, and the report marks them.
PARTIAL_STATUSES = ("interrupted", "running")
COMPUTE_MODES = ("counted", "paper")
ALIGNMENT_PREFIX = "alignment/"
_BLOCK_KEY = re.compile(r"^alignment/block_(\d+)/(.+)$")
_REQUIRED_RUN_KEYS = ("size", "rule", "n_params_non_embedding", "status")


class SweepError(ValueError):
    """Raised when a sweep directory is missing or contains no usable run records."""


@dataclass
class Run:
    """One training run: its `run.json` settings and the eval points and alignment metrics of its `metrics.jsonl`.

    Eval arrays are sorted by step. `flops` is NaN on points whose metrics line had no `flops` value.
    """

    path: str
    meta: dict
    step: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    eval_loss: np.ndarray
    alignment: dict = field(default_factory=dict)  # metric key -> (steps, values)

    @property
    def size(self) -> str:
        return str(self.meta["size"])

    @property
    def rule(self) -> str:
        return str(self.meta["rule"])

    @property
    def status(self) -> str:
        return str(self.meta["status"])

    @property
    def n_params(self) -> float:
        """Non-embedding parameter count, the N of the scaling laws."""
        return float(self.meta["n_params_non_embedding"])

    @property
    def seed(self):
        return self.meta.get("seed")

    @property
    def learning_rate(self) -> float | None:
        return self.meta.get("learning_rate")

    @property
    def partial(self) -> bool:
        """Whether the run stopped before its planned end (status `interrupted` or `running`)."""
        return self.status in PARTIAL_STATUSES

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def compute(self, mode: str = "counted") -> np.ndarray:
        """Return the cumulative training compute in FLOPs at each eval point.

        Args:
            mode (`str`, defaults to `"counted"`):
                `"counted"` takes the `flops` logged by the trainer, counted for the rule that was run. `"paper"`
                takes 6 * `n_params_non_embedding` * tokens for every rule.
        """
        if mode == "counted":
            return self.flops
        if mode == "paper":
            return 6.0 * self.n_params * self.tokens
        raise ValueError(f"`compute` must be one of {', '.join(COMPUTE_MODES)}, got {mode!r}.")

    def final_point(self) -> tuple[float, float]:
        """Return `(tokens, eval_loss)` of the last eval point."""
        return float(self.tokens[-1]), float(self.eval_loss[-1])

    def mean_alignment(self) -> dict[str, float]:
        """Return the mean of every alignment metric, pooled over blocks and steps.

        `alignment/block_3/update_cos` is pooled under `update_cos`. Keys without a block index, such as
        `alignment/update_cos_mean`, keep their name without the `alignment/` prefix.
        """
        pooled: dict[str, list[float]] = {}
        for key, (_, values) in self.alignment.items():
            match = _BLOCK_KEY.match(key)
            name = match.group(2) if match else key[len(ALIGNMENT_PREFIX) :]
            pooled.setdefault(name, []).extend(values.tolist())
        return {name: float(np.mean(values)) for name, values in pooled.items() if values}

    def block_alignment(self, metric: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Return `{block index: (steps, values)}` for the keys `alignment/block_{i}/{metric}`."""
        blocks = {}
        for key, series in self.alignment.items():
            match = _BLOCK_KEY.match(key)
            if match and match.group(2) == metric:
                blocks[int(match.group(1))] = series
        return dict(sorted(blocks.items()))


@dataclass
class Sweep:
    """Runs read from a sweep directory.

    `runs` are the runs usable for fits, `excluded` lists `(run directory, reason)` for every run left out, and
    `warnings` keeps every warning logged while reading.
    """

    directory: str
    runs: list[Run]
    excluded: list[tuple[str, str]]
    warnings: list[str]

    def rules(self) -> list[str]:
        """Return the rules present, in the order bp, dfa, shallow, then any other rule alphabetically."""
        present = {run.rule for run in self.runs}
        known = [rule for rule in KNOWN_RULES if rule in present]
        return known + sorted(present - set(KNOWN_RULES))

    def runs_of(self, rule: str) -> list[Run]:
        return [run for run in self.runs if run.rule == rule]


def _warn(warnings: list[str], message: str) -> None:
    logger.warning(message)
    warnings.append(message)


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_run_json(path: str) -> dict:
    """Parse `run.json` and raise `ValueError` naming the problem if it is unusable."""
    with open(path) as f:
        text = f.read()
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    missing = [key for key in _REQUIRED_RUN_KEYS if meta.get(key) is None]
    if missing:
        raise ValueError(f"missing keys {missing}")
    if not _finite_number(meta["n_params_non_embedding"]) or meta["n_params_non_embedding"] <= 0:
        raise ValueError(f"`n_params_non_embedding` must be a positive number, got {meta['n_params_non_embedding']!r}")
    if meta["status"] not in STATUSES:
        raise ValueError(f"`status` must be one of {', '.join(STATUSES)}, got {meta['status']!r}")
    return meta


def _read_metrics(path: str, warnings: list[str]):
    """Read the eval points and alignment series of one `metrics.jsonl`, skipping lines that cannot be used."""
    eval_rows = []
    alignment: dict[str, list[tuple[float, float]]] = {}
    with open(path) as f:
        lines = f.readlines()

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            last = number == len(lines)
            reason = "truncated (the run was probably killed while writing)" if last else f"invalid JSON ({err})"
            _warn(warnings, f"{path} line {number}: {reason}; line skipped.")
            continue
        if not isinstance(record, dict) or not _finite_number(record.get("step")):
            _warn(warnings, f"{path} line {number}: expected a JSON object with a numeric `step`; line skipped.")
            continue

        step = float(record["step"])
        for key, value in record.items():
            if key.startswith(ALIGNMENT_PREFIX) and _finite_number(value):
                alignment.setdefault(key, []).append((step, float(value)))

        if "eval_loss" not in record:
            continue
        loss, tokens = record["eval_loss"], record.get("tokens")
        if not _finite_number(loss) or not _finite_number(tokens):
            _warn(
                warnings,
                f"{path} line {number}: `eval_loss` and `tokens` must be finite numbers, got "
                f"{loss!r} and {tokens!r}; eval point skipped.",
            )
            continue
        flops = record.get("flops")
        eval_rows.append((step, float(tokens), float(flops) if _finite_number(flops) else math.nan, float(loss)))

    eval_rows.sort(key=lambda row: row[0])
    series = {
        key: (np.array([s for s, _ in points]), np.array([v for _, v in points])) for key, points in alignment.items()
    }
    return np.array(eval_rows, dtype=float).reshape(-1, 4), series


def _find_run_dirs(directory: str) -> list[str]:
    run_dirs = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        if RUN_FILE in files:
            run_dirs.append(root)
    return run_dirs


def load_sweep(directory: str) -> Sweep:
    """Read every run under `directory`.

    Runs with status `diverged`, an unusable `run.json`, or no eval point are excluded with their reason. Runs with
    status `interrupted` or `running` are kept, and `Run.partial` marks them.

    Args:
        directory (`str`):
            Sweep directory. Every directory under it that contains a `run.json` is read as a run.

    Raises:
        `SweepError`: if `directory` does not exist, contains no `run.json`, or every run in it is excluded.
    """
    if not os.path.isdir(directory):
        raise SweepError(f"Sweep directory {directory} not found; pass the directory that contains the run folders.")
    run_dirs = _find_run_dirs(directory)
    if not run_dirs:
        raise SweepError(
            f"No {RUN_FILE} found under {directory}; pass the directory that contains one folder per training run."
        )

    runs, excluded, warnings = [], [], []
    for run_dir in run_dirs:
        run_path = os.path.join(run_dir, RUN_FILE)
        try:
            meta = _read_run_json(run_path)
        except (OSError, ValueError) as err:
            _warn(warnings, f"{run_path}: {err}; run skipped.")
            excluded.append((run_dir, f"unusable {RUN_FILE}: {err}"))
            continue

        if meta["status"] == "diverged":
            excluded.append((run_dir, "diverged"))
            continue
        if meta["rule"] not in KNOWN_RULES:
            _warn(warnings, f"{run_path}: unknown rule {meta['rule']!r}, expected one of {', '.join(KNOWN_RULES)}.")

        metrics_path = os.path.join(run_dir, METRICS_FILE)
        if not os.path.isfile(metrics_path):
            _warn(warnings, f"{metrics_path} not found; run skipped.")
            excluded.append((run_dir, f"no {METRICS_FILE}"))
            continue
        rows, alignment = _read_metrics(metrics_path, warnings)
        if len(rows) == 0:
            excluded.append((run_dir, f"no eval point in {METRICS_FILE}"))
            continue

        step, tokens, flops, loss = rows.T
        runs.append(Run(run_dir, meta, step, tokens, flops, loss, alignment))

    if not runs:
        reasons = "; ".join(f"{os.path.relpath(path, directory)}: {reason}" for path, reason in excluded)
        raise SweepError(f"No usable run under {directory}: every run was excluded ({reasons}).")
    return Sweep(directory, runs, excluded, warnings)
