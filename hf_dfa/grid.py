"""The size grid: one family of GPT-2 shapes named by non-embedding parameter count.

Every size has `d_model = 64 * n_layer` and 64-wide heads, so the aspect ratio is constant and `85M` is GPT-2
small (12 layers, d_model 768, 12 heads). Sizes are named by `12 * n_layer * d_model**2`, the non-embedding
parameter count of Kaplan et al. 2020 ("Scaling Laws for Neural Language Models"), which leaves out embeddings,
biases and norms.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass

from transformers import GPT2Config

HEAD_DIM = 64
N_POSITIONS = 1024


class UnknownSizeError(ValueError):
    """Raised for a size name that is not in the grid."""


@dataclass(frozen=True)
class SizeSpec:
    """One point of the grid with its training defaults.

    Args:
        name (`str`): the size's name, e.g. `"85M"`.
        n_layer (`int`): number of blocks; `d_model = 64 * n_layer` and `n_head = n_layer`.
        batch_size (`int`): default sequences per optimiser step on one device.
        warmup_steps (`int`): default linear warm-up, in optimiser steps, before the cosine decay.
    """

    name: str
    n_layer: int
    batch_size: int
    warmup_steps: int

    @property
    def d_model(self) -> int:
        return HEAD_DIM * self.n_layer

    @property
    def n_head(self) -> int:
        return self.d_model // HEAD_DIM

    @property
    def n_params_non_embedding(self) -> int:
        return non_embedding_params(self.n_layer, self.d_model)

    def learning_rate(self, rule: str) -> float:
        """Return the default peak learning rate of AdamW for `rule`.

        For `bp` and `shallow` it is the fit of Kaplan et al. 2020 (their eq. D.1),
        `0.003239 - 0.0001395 * ln(N)` with N the non-embedding parameter count: 1.4e-3 at 0.4M, 6.9e-4 at 85M.
        For `dfa` it is half of that. On the bundled corpus at 0.4M (300 steps, 128-token blocks, GPT-2
        tokenizer), DFA at the BP rate had a loss spike to 9.0 midway and ended at 6.64, against 6.51 at half.
        """
        base = 0.003239 - 0.0001395 * math.log(self.n_params_non_embedding)
        return base / 2 if rule == "dfa" else base

    def gpt2_config(self, vocab_size: int = 50257, n_positions: int = N_POSITIONS, **overrides) -> GPT2Config:
        values = dict(
            vocab_size=vocab_size,
            n_positions=n_positions,
            n_embd=self.d_model,
            n_layer=self.n_layer,
            n_head=self.n_head,
            bos_token_id=vocab_size - 1,
            eos_token_id=vocab_size - 1,
        )
        values.update(overrides)
        return GPT2Config(**values)


def non_embedding_params(n_layer: int, d_model: int) -> int:
    """Return `12 * n_layer * d_model**2`: attention (4 d^2) and MLP (8 d^2) weights of every block."""
    return 12 * n_layer * d_model**2


def _name(n_params: int) -> str:
    if n_params >= 10**9:
        return f"{n_params / 1e9:.1f}B"
    if n_params >= 10**7:
        return f"{round(n_params / 1e6)}M"
    return f"{n_params / 1e6:.1f}M"


def _spec(n_layer: int) -> SizeSpec:
    # batches of 8 for CPU-sized models, larger ones where a GPU is expected; warm-up grows with the model
    batch_size = 8 if n_layer <= 6 else (16 if n_layer <= 10 else 32)
    warmup_steps = 100 if n_layer <= 6 else (500 if n_layer <= 12 else 2000)
    return SizeSpec(_name(non_embedding_params(n_layer, HEAD_DIM * n_layer)), n_layer, batch_size, warmup_steps)


# 0.4M to 1.6B non-embedding parameters, 3.6 orders of magnitude
SIZES = OrderedDict((spec.name, spec) for spec in map(_spec, (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)))


def get_size(name: str) -> SizeSpec:
    """Return the `SizeSpec` called `name`; raise `UnknownSizeError` listing the valid names otherwise."""
    if name not in SIZES:
        raise UnknownSizeError(f"Unknown size {name!r}; valid sizes are {', '.join(SIZES)}.")
    return SIZES[name]


def size_grid(vocab_size: int = 50257, n_positions: int = N_POSITIONS) -> "OrderedDict[str, GPT2Config]":
    """Return the ordered mapping from size name to `GPT2Config`, smallest first."""
    return OrderedDict((name, spec.gpt2_config(vocab_size, n_positions)) for name, spec in SIZES.items())


def format_size_table(vocab_size: int = 50257) -> str:
    """Return the grid as a text table with parameter counts and default hyperparameters."""
    header = f"{'size':>6} {'n_layer':>7} {'d_model':>7} {'n_head':>6} {'non-emb params':>14} {'embedding':>11} "
    header += f"{'lr bp/shallow':>13} {'lr dfa':>8} {'batch':>5} {'warmup':>6}"
    lines = [header]
    for spec in SIZES.values():
        embedding = vocab_size * spec.d_model + N_POSITIONS * spec.d_model
        lines.append(
            f"{spec.name:>6} {spec.n_layer:>7} {spec.d_model:>7} {spec.n_head:>6} {spec.n_params_non_embedding:>14,} "
            f"{embedding:>11,} {spec.learning_rate('bp'):>13.2e} {spec.learning_rate('dfa'):>8.2e} "
            f"{spec.batch_size:>5} {spec.warmup_steps:>6}"
        )
    return "\n".join(lines)
