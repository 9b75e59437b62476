"""`DFATrainer`: `transformers.Trainer` with the training rule of a `DFAConfig` attached to the model.

The trainer overrides only what the rule needs: the FLOPs per step, saving the DFA settings beside every
checkpoint, checking them on resume, and stopping a run whose loss stops being finite. Everything else
(optimiser, schedule, gradient accumulation, mixed precision, DDP, logging, the Hub) is `Trainer`'s.
"""

import os
import shutil

import torch
from accelerate.utils import parse_flag_from_env
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .alignment import measure_alignment
from .blocks import UnsupportedModelError
from .config import DFA_CONFIG_NAME, DFAConfig, DFAConfigError
from .feedback import attach_feedback
from .flops import FlopCounts
from .model_card import MODEL_CARD_NAME, trainer_model_card, write_model_card

logger = logging.get_logger(__name__)


class TrainingDivergedError(RuntimeError):
    """Raised by the training recipe when a run stopped because its training loss became NaN or infinite."""


class DivergenceCallback(TrainerCallback):
    """Stop training, without saving or evaluating, once a non-finite training loss was seen.

    The check reads the trainer's flag only on steps that log, evaluate, save or end training, so it adds no
    device synchronisation to the other steps. Nothing is saved after the loss stopped being finite, so the
    last checkpoint on disk is the last good one.
    """

    def __init__(self, trainer: "DFATrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        acting = control.should_log or control.should_evaluate or control.should_save or control.should_training_stop
        if not acting and state.global_step < state.max_steps:
            return
        if bool(self.trainer.nonfinite_loss):
            self.trainer.diverged_at_step = state.global_step
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False
            control.should_log = False
            logger.error(f"Training loss became NaN or infinite by step {state.global_step}; stopping.")


class UnsupportedParallelismError(ValueError):
    """Raised when `DFATrainer` would train with DFA or the shallow rule under FSDP or DeepSpeed."""


def check_parallelism(args, rule: str) -> None:
    """Raise `UnsupportedParallelismError` if `rule` would run under the Trainer's FSDP or DeepSpeed integration.

    Those integrations wrap or partition the model after the hooks are attached and are not tested with them.
    DDP is tested: two processes end with the parameters of one process on whole batches. So is FSDP2's
    `fully_shard` applied to the blocks in a plain PyTorch loop. docs/distributed.md lists the combinations.
    """
    if rule == "bp":
        return
    fsdp = bool(getattr(args, "fsdp", None)) or parse_flag_from_env("ACCELERATE_USE_FSDP")
    deepspeed = bool(getattr(args, "deepspeed", None)) or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    if fsdp or deepspeed:
        backend = "FSDP" if fsdp else "DeepSpeed"
        raise UnsupportedParallelismError(
            f"DFATrainer with rule={rule!r} under {backend} is not tested and is rejected. Tested: DDP through "
            "accelerate launch or torchrun, and FSDP2 `fully_shard` in a plain loop with `attach_feedback`. Drop "
            f"the {backend} settings, or train with rule='bp'."
        )


class DFATrainer(Trainer):
    """A `transformers.Trainer` that trains the model by backpropagation, DFA or the shallow rule.

    Args:
        model (`PreTrainedModel`): the causal LM; the rule's hooks are attached to it here, before the optimiser
            is created.
        args (`TrainingArguments`): as for `Trainer`.
        dfa_config (`DFAConfig`, *optional*): the rule and feedback settings; default `DFAConfig()` (DFA).
        **kwargs: every other `Trainer` argument.

    With `dfa_config.rule == "bp"` no hook is attached and the trainer computes what `Trainer` computes.
    """

    def __init__(self, model=None, args=None, dfa_config: DFAConfig | None = None, **kwargs):
        if model is None:
            raise ValueError("DFATrainer needs `model`; `model_init` is not supported because the hooks attach once.")
        self.dfa_config = dfa_config or DFAConfig()
        check_parallelism(args, self.dfa_config.rule)
        self.feedback = attach_feedback(model, self.dfa_config) if self.dfa_config.rule != "bp" else None
        self.flop_counts = self._make_flop_counts(model)
        self.nonfinite_loss = torch.zeros((), dtype=torch.bool)
        self.diverged_at_step = None
        self.alignment_every = self.dfa_config.alignment_every if self.dfa_config.rule == "dfa" else 0
        self.last_alignment_step = None
        if self.dfa_config.alignment_every and not self.alignment_every:
            logger.warning(
                f"`alignment_every={self.dfa_config.alignment_every}` is ignored under rule={self.dfa_config.rule!r}: "
                "alignment with backpropagation is measured for rule='dfa' only."
            )

        super().__init__(model=model, args=args, **kwargs)
        self.add_callback(DivergenceCallback(self))

    def _make_flop_counts(self, model) -> FlopCounts | None:
        if self.feedback is not None:
            return FlopCounts.from_model(model, self.feedback.blocks)
        try:
            from .blocks import find_blocks

            blocks, _ = find_blocks(model, self.dfa_config.blocks, self.dfa_config.final_norm)
        except UnsupportedModelError:
            # plain backpropagation on an unknown architecture: fall back to Trainer's 6 * N * tokens
            return None
        return FlopCounts.from_model(model, blocks)

    # ---- training ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.alignment_every and self.state.global_step % self.alignment_every == 0:
            self.log_alignment(inputs, num_items_in_batch)
        loss = super().training_step(model, inputs, num_items_in_batch)
        # accumulated on the loss's device, read only by DivergenceCallback
        self.nonfinite_loss = self.nonfinite_loss.to(loss.device) | ~torch.isfinite(loss)
        return loss

    def log_alignment(self, inputs, num_items_in_batch=None) -> None:
        """Measure and log the alignment of DFA with backpropagation (`hf_dfa.alignment`) on the step's first batch.

        Runs on the unwrapped model and takes gradients with `torch.autograd.grad`, so DDP neither runs its
        forward nor all-reduces the two extra backward passes. Parameters, their `.grad` and the random state are
        left as they were.
        """
        if self.last_alignment_step == self.state.global_step:
            return
        self.last_alignment_step = self.state.global_step
        inputs = self._prepare_inputs(inputs)
        self.model.train()

        def compute_loss():
            # a copy, because compute_loss pops the labels when a label smoother is set
            with self.compute_loss_context_manager():
                return self.compute_loss(self.model, dict(inputs), num_items_in_batch=num_items_in_batch)

        self.log(measure_alignment(self.feedback, compute_loss))

    def floating_point_ops(self, inputs) -> int:
        """Return the FLOPs of one forward and backward on `inputs` under the trainer's rule (see `hf_dfa.flops`)."""
        # NOTE: the two extra forward and backward passes of `log_alignment` are not counted.
        input_ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
        if self.flop_counts is None or input_ids is None:
            return super().floating_point_ops(inputs)
        seq_len = input_ids.shape[-1]
        return input_ids.numel() * self.flop_counts.training_per_token(self.dfa_config, seq_len)

    def log(self, logs, start_time=None):
        # bring state.total_flos up to date for evaluation rows too, which Trainer logs without storing the FLOPs
        self.store_flos()
        super().log(logs, start_time)

    # ---- checkpoints ----

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            self.dfa_config.save_pretrained(output_dir)
            write_model_card(trainer_model_card(self), output_dir)

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, dataset=None, **kwargs):
        """Write the hf-dfa model card (`hf_dfa.model_card`) to `output_dir`, in place of `Trainer`'s draft.

        `Trainer.push_to_hub` calls it before uploading `output_dir`. `tags` are added to the card's own tags, and
        `license` goes into its metadata. The other arguments of `Trainer.create_model_card` are accepted and unused.
        """
        if self.is_world_process_zero():
            write_model_card(trainer_model_card(self, tags=tags, license=license), self.args.output_dir)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # `Trainer` copies only the weights and configs of the checkpoint into the uploaded `output_dir`
        if self.is_world_process_zero():
            for name in (DFA_CONFIG_NAME, MODEL_CARD_NAME):
                source = os.path.join(checkpoint_folder, name)
                if os.path.isfile(source):
                    shutil.copy(source, os.path.join(self.args.output_dir, name))
        super()._push_from_checkpoint(checkpoint_folder)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"No checkpoint to resume from in {self.args.output_dir}; drop --resume_from_checkpoint or point "
                    "it at a checkpoint directory."
                )
        if isinstance(resume_from_checkpoint, str):
            self.check_checkpoint_config(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def check_checkpoint_config(self, checkpoint: str) -> None:
        """Raise `DFAConfigError` unless `checkpoint` contains DFA settings equal to this trainer's."""
        if not os.path.isdir(checkpoint):
            raise DFAConfigError(f"Checkpoint directory {checkpoint} not found; pass an existing checkpoint path.")
        saved = DFAConfig.from_pretrained(checkpoint)
        current = self.dfa_config.to_dict()
        ignored = {"alignment_every"}
        changed = {k: (v, current[k]) for k, v in saved.to_dict().items() if k not in ignored and current[k] != v}
        if changed:
            details = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in sorted(changed.items()))
            raise DFAConfigError(
                f"The DFA settings of {checkpoint} ({DFA_CONFIG_NAME}) differ from this run's ({details}); resume "
                "with the saved settings or start a new output directory."
            )
