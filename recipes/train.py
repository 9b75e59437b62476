"""Train one point of the size grid with backpropagation, DFA or the shallow baseline.

    accelerate launch recipes/train.py --size 0.4M --rule dfa --max_steps 300 --seq_len 128
    accelerate launch recipes/train.py --model_name_or_path PATH_OR_NAME --tokenizer PATH_OR_NAME --rule dfa
    python recipes/train.py --list_sizes

Every `transformers.TrainingArguments` flag works (`--max_steps`, `--bf16`, `--report_to`, `--push_to_hub`,
`--resume_from_checkpoint`...). Flags left out take the size's defaults from `hf_dfa.grid`. The run leaves in
`--output_dir` the final model (safetensors, loadable by `AutoModelForCausalLM.from_pretrained`), its tokenizer,
`dfa_config.json`, checkpoints, `metrics.jsonl` and `run.json`.
"""

import argparse
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass, field

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2LMHeadModel,
    HfArgumentParser,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_dfa import DFAConfig, DFATrainer, TrainingDivergedError, get_size
from hf_dfa.blocks import UnsupportedModelError, find_blocks
from hf_dfa.config import DFAConfigError
from hf_dfa.data import DataArguments, DataError, build_datasets
from hf_dfa.flops import FlopCounts
from hf_dfa.grid import N_POSITIONS, SIZES, UnknownSizeError, format_size_table
from hf_dfa.records import RunRecorder, read_metrics, read_run_record, update_run_record

DEFAULT_SIZE = next(iter(SIZES))


@dataclass
class RunArguments:
    size: str = field(
        default=DEFAULT_SIZE,
        metadata={"help": f"Size of the grid to train; `--list_sizes` prints them. Default: {DEFAULT_SIZE}."},
    )
    list_sizes: bool = field(default=False, metadata={"help": "Print the size grid and exit."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face model name or local folder of a causal LM to train instead of a GPT-2 of the grid: "
            "any architecture in `hf_dfa.MODEL_BLOCKS`, others with `--blocks`. Its weights are loaded unless "
            "`--from_scratch` is set. Learning rate, batch size and warm-up still default to `--size`'s. "
            "Default: none."
        },
    )
    from_scratch: bool = field(
        default=False,
        metadata={
            "help": "With `--model_name_or_path`, build the model from its config with random weights and a "
            "vocabulary sized to `--tokenizer`, instead of loading its weights. Default: off."
        },
    )
    eval_schedule: str = field(
        default="steps",
        metadata={
            "help": "`steps`: evaluate every `--eval_steps`; `log`: evaluate at about `--eval_points` log-spaced "
            "steps, so that the run gives a loss-against-compute curve. The final step is always evaluated. "
            "Default: steps."
        },
    )
    eval_points: int = field(default=12, metadata={"help": "Evaluations of the `log` schedule. Default: 12."})
    max_eval_blocks: int = field(
        default=128,
        metadata={
            "help": "Validation blocks per evaluation, spread evenly over the validation split; 0 means all. "
            "Default: 128."
        },
    )

    def __post_init__(self):
        get_size(self.size)
        if self.from_scratch and not self.model_name_or_path:
            raise ValueError("`--from_scratch` needs `--model_name_or_path`, got none.")
        if self.eval_schedule not in ("steps", "log"):
            raise ValueError(f"`eval_schedule` must be `steps` or `log`, got {self.eval_schedule!r}.")
        if self.eval_points < 2:
            raise ValueError(f"`eval_points` must be at least 2, got {self.eval_points}.")
        if self.max_eval_blocks < 0:
            raise ValueError(f"`max_eval_blocks` must be 0 (all) or positive, got {self.max_eval_blocks}.")


class LogSpacedEvaluation(TrainerCallback):
    """Evaluate at roughly log-spaced optimiser steps."""

    def __init__(self, max_steps: int, points: int):
        self.steps = sorted({max(1, round(max_steps ** (i / (points - 1)))) for i in range(points)})

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_evaluate = True


def set_size_defaults(parser: HfArgumentParser, argv: list[str]) -> None:
    """Give the parser the defaults of the requested size and rule, before the real parse."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--size", default=DEFAULT_SIZE)
    pre.add_argument("--rule", default="dfa")
    pre.add_argument("--seed", type=int, default=42)
    pre.add_argument("--max_steps", type=int, default=-1)
    pre.add_argument("--model_name_or_path", default=None)
    known, _ = pre.parse_known_args(argv)
    spec = get_size(known.size)
    name = model_label(known.model_name_or_path) if known.model_name_or_path else spec.name

    # a step budget sets the evaluation, checkpoint and warm-up cadence; otherwise one pass over the data
    budget = known.max_steps if known.max_steps > 0 else None
    eval_steps = max(1, budget // 6) if budget else 200
    parser.set_defaults(
        output_dir=os.path.join("runs", f"{name}-{known.rule}-seed{known.seed}"),
        learning_rate=spec.learning_rate(known.rule),
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=min(spec.warmup_steps, max(1, budget // 10)) if budget else spec.warmup_steps,
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        num_train_epochs=1,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        logging_steps=max(1, min(10, eval_steps // 2)),
        # show NaN and inf losses in the logs instead of averaging them away
        logging_nan_inf_filter=False,
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def parse(argv: list[str]):
    parser = HfArgumentParser((RunArguments, DFAConfig, DataArguments, TrainingArguments))
    set_size_defaults(parser, argv)
    run_args, dfa_config, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if run_args.eval_schedule == "log":
        if training_args.max_steps <= 0:
            raise ValueError("`--eval_schedule log` needs `--max_steps`, got none.")
        training_args.eval_strategy = "no"
    return run_args, dfa_config, data_args, training_args


def check_output_dir(training_args: TrainingArguments) -> str | None:
    """Return the checkpoint to resume from, or raise if the output directory contains a run that would be lost."""
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "last"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise ValueError(
                f"No checkpoint found in {training_args.output_dir} to resume from; drop --resume_from_checkpoint "
                "to start a new run there."
            )
        return last
    if resume is not None:
        if not os.path.isdir(resume):
            raise ValueError(f"Checkpoint {resume} not found; pass an existing checkpoint directory.")
        return resume
    if os.path.isdir(training_args.output_dir) and get_last_checkpoint(training_args.output_dir):
        record = read_run_record(training_args.output_dir) or {}
        if record.get("status") == "completed":
            raise ValueError(
                f"{training_args.output_dir} already contains a completed run; pass another --output_dir to start "
                "a new one, or delete that directory."
            )
        raise ValueError(
            f"{training_args.output_dir} already contains checkpoints; pass --resume_from_checkpoint true to continue "
            "that run, or another --output_dir to start a new one."
        )
    return None


def evenly_spaced(dataset, max_blocks: int):
    if max_blocks == 0 or len(dataset) <= max_blocks:
        return dataset
    indices = [round(i * (len(dataset) - 1) / (max_blocks - 1)) for i in range(max_blocks)] if max_blocks > 1 else [0]
    return torch.utils.data.Subset(dataset, indices)


def check_seq_len(data_args: DataArguments, run_args: RunArguments) -> None:
    limit = N_POSITIONS
    if run_args.model_name_or_path:
        # None for models without a position limit in their config, such as BLOOM's ALiBi
        limit = max_positions(load_config(run_args.model_name_or_path))
    if limit is not None and data_args.seq_len > limit:
        raise ValueError(
            f"`--seq_len {data_args.seq_len}` exceeds the model's {limit} positions; pass --seq_len {limit} or less."
        )


def model_label(model_name_or_path: str) -> str:
    """Return the last part of a model name or path, e.g. `tiny-llama` for `/tmp/models/tiny-llama/`."""
    return os.path.basename(os.path.normpath(model_name_or_path))


def load_config(model_name_or_path: str):
    try:
        return AutoConfig.from_pretrained(model_name_or_path)
    except OSError as error:
        raise ValueError(
            f"Could not load the config of `--model_name_or_path {model_name_or_path}`: {error}. Pass a local model "
            "folder, or a Hub name that is cached or reachable."
        ) from error


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(run_args: RunArguments, tokenizer):
    """Build the `--model_name_or_path` model: its weights, or its config with random weights (`--from_scratch`)."""
    path = run_args.model_name_or_path
    if run_args.from_scratch:
        config = load_config(path)
        config.vocab_size = len(tokenizer)
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        return AutoModelForCausalLM.from_config(config)

    model = AutoModelForCausalLM.from_pretrained(path)
    n_embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but {path} embeds {n_embeddings}; pass the model's own "
            f"tokenizer (--tokenizer {path}) or add --from_scratch."
        )
    return model


def build_model(run_args: RunArguments, tokenizer):
    if run_args.model_name_or_path:
        return load_model(run_args, tokenizer)
    config = get_size(run_args.size).gpt2_config(vocab_size=len(tokenizer))
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    return GPT2LMHeadModel(config)


def model_size_info(run_args, dfa_config, model) -> dict:
    """Return the size fields of the run record: the grid point's, or those counted on a `--model_name_or_path` model."""
    if not run_args.model_name_or_path:
        spec = get_size(run_args.size)
        return {
            "size": spec.name,
            "n_params_non_embedding": spec.n_params_non_embedding,
            "n_layer": spec.n_layer,
            "d_model": spec.d_model,
        }
    blocks, _ = find_blocks(model, dfa_config.blocks, dfa_config.final_norm)
    return {
        "size": model_label(run_args.model_name_or_path),
        # the weight matrices of the blocks, as the grid's 12 n_layer d_model**2 counts them
        "n_params_non_embedding": FlopCounts.from_model(model, blocks).block_params,
        "n_layer": len(blocks),
        "d_model": model.config.hidden_size,
        "model_name_or_path": run_args.model_name_or_path,
        "from_scratch": run_args.from_scratch,
        "base_model": None if run_args.from_scratch else run_args.model_name_or_path,
    }


def run_info(run_args, dfa_config, data_args, training_args, model, tokens_per_step) -> dict:
    return {
        **model_size_info(run_args, dfa_config, model),
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.config.vocab_size,
        "rule": dfa_config.rule,
        "seed": training_args.seed,
        "seq_len": data_args.seq_len,
        "learning_rate": training_args.learning_rate,
        "batch_size": tokens_per_step // data_args.seq_len,
        "max_steps": training_args.max_steps,
        "dataset": data_args.dataset,
        "tokenizer": data_args.tokenizer,
        "dfa": dfa_config.to_dict(),
        "output_dir": training_args.output_dir,
    }


def show_library_logs(training_args: TrainingArguments) -> None:
    """Send the `hf_dfa` loggers' INFO lines (corpus sizes, cache hits) to stderr on the main process."""
    logger = logging.getLogger("hf_dfa")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[hf_dfa] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if training_args.process_index == 0 else logging.WARNING)


def train(argv: list[str]) -> int:
    run_args, dfa_config, data_args, training_args = parse(argv)
    show_library_logs(training_args)
    resume = check_output_dir(training_args)
    check_seq_len(data_args, run_args)
    train_dataset, eval_dataset, tokenizer = build_datasets(data_args)
    # the Trainer seeds only after the model exists; without this the initial weights would differ between runs
    set_seed(training_args.seed)
    model = build_model(run_args, tokenizer)

    # tokens per optimiser step over all processes, for the run record
    world = training_args.world_size
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    tokens_per_step = batch * data_args.seq_len

    callbacks = [RunRecorder(training_args.output_dir, tokens_per_step)]
    if run_args.eval_schedule == "log":
        callbacks.append(LogSpacedEvaluation(training_args.max_steps, run_args.eval_points))
    trainer = DFATrainer(
        model=model,
        args=training_args,
        dfa_config=dfa_config,
        train_dataset=train_dataset,
        eval_dataset=evenly_spaced(eval_dataset, run_args.max_eval_blocks),
        processing_class=tokenizer,
        # the blocks are already packed to `seq_len`: no padding
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    is_main = trainer.is_world_process_zero()
    info = run_info(run_args, dfa_config, data_args, training_args, model, tokens_per_step)
    if is_main:
        update_run_record(training_args.output_dir, status="running", **info)

    try:
        trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        if is_main:
            update_run_record(training_args.output_dir, status="interrupted", step=trainer.state.global_step)
            last = get_last_checkpoint(training_args.output_dir)
            print(
                f"interrupted at step {trainer.state.global_step}; resume from {last} with --resume_from_checkpoint true",
                file=sys.stderr,
            )
        return 130

    totals = {"step": trainer.state.global_step, "flops": trainer.state.total_flos}
    totals["tokens"] = trainer.state.global_step * tokens_per_step
    if trainer.diverged_at_step is not None:
        last = get_last_checkpoint(training_args.output_dir)
        if is_main:
            update_run_record(training_args.output_dir, status="diverged", **totals)
        raise TrainingDivergedError(
            f"training diverged: the loss became NaN or infinite by step {trainer.diverged_at_step} at learning rate "
            f"{training_args.learning_rate:g}; the last good checkpoint is {last}. Lower --learning_rate (e.g. "
            f"{training_args.learning_rate / 2:g}) or raise --warmup_steps, and start a new --output_dir."
        )

    last_eval = [row for row in trainer.state.log_history if "eval_loss" in row]
    if not last_eval or last_eval[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
        last_eval = [row for row in trainer.state.log_history if "eval_loss" in row]
    eval_loss = last_eval[-1]["eval_loss"]
    trainer.save_model(training_args.output_dir)

    if is_main:
        # metrics.jsonl carries the wall time across resumes; train_runtime covers only this process's part
        recorded = [row["wall_time"] for row in read_metrics(training_args.output_dir) if "wall_time" in row]
        wall_time = max(recorded) if recorded else trainer.state.log_history[-1].get("train_runtime")
        record = update_run_record(
            training_args.output_dir,
            status="completed",
            final_eval_loss=eval_loss,
            final_eval_perplexity=math.exp(min(eval_loss, 700.0)),
            **totals,
        )
        print_summary(record, wall_time, training_args.output_dir)
    return 0


def print_summary(record: dict, wall_time, output_dir: str) -> None:
    print()
    print(f"rule {record['rule']}, size {record['size']}, {record['step']} steps")
    print(f"  validation loss   {record['final_eval_loss']:.4f}  (perplexity {record['final_eval_perplexity']:.1f})")
    print(f"  tokens            {record['tokens']:,}")
    print(f"  training FLOPs    {record['flops']:.3e}")
    print(f"  wall time         {wall_time if wall_time is None else round(wall_time, 1)} s")
    print(f"  model             {os.path.abspath(output_dir)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--list_sizes" in argv:
        print(format_size_table())
        return 0
    expected = (
        DataError,
        DFAConfigError,
        UnknownSizeError,
        UnsupportedModelError,
        TrainingDivergedError,
        ValueError,
        FileNotFoundError,
    )
    # a scheduler's SIGTERM ends the run like Ctrl-C: marked `interrupted`, resumable from its last checkpoint
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return train(argv)
    except expected as err:
        if os.environ.get("HF_DFA_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        close_process_group()


def close_process_group() -> None:
    """Destroy the process group of a multi-process run before the interpreter exits.

    Left to the interpreter's shutdown, a gloo process group sometimes aborted a rank after training had finished
    ("terminate called without an active exception"), and the launcher then reported the run as failed.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
