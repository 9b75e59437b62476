"""Train every combination of sizes, rules, seeds and learning rates of a sweep, resumably.

    python recipes/sweep.py --preset demo --out sweeps/demo
    python recipes/sweep.py --spec my_sweep.yaml --out sweeps/mine
    python recipes/sweep.py --sizes 0.4M,1.3M --rules bp,dfa --max_steps 500 --out sweeps/quick -- --seq_len 128

Each run trains through `recipes/train.py` in its own output directory under `--out`, launched with
`accelerate launch` (so Accelerate's config and `--launch_args` apply) and evaluated at log-spaced steps, so
every run gives a loss-against-compute curve. Rerunning the same command skips completed and diverged runs,
resumes interrupted ones from their last checkpoint and restarts runs that never saved one. Then
`python recipes/fit.py SWEEP_DIR --out REPORT_DIR` fits the scaling laws.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from hf_dfa.grid import get_size
from hf_dfa.records import read_run_record, write_json_atomic

RECIPES = Path(__file__).resolve().parent
PRESETS = RECIPES / "sweeps"
TRAIN = RECIPES / "train.py"


class SweepError(ValueError):
    """Raised for an invalid sweep specification."""


@dataclass
class SweepSpec:
    """The sizes, rules, seeds and learning rates of a sweep.

    Every run gets `--learning_rate` = the size's default for the rule x a multiplier.

    Args:
        sizes (`list[str]`): names from the size grid.
        rules (`list[str]`): `bp`, `dfa`, `shallow`.
        seeds (`list[int]`): training seeds.
        lr_multipliers (`list[float]`): factors on the size's default learning rate.
        max_steps (`int` or `dict[str, int]`): optimiser steps per run, or per size name.
        eval_points (`int`): log-spaced evaluations per run.
        train_args (`list[str]`): further flags for `recipes/train.py`, e.g. `["--seq_len", "128"]`.
    """

    sizes: list
    rules: list = field(default_factory=lambda: ["bp", "dfa", "shallow"])
    seeds: list = field(default_factory=lambda: [0])
    lr_multipliers: list = field(default_factory=lambda: [1.0])
    max_steps: object = 1000
    eval_points: int = 12
    train_args: list = field(default_factory=list)

    def __post_init__(self):
        if not self.sizes:
            raise SweepError("`sizes` must name at least one size of the grid, got none.")
        for size in self.sizes:
            get_size(size)
        for rule in self.rules:
            if rule not in ("bp", "dfa", "shallow"):
                raise SweepError(f"`rules` must contain only bp, dfa or shallow, got {rule!r}.")
        for multiplier in self.lr_multipliers:
            if not float(multiplier) > 0:
                raise SweepError(f"`lr_multipliers` must be positive, got {multiplier}.")
        for size in self.sizes:
            if self.steps_for(size) <= 0:
                raise SweepError(
                    f"`max_steps` must be positive for every size, got {self.steps_for(size)} for {size}."
                )
        self.train_args = [str(arg) for arg in self.train_args]

    def steps_for(self, size: str) -> int:
        if isinstance(self.max_steps, dict):
            if size not in self.max_steps:
                raise SweepError(f"`max_steps` has no entry for size {size}; add one or give a single number.")
            return int(self.max_steps[size])
        return int(self.max_steps)

    def runs(self) -> list[dict]:
        """Return one entry per run, smallest size first, so early results cover every rule."""
        runs = []
        for size in self.sizes:
            for seed in self.seeds:
                for multiplier in self.lr_multipliers:
                    for rule in self.rules:
                        name = f"{size}-{rule}-lr{float(multiplier):g}x-seed{seed}"
                        lr = get_size(size).learning_rate(rule) * float(multiplier)
                        runs.append({"name": name, "size": size, "rule": rule, "seed": seed, "learning_rate": lr})
        return runs


def load_spec(args) -> SweepSpec:
    if args.spec and args.preset:
        raise SweepError("Pass either --spec or --preset, not both.")
    if args.preset or args.spec:
        path = Path(args.spec) if args.spec else PRESETS / f"{args.preset}.yaml"
        if not path.is_file():
            presets = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
            raise SweepError(
                f"Sweep spec {path} not found; pass an existing YAML file or one of the presets: {presets}."
            )
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise SweepError(f"{path} must contain a YAML mapping of sweep settings, got {type(values).__name__}.")
        values.pop("description", None)
        known = set(SweepSpec.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise SweepError(f"{path} has unknown keys {unknown}; valid keys are {sorted(known)}.")
    else:
        if not args.sizes:
            raise SweepError("Pass --preset, --spec or --sizes to say what to train.")
        values = {}
    for key in ("sizes", "rules"):
        if getattr(args, key):
            values[key] = getattr(args, key).split(",")
    if args.seeds:
        values["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.lr_multipliers:
        values["lr_multipliers"] = [float(m) for m in args.lr_multipliers.split(",")]
    if args.max_steps:
        values["max_steps"] = args.max_steps
    values["train_args"] = list(values.get("train_args", [])) + list(args.train_args)
    return SweepSpec(**values)


def run_command(run: dict, spec: SweepSpec, run_dir: Path, launch_args: list[str], resume: bool) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, str(TRAIN)]
    command += ["--size", run["size"], "--rule", run["rule"], "--seed", str(run["seed"])]
    command += ["--learning_rate", repr(run["learning_rate"]), "--max_steps", str(spec.steps_for(run["size"]))]
    command += ["--eval_schedule", "log", "--eval_points", str(spec.eval_points), "--output_dir", str(run_dir)]
    command += spec.train_args
    if resume:
        command += ["--resume_from_checkpoint", "true"]
    return command


def has_checkpoint(run_dir: Path) -> bool:
    return any(p.is_dir() and p.name.startswith("checkpoint-") for p in run_dir.glob("checkpoint-*"))


def sweep(spec: SweepSpec, out: Path, launch_args: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(out / "sweep.json"), {"spec": asdict(spec), "launch_args": launch_args})
    runs = spec.runs()
    results = {}
    for index, run in enumerate(runs, 1):
        run_dir = out / run["name"]
        record = read_run_record(str(run_dir)) if run_dir.is_dir() else None
        status = record.get("status") if record else None
        prefix = f"[{index}/{len(runs)}] {run['name']}"
        if status in ("completed", "diverged"):
            print(f"{prefix}: {status}, skipped", flush=True)
            results[run["name"]] = status
            continue

        resume = status in ("running", "interrupted") and has_checkpoint(run_dir)
        print(f"{prefix}: {'resuming' if resume else 'training'}", flush=True)
        start = time.time()
        command = run_command(run, spec, run_dir, launch_args, resume)
        log_path = out / f"{run['name']}.log"
        with open(log_path, "a") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            try:
                returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
            except KeyboardInterrupt:
                print(f"\ninterrupted during {run['name']}; rerun the same command to resume it", flush=True)
                return 130

        record = read_run_record(str(run_dir)) or {}
        status = record.get("status", "failed")
        results[run["name"]] = status
        loss = record.get("final_eval_loss")
        detail = f"validation loss {loss:.4f}" if isinstance(loss, float) else f"see {log_path}"
        print(f"{prefix}: {status} in {time.time() - start:.0f} s, {detail}", flush=True)
        if returncode == 130:
            print("interrupted; rerun the same command to resume", flush=True)
            return 130
        if returncode != 0 and status != "diverged":
            print(f"{prefix}: failed with exit status {returncode}; the last lines of {log_path}:", flush=True)
            print("\n".join(log_path.read_text().splitlines()[-5:]), flush=True)

    counts = {s: sum(1 for v in results.values() if v == s) for s in sorted(set(results.values()))}
    print(f"sweep done in {out}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    diverged = [name for name, s in results.items() if s == "diverged"]
    if diverged:
        print(f"diverged runs, left out of the fits: {', '.join(diverged)}")
    print(f"fit it with: python recipes/fit.py {out} --out {out}/report")
    failed = [name for name, s in results.items() if s not in ("completed", "diverged")]
    return 1 if failed else 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help=f"a preset in {PRESETS}: demo, gpu_grid")
    parser.add_argument("--spec", help="a YAML file with the fields of SweepSpec")
    parser.add_argument("--out", required=True, help="sweep directory; one subdirectory per run")
    parser.add_argument("--sizes", help="comma-separated size names; overrides the spec")
    parser.add_argument("--rules", help="comma-separated rules; overrides the spec")
    parser.add_argument("--seeds", help="comma-separated seeds; overrides the spec")
    parser.add_argument("--lr_multipliers", help="comma-separated factors on the default learning rate")
    parser.add_argument("--max_steps", type=int, help="optimiser steps per run; overrides the spec")
    parser.add_argument(
        "--launch_args",
        default="--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no",
        help='arguments for `accelerate launch`, as one string; use "" to take Accelerate\'s saved config. '
        "Default: one CPU process.",
    )
    parser.add_argument("train_args", nargs="*", help="after `--`: further flags for recipes/train.py")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = load_spec(args)
    except (SweepError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"{len(spec.runs())} runs into {args.out}")
    print(json.dumps(asdict(spec)))
    return sweep(spec, Path(args.out), shlex.split(args.launch_args))


if __name__ == "__main__":
    sys.exit(main())
