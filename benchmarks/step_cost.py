"""Measure the cost of a training step of plain `Trainer`, and of `DFATrainer` under `bp`, `dfa` and `shallow`.

    python benchmarks/step_cost.py
    python benchmarks/step_cost.py --quick
    python benchmarks/step_cost.py --device cuda --bf16 --sizes 85M 201M --seq_len 1024 --peak_tflops 989

For every size of the grid, four trainers train copies of one initial model on the same random token blocks. They
are plain `transformers.Trainer` (backpropagation) and `DFATrainer` with `rule="bp"`, `"dfa"` and `"shallow"`.
`dfa` has the default feedback: one Gaussian matrix shared by all blocks, with the error taken at the last block.
Each trainer runs its own `train()` in a thread, and a baton lets exactly one of them run at a time, one optimiser
step per turn. The order of the four changes from round to round (a Williams design), so that over four rounds each
trainer runs once in every position and once after every other trainer. Load from other processes on a shared
machine therefore falls on all four alike, and every ratio is the median over rounds of the ratio of two step times
measured in the same round.

- step time: wall-clock time from `on_step_begin` to `on_step_end` of a `TrainerCallback`, which covers forward,
  backward, clipping, the optimiser step and `zero_grad` but not fetching the batch. The first `--warmup` steps and
  the memory step after them are not timed. Then rounds of timed steps run until there are at least `--steps` per
  trainer and they took `--min_time` seconds.
- CPU time (CPU only): `time.process_time()` over the same interval, the CPU time of all threads of the process.
  Only one trainer runs at a time, so it is that step's CPU time. Time spent waiting for a core that another
  process holds is not in it, which makes it steadier than wall-clock time on a shared machine.
- peak memory: bytes of tensors. `state` is what persists between steps: parameters, buffers, optimiser state and
  DFA's feedback matrices. `step` is the most memory allocated during the memory step above what was live when it
  began (activations, gradients, temporaries): on CUDA from `torch.cuda.max_memory_allocated`, on CPU from the
  allocation events of `torch.profiler` with `profile_memory=True`. `peak = state + step`. Allocator caches,
  fragmentation and the Python heap are not included.
- FLOPs: `DFATrainer.floating_point_ops`, the counted model FLOPs of `hf_dfa.flops`; plain `Trainer` gets the
  `bp` count of the same model. Model FLOPs utilisation is printed when `--peak_tflops` is given.

The run ends by printing the targets with PASS or MISS and one JSON line of the ratios. It writes the report between
two markers in `--results` and keeps whatever else the file contains. A full run writes `benchmarks/RESULTS.md` by
default; `--quick` writes only to a `--results` file given on the command line.
"""

import argparse
import copy
import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch
import transformers
from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from hf_dfa import DFAConfig, DFATrainer
from hf_dfa.grid import SIZES, get_size

CONFIGS = ("trainer_bp", "bp", "dfa", "shallow")
LABELS = {
    "trainer_bp": "Trainer, bp",
    "bp": "DFATrainer, bp",
    "dfa": "DFATrainer, dfa",
    "shallow": "DFATrainer, shallow",
}
BEGIN_MARKER = "<!-- step_cost.py: begin -->"
END_MARKER = "<!-- step_cost.py: end -->"
MIB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", nargs="+", default=None, help="Grid sizes. Default: 0.4M 6.1M 25M 85M (0.4M 3.1M with --quick)."
    )
    parser.add_argument(
        "--seq_len", type=int, default=None, help="Tokens per sequence. Default: 256 (128 with --quick)."
    )
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per optimiser step. Default: 8.")
    parser.add_argument("--vocab_size", type=int, default=8192, help="Vocabulary of the model. Default: 8192.")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Minimum timed steps per trainer and size, rounded up to a multiple of the 4 trainers. Default: 12.",
    )
    parser.add_argument(
        "--min_time",
        type=float,
        default=None,
        help="Keep adding rounds of 4 timed steps per trainer until the timed rounds of a size took this many "
        "seconds, so that fast sizes get more steps. Default: 60 (0 with --quick).",
    )
    parser.add_argument(
        "--max_timed_steps", type=int, default=200, help="Maximum timed steps per trainer and size. Default: 200."
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="Untimed steps per trainer before the timed ones. Default: 3 (2 with --quick).",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads. Default: torch's default (the cores)."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Sizes 0.4M and 3.1M at --seq_len 128, 12 timed steps after 2 warm-up steps: 45 seconds on two idle "
        "CPU cores. Explicit --sizes, --seq_len, --steps, --min_time and --warmup still apply.",
    )
    # NOTE: the cuda path (synchronised timing, torch.cuda memory statistics) has not been run on a GPU yet.
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="Device to train on. Default: cpu.")
    parser.add_argument("--bf16", action="store_true", help="Train in bfloat16 mixed precision (`--bf16` of Trainer).")
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="Peak throughput of the device in TFLOP/s for the precision used, e.g. 989 for dense bf16 on an H100 "
        "SXM (NVIDIA's datasheet); adds model FLOPs utilisation to the report. Default: not reported.",
    )
    parser.add_argument(
        "--results",
        default=None,
        help="Markdown file to write the report into. Default: benchmarks/RESULTS.md for a full run, none with "
        "--quick.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model initialisation and the data.")
    args = parser.parse_args(argv)

    quick_defaults = dict(sizes=["0.4M", "3.1M"], seq_len=128, steps=12, min_time=0.0, warmup=2)
    full_defaults = dict(sizes=["0.4M", "6.1M", "25M", "85M"], seq_len=256, steps=12, min_time=60.0, warmup=3)
    for name, value in (quick_defaults if args.quick else full_defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.results is None and not args.quick:
        args.results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")

    unknown = [name for name in args.sizes if name not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; valid sizes are {', '.join(SIZES)}.")
    for name in ("seq_len", "batch_size", "vocab_size", "steps", "max_timed_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.warmup < 1:
        parser.error(f"--warmup must be at least 1 (the first step creates the optimiser state), got {args.warmup}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but torch.cuda.is_available() is False; drop it or install CUDA.")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}.")
    if args.min_time < 0:
        parser.error(f"--min_time must be 0 or positive, got {args.min_time}.")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error(f"--peak_tflops must be positive, got {args.peak_tflops}.")
    return args


# ---- one trainer's measurements ----


def williams_order(n: int, row: int) -> list:
    """Return row `row` of a Williams design for `n` (even) trainers: `row, row + 1, row - 1, row + 2, ...` mod `n`.

    Over `n` consecutive rows every trainer runs once at every position and directly after every other trainer
    once, so neither the position in a round nor the trainer that ran before biases the paired ratios.
    """
    order = [row % n]
    for k in range(1, n):
        step = (k + 1) // 2 if k % 2 else -(k // 2)
        order.append((row + step) % n)
    return order


class RoundRobin:
    """A baton that lets one of `n` threads run at a time, one step each per round, in the order of `williams_order`.

    A thread that finished leaves the rotation, and the others keep their turns. After each round, `should_stop`
    gets the number of finished rounds. Once it returns True, `stopping` is set and every thread stops when its
    turn comes, so all threads run the same number of steps.
    """

    def __init__(self, n: int, should_stop):
        self.condition = threading.Condition()
        self.finished = [False] * n
        self.round = 0
        self.queue = williams_order(n, 0)
        self.turn = self.queue.pop(0)
        self.should_stop = should_stop
        self.stopping = False

    def wait(self, index: int) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.turn == index)

    def pass_on(self, index: int, finished: bool = False) -> None:
        with self.condition:
            self.finished[index] = self.finished[index] or finished
            self.turn = None
            for _ in range(2):
                self.queue = [j for j in self.queue if not self.finished[j]]
                if self.queue:
                    self.turn = self.queue.pop(0)
                    break
                self.round += 1
                self.stopping = self.stopping or self.should_stop(self.round)
                self.queue = williams_order(len(self.finished), self.round)
            self.condition.notify_all()


def tensor_bytes(tensors) -> int:
    """Return the bytes of `tensors`, counting storage shared by several of them once."""
    seen = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def state_bytes(trainer: Trainer) -> int:
    """Return the bytes that persist between steps: parameters, buffers, optimiser state, feedback matrices."""
    tensors = list(trainer.model.parameters()) + list(trainer.model.buffers())
    for state in trainer.optimizer.state.values():
        tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
    feedback = getattr(trainer, "feedback", None)
    if feedback is not None and feedback.matrices is not None:
        tensors.append(feedback.matrices)
        tensors += list(feedback.matrices_on_device.values())
    return tensor_bytes(tensors)


def profiled_peak_bytes(profiler: torch.profiler.profile) -> int:
    """Return the peak of CPU tensor bytes allocated and not yet freed during a `profile_memory=True` profile.

    Frees of tensors allocated before the profile started are ignored, so the result is the growth above what
    was live when profiling began.
    """
    from torch._C._profiler import _EventType

    events = []
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.ptr))
    live, current, peak = {}, 0, 0
    for _, size, ptr in sorted(events, key=lambda e: e[0]):
        if size > 0:
            live[ptr] = size
            current += size
            peak = max(peak, current)
        elif ptr in live:
            current -= live.pop(ptr)
    return peak


@dataclass
class Measurement:
    """Step times, memory and FLOPs of one trainer at one size."""

    step_times: list = field(default_factory=list)
    cpu_times: list = field(default_factory=list)
    state_bytes: int = 0
    step_peak_bytes: int = 0
    flops_per_step: float = 0.0

    @property
    def peak_bytes(self) -> int:
        return self.state_bytes + self.step_peak_bytes


class StepTimer(TrainerCallback):
    """Time the optimiser steps of one trainer after `memory_step`, measure memory on it, pass the baton after each.

    Args:
        index (`int`): the trainer's place in the round-robin.
        baton (`RoundRobin`): shared by all trainers of one size.
        memory_step (`int`): the step (1-based) whose memory is measured; the steps before it are warm-up.
        device (`str`): `cpu` or `cuda`.
    """

    def __init__(self, index: int, baton: RoundRobin, memory_step: int, device: str):
        self.index = index
        self.baton = baton
        self.memory_step = memory_step
        self.device = device
        self.trainer = None
        self.measurement = Measurement()
        self.profiler = None
        self.memory_at_begin = 0
        self.begin = 0.0
        self.begin_cpu = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.memory_step:
            self._begin_memory()
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.begin_cpu = time.process_time()
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.begin
        elapsed_cpu = time.process_time() - self.begin_cpu
        if state.global_step == self.memory_step:
            self._end_memory()
        elif state.global_step > self.memory_step:
            self.measurement.step_times.append(elapsed)
            self.measurement.cpu_times.append(elapsed_cpu)
        if state.global_step < state.max_steps:
            self.baton.pass_on(self.index)
            self.baton.wait(self.index)
            control.should_training_stop = control.should_training_stop or self.baton.stopping

    def _begin_memory(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.memory_at_begin = torch.cuda.memory_allocated()
        else:
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            )
            self.profiler.start()

    def _end_memory(self):
        if self.device == "cuda":
            self.measurement.step_peak_bytes = torch.cuda.max_memory_allocated() - self.memory_at_begin
        else:
            self.profiler.stop()
            self.measurement.step_peak_bytes = profiled_peak_bytes(self.profiler)
            self.profiler = None
        self.measurement.state_bytes = state_bytes(self.trainer)


# ---- one size ----


class RandomBlocks(torch.utils.data.Dataset):
    """Random token blocks, the same for every trainer: the token values do not change the cost of a step."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (n, seq_len), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_trainer(name: str, model, args: argparse.Namespace, output_dir: str, dataset, total_steps: int) -> Trainer:
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=total_steps,
        learning_rate=1e-4,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=args.seed,
    )
    if name == "trainer_bp":
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    else:
        trainer = DFATrainer(model=model, args=training_args, train_dataset=dataset, dfa_config=DFAConfig(rule=name))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def measure_size(size: str, args: argparse.Namespace) -> dict:
    """Train the four trainers of `size` interleaved and return their `Measurement`s, keyed by configuration."""
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(get_size(size).gpt2_config(vocab_size=args.vocab_size, n_positions=args.seq_len))
    memory_step = args.warmup + 1
    total_steps = memory_step + args.max_timed_steps
    dataset = RandomBlocks(total_steps * args.batch_size, args.seq_len, args.vocab_size, args.seed)
    timed_since = []

    def should_stop(rounds: int) -> bool:
        timed = rounds - memory_step
        if timed == 0:
            timed_since.append(time.perf_counter())
        if timed <= 0 or timed % len(CONFIGS):
            return False
        return timed >= args.steps and time.perf_counter() - timed_since[0] >= args.min_time

    baton = RoundRobin(len(CONFIGS), should_stop)
    errors = {}

    with tempfile.TemporaryDirectory() as tmp:
        trainers, timers = {}, {}
        for index, name in enumerate(CONFIGS):
            trainer = build_trainer(name, copy.deepcopy(model), args, os.path.join(tmp, name), dataset, total_steps)
            timer = StepTimer(index, baton, memory_step=memory_step, device=args.device)
            timer.trainer = trainer
            trainer.add_callback(timer)
            trainers[name], timers[name] = trainer, timer
        del model

        def run(index, name):
            baton.wait(index)
            try:
                trainers[name].train()
            except BaseException as err:  # re-raised in the main thread below
                errors[name] = err
            finally:
                baton.pass_on(index, finished=True)

        threads = [threading.Thread(target=run, args=(i, name), name=name) for i, name in enumerate(CONFIGS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            name, err = next(iter(errors.items()))
            raise RuntimeError(f"Training {LABELS[name]} at size {size} failed: {err!r}") from err

        batch = {"input_ids": dataset.ids[: args.batch_size]}
        bp_flops = trainers["bp"].floating_point_ops(batch)
        results = {}
        for name in CONFIGS:
            measurement = timers[name].measurement
            flops = trainers[name].floating_point_ops(batch) if name != "trainer_bp" else bp_flops
            measurement.flops_per_step = float(flops)
            results[name] = measurement
    return results


# ---- summary ----


def paired_ratio(numerator: list, denominator: list) -> float:
    """Return the median over rounds of `numerator[r] / denominator[r]`."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def summarise(results: dict, args: argparse.Namespace) -> dict:
    """Return the table row values and the ratios of one size."""
    tokens_per_step = args.batch_size * args.seq_len
    plain, bp, dfa = results["trainer_bp"], results["bp"], results["dfa"]
    on_cpu = args.device == "cpu"
    rows = {}
    for name, m in results.items():
        step = statistics.median(m.step_times)
        rows[name] = {
            "step_s": step,
            "cpu_s": statistics.median(m.cpu_times) if on_cpu else None,
            "tokens_per_s": tokens_per_step / step,
            "step_ratio_to_trainer_bp": paired_ratio(m.step_times, plain.step_times),
            "state_mib": m.state_bytes / MIB,
            "step_peak_mib": m.step_peak_bytes / MIB,
            "peak_mib": m.peak_bytes / MIB,
            "gflops_per_step": m.flops_per_step / 1e9,
            "mfu": m.flops_per_step / step / (args.peak_tflops * 1e12) if args.peak_tflops else None,
        }

    dfa_bp = [a / b for a, b in zip(dfa.step_times, bp.step_times)]
    quartiles = statistics.quantiles(dfa_bp, n=4) if len(dfa_bp) > 1 else [dfa_bp[0]] * 3
    ratios = {
        "timed_steps": len(plain.step_times),
        "flop_ratio_dfa_bp": dfa.flops_per_step / bp.flops_per_step,
        "step_ratio_dfa_bp": statistics.median(dfa_bp),
        "step_ratio_dfa_bp_quartiles": [quartiles[0], quartiles[2]],
        "tokens_ratio_dfatrainer_trainer": paired_ratio(plain.step_times, bp.step_times),
        "step_ratio_shallow_bp": paired_ratio(results["shallow"].step_times, bp.step_times),
        "peak_ratio_dfa_bp": dfa.peak_bytes / bp.peak_bytes,
        "step_peak_ratio_dfa_bp": dfa.step_peak_bytes / bp.step_peak_bytes,
    }
    if on_cpu:
        ratios["cpu_ratio_dfa_bp"] = paired_ratio(dfa.cpu_times, bp.cpu_times)
        ratios["cpu_tokens_ratio_dfatrainer_trainer"] = paired_ratio(plain.cpu_times, bp.cpu_times)
    return {"rows": rows, "ratios": ratios}


def check_targets(summaries: dict) -> list:
    """Return one dict per target and size: the target, the size, the value, the bound and whether it passed.

    On CPU the time targets are also evaluated on the process CPU time per step (`cpu_value`, `cpu_passed`).
    """
    checks = []
    for size, summary in summaries.items():
        r = summary["ratios"]
        targets = [
            ("DFATrainer-bp tokens/s >= 0.98 x Trainer", "tokens_ratio_dfatrainer_trainer", 0.98, 1),
            ("dfa step / bp step <= FLOP ratio + 0.02", "step_ratio_dfa_bp", r["flop_ratio_dfa_bp"] + 0.02, -1),
            ("dfa peak memory <= bp peak memory", "peak_ratio_dfa_bp", 1.0, -1),
        ]
        cpu_keys = {"tokens_ratio_dfatrainer_trainer": "cpu_tokens_ratio_dfatrainer_trainer"}
        cpu_keys["step_ratio_dfa_bp"] = "cpu_ratio_dfa_bp"
        for target, key, bound, sign in targets:
            cpu_value = r.get(cpu_keys.get(key))
            checks.append(
                {
                    "target": target,
                    "size": size,
                    "value": r[key],
                    "bound": bound,
                    "passed": sign * (r[key] - bound) >= 0,
                    "cpu_value": cpu_value,
                    "cpu_passed": None if cpu_value is None else sign * (cpu_value - bound) >= 0,
                }
            )
    return checks


def verdict(passed: bool | None) -> str:
    if passed is None:
        return ""
    return "PASS" if passed else "MISS"


def format_report(summaries: dict, checks: list, args: argparse.Namespace) -> str:
    on_cpu = args.device == "cpu"
    lines = [
        "| size | trainer | step (s) |" + (" CPU time (s) |" if on_cpu else "") + " tokens/s | step / Trainer-bp "
        "| state (MiB) | step peak (MiB) | peak (MiB) | GFLOP/step |" + (" MFU |" if args.peak_tflops else ""),
        "|---|---|---:|"
        + ("---:|" if on_cpu else "")
        + "---:|---:|---:|---:|---:|---:|"
        + ("---:|" if args.peak_tflops else ""),
    ]
    for size, summary in summaries.items():
        for name, row in summary["rows"].items():
            line = f"| {size} | {LABELS[name]} | {row['step_s']:.4f} |"
            if on_cpu:
                line += f" {row['cpu_s']:.4f} |"
            line += (
                f" {row['tokens_per_s']:,.0f} | {row['step_ratio_to_trainer_bp']:.3f} | {row['state_mib']:.1f} "
                f"| {row['step_peak_mib']:.1f} | {row['peak_mib']:.1f} | {row['gflops_per_step']:.2f} |"
            )
            if args.peak_tflops:
                line += f" {row['mfu']:.1%} |"
            lines.append(line)

    lines += [
        "",
        "| size | timed steps | FLOP ratio dfa/bp | step dfa/bp | quartiles |"
        + (" CPU time dfa/bp |" if on_cpu else "")
        + " step shallow/bp | tokens/s DFATrainer-bp / Trainer | peak dfa/bp | step peak dfa/bp |",
        "|---|---:|---:|---:|---:|" + ("---:|" if on_cpu else "") + "---:|---:|---:|---:|",
    ]
    for size, summary in summaries.items():
        r = summary["ratios"]
        low, high = r["step_ratio_dfa_bp_quartiles"]
        line = (
            f"| {size} | {r['timed_steps']} | {r['flop_ratio_dfa_bp']:.4f} | {r['step_ratio_dfa_bp']:.3f} "
            f"| {low:.3f}-{high:.3f} |"
        )
        if on_cpu:
            line += f" {r['cpu_ratio_dfa_bp']:.3f} |"
        line += (
            f" {r['step_ratio_shallow_bp']:.3f} | {r['tokens_ratio_dfatrainer_trainer']:.3f} "
            f"| {r['peak_ratio_dfa_bp']:.4f} | {r['step_peak_ratio_dfa_bp']:.4f} |"
        )
        lines.append(line)

    lines += [
        "",
        "| target | size | value | bound | result |" + (" on CPU time | result on CPU time |" if on_cpu else ""),
        "|---|---|---:|---:|---|" + ("---:|---|" if on_cpu else ""),
    ]
    for check in checks:
        line = (
            f"| {check['target']} | {check['size']} | {check['value']:.4f} | {check['bound']:.4f} "
            f"| {verdict(check['passed'])} |"
        )
        if on_cpu:
            cpu_value = "" if check["cpu_value"] is None else f"{check['cpu_value']:.4f}"
            line += f" {cpu_value} | {verdict(check['cpu_passed'])} |"
        lines.append(line)
    return "\n".join(lines)


def machine_description(args: argparse.Namespace) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} CPU cores visible, {torch.get_num_threads()} torch threads"
    if args.device == "cuda":
        text += f", {torch.cuda.get_device_name()}"
    text += f"; torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    return text


def command_line() -> str:
    script = os.path.relpath(os.path.abspath(sys.argv[0]))
    return " ".join(["python", script] + sys.argv[1:])


def write_results(path: str, report: str, ratios_json: str, args: argparse.Namespace) -> None:
    """Write the report between the markers of `path`, keeping the rest of the file."""
    section = "\n".join(
        [
            BEGIN_MARKER,
            f"Measured {datetime.date.today().isoformat()} on {machine_description(args)}.",
            "",
            "```",
            command_line(),
            "```",
            "",
            f"{args.batch_size} sequences of {args.seq_len} tokens per step, vocabulary {args.vocab_size}, "
            f"{args.warmup} warm-up steps and one memory step per trainer before the timed steps, device "
            f"{args.device}{', bf16' if args.bf16 else ''}. Ratios of step times are medians over rounds of the "
            "ratio within a round; quartiles are those of dfa/bp.",
            "",
            report,
            "",
            "```json",
            ratios_json,
            "```",
            END_MARKER,
        ]
    )
    existing = ""
    if os.path.isfile(path):
        with open(path) as f:
            existing = f.read()
    if BEGIN_MARKER in existing and END_MARKER in existing:
        head, rest = existing.split(BEGIN_MARKER, 1)
        tail = rest.split(END_MARKER, 1)[1]
        text = head + section + tail
    else:
        text = "# Cost of a training step\n\nWritten by `benchmarks/step_cost.py`.\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def share_malloc_arena() -> bool:
    """Make glibc serve every thread from one malloc arena; return False where that is not possible.

    glibc gives each thread its own arena, and each arena keeps memory that its thread freed. Four trainers in
    four threads could therefore keep up to four times the memory of one training run. One shared arena is also
    what a single run on the main thread uses.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_arena_max = -8  # from glibc's malloc.h
    return bool(mallopt(m_arena_max, 1))


def restart_without_glibc_tunables() -> None:
    """Start the script again without `GLIBC_TUNABLES` in the environment, if it is set.

    The setting that speeds up single CPU training runs (`glibc.malloc.mmap_max=0` with trimming off) skews this
    benchmark. With it, plain `Trainer` and `DFATrainer` with `bp`, which run the same computation, differed by a
    factor of 1.34 in step time at 0.4M. The slow one was whichever trainer ran in the second thread (the
    third with `--threads 1`). Without it the three trainers that compute a full backward were within 1% of
    each other.
    """
    if "GLIBC_TUNABLES" not in os.environ:
        return
    print(
        "note: restarting without GLIBC_TUNABLES, which skews the trainers' threads against each other.",
        file=sys.stderr,
    )
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, os.path.abspath(sys.argv[0])] + sys.argv[1:], env)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and argv is None:
        restart_without_glibc_tunables()
    if args.device == "cpu" and not share_malloc_arena():
        print(
            "note: could not limit glibc to one malloc arena; CPU memory use may grow with the threads.",
            file=sys.stderr,
        )
    transformers.logging.set_verbosity_error()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        # start the profiler once on the main thread: Kineto prints an error when it is first started elsewhere
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
            torch.zeros(1)

    summaries = {}
    for size in args.sizes:
        print(f"{size}: measuring", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results = measure_size(size, args)
        summaries[size] = summarise(results, args)
        r = summaries[size]["ratios"]
        print(
            f"{size}: step dfa/bp {r['step_ratio_dfa_bp']:.3f} (FLOP ratio {r['flop_ratio_dfa_bp']:.4f}), "
            f"tokens/s DFATrainer-bp/Trainer {r['tokens_ratio_dfatrainer_trainer']:.3f}, "
            f"peak dfa/bp {r['peak_ratio_dfa_bp']:.3f} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )

    checks = check_targets(summaries)
    report = format_report(summaries, checks, args)
    ratios_json = json.dumps({size: summary["ratios"] for size, summary in summaries.items()})
    print()
    print(report)
    print()
    for check in checks:
        line = f"{verdict(check['passed'])} {check['size']}: {check['target']} ({check['value']:.4f} vs "
        line += f"{check['bound']:.4f})"
        if check["cpu_value"] is not None:
            line += f"; on CPU time {check['cpu_value']:.4f}: {verdict(check['cpu_passed'])}"
        print(line)
    if args.results:
        write_results(args.results, report, ratios_json, args)
        print(f"report written to {args.results}")
    print(ratios_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
