"""Configuration of the training rule: backpropagation, Direct Feedback Alignment or the shallow baseline."""

import json
import os
from dataclasses import asdict, dataclass, field, fields

RULES = ("bp", "dfa", "shallow")
FEEDBACK_DISTRIBUTIONS = ("gaussian", "uniform", "identity")
ERROR_SOURCES = ("last_block", "logits")
DFA_CONFIG_NAME = "dfa_config.json"


class DFAConfigError(ValueError):
    """Raised when a `DFAConfig` field or a saved DFA configuration is invalid."""


@dataclass
class DFAConfig:
    """Settings of the training rule, parsed by `transformers.HfArgumentParser` as command-line flags.

    The feedback matrices are not stored: they are regenerated from `feedback_seed`, so a resumed run and a
    reloaded configuration get the same matrices.
    """

    rule: str = field(
        default="dfa",
        metadata={
            "help": "Training rule: `bp` (backpropagation), `dfa` (Direct Feedback Alignment at each block's output) "
            "or `shallow` (blocks and embeddings stay at their initialisation, only the final norm and LM head "
            "learn). Default: dfa."
        },
    )
    feedback: str = field(
        default="gaussian",
        metadata={
            "help": "Distribution of the fixed feedback matrix B: `gaussian`, `uniform` (same variance), or "
            "`identity` (each block receives the error e itself, a control that keeps the gradient cut between "
            "blocks but removes the random projection). Default: gaussian."
        },
    )
    error_source: str = field(
        default="last_block",
        metadata={
            "help": "Where the global error e is taken: `last_block` (gradient of the loss at the last block's "
            "output, after the final norm and LM head, a d_model x d_model projection per token) or `logits` "
            "(gradient at the logits; costs a vocab_size x d_model projection per token and a vocab_size x d_model "
            "matrix in memory). Default: last_block."
        },
    )
    per_block_feedback: bool = field(
        default=False,
        metadata={
            "help": "Draw one feedback matrix per block instead of one matrix shared by all blocks. Shared (the "
            "default) computes a single B e per step."
        },
    )
    feedback_scale: float = field(
        default=1.0,
        metadata={
            "help": "Multiplier on the feedback. At 1.0 the entries of B have variance 1/d_model, so B e has the "
            "norm of e in expectation whatever the width. Default: 1.0."
        },
    )
    feedback_seed: int = field(
        default=0, metadata={"help": "Seed of the feedback matrices, independent of the training seed. Default: 0."}
    )
    last_block_true_error: bool = field(
        default=False,
        metadata={
            "help": "Give the last block the true gradient at its output instead of B e. Needs "
            "`error_source=last_block`. Default: off."
        },
    )
    blocks: str | None = field(
        default=None,
        metadata={
            "help": "Dotted path of the model's list of blocks, e.g. `transformer.h` or `model.layers`. Default: "
            "looked up from the model type."
        },
    )
    final_norm: str | None = field(
        default=None,
        metadata={
            "help": "Dotted path of the final norm applied after the last block, e.g. `transformer.ln_f`. Default: "
            "looked up from the model type."
        },
    )
    alignment_every: int = field(
        default=0,
        metadata={
            "help": "Every K optimiser steps, measure per block the cosine between the DFA update and the true "
            "backpropagation gradient on the same batch. 0 turns it off. Default: 0."
        },
    )

    def __post_init__(self):
        if self.rule not in RULES:
            raise DFAConfigError(f"`rule` must be one of {', '.join(RULES)}, got {self.rule!r}.")
        if self.feedback not in FEEDBACK_DISTRIBUTIONS:
            raise DFAConfigError(
                f"`feedback` must be one of {', '.join(FEEDBACK_DISTRIBUTIONS)}, got {self.feedback!r}."
            )
        if self.error_source not in ERROR_SOURCES:
            raise DFAConfigError(
                f"`error_source` must be one of {', '.join(ERROR_SOURCES)}, got {self.error_source!r}."
            )
        if not self.feedback_scale > 0:
            raise DFAConfigError(f"`feedback_scale` must be positive, got {self.feedback_scale}.")
        if self.alignment_every < 0:
            raise DFAConfigError(f"`alignment_every` must be 0 (off) or positive, got {self.alignment_every}.")
        if self.feedback == "identity" and self.error_source == "logits":
            raise DFAConfigError(
                "`feedback=identity` needs the error at the last block (`error_source=last_block`): the logits have "
                "vocab_size features, not d_model."
            )
        if self.last_block_true_error and self.error_source != "last_block":
            raise DFAConfigError("`last_block_true_error` needs `error_source=last_block`, got `error_source=logits`.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DFAConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DFAConfigError(f"Unknown DFA settings {unknown}; valid keys are {sorted(known)}.")
        return cls(**values)

    def save_pretrained(self, directory: str) -> str:
        """Write the settings to `dfa_config.json` in `directory` and return the file's path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, DFA_CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, directory: str) -> "DFAConfig":
        """Read `dfa_config.json` from `directory`; raise `DFAConfigError` if it is missing or corrupt."""
        path = os.path.join(directory, DFA_CONFIG_NAME)
        if not os.path.isfile(path):
            raise DFAConfigError(f"No {DFA_CONFIG_NAME} in {directory}; it is written beside every hf-dfa checkpoint.")
        try:
            with open(path) as f:
                values = json.load(f)
        except json.JSONDecodeError as err:
            raise DFAConfigError(
                f"{path} is not valid JSON ({err}); delete the checkpoint or restore the file."
            ) from err
        if not isinstance(values, dict):
            raise DFAConfigError(f"{path} must contain a JSON object, got {type(values).__name__}.")
        return cls.from_dict(values)
