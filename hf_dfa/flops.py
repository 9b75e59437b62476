"""Training FLOPs per token for each rule, counted as the matrix products each rule actually runs.

A matrix product of an `(m, k)` by a `(k, n)` matrix is `2 m k n` FLOPs; element-wise work (norms,
activations, softmax, the optimiser) is left out, as `torch.utils.flop_counter.FlopCounterMode` does. The
backward of a product costs twice its forward: one product for the gradient of the input and one for the
gradient of the weight.

Per token of a sequence of length T, with P the matrix weights of all blocks, L blocks, width d and vocabulary V:

- blocks forward  `F_blocks = 2 P + 4 L T d` (the weights, plus Q K^T and the attention-weighted sum of V,
  each `2 T d` per token; attention is counted over the whole T x T square, causal mask or not)
- head forward    `F_head = 2 d V`
- `bp`:      `3 (F_blocks + F_head)`
- `dfa`:     `3 (F_blocks + F_head) + F_feedback`. Each block still computes the gradient into its first
  norm's output, because the norm's weights learn, so cutting the gradient between blocks removes only
  element-wise work. `F_feedback = 2 d_err d` per token for the shared matrix, `L` times that with one
  matrix per block, 0 for identity feedback; `d_err` is d, or V when the error is taken at the logits.
- `shallow`: `F_blocks + 3 F_head`: forward everything, then the head's two backward products (the weight
  gradient for the head, the input gradient for the final norm).

These are model FLOPs: every product that the rule needs, once. For a GPT-2 training step whose attention runs
the math path of `scaled_dot_product_attention` (CPU training with attention dropout), they equal the count of
`torch.utils.flop_counter.FlopCounterMode` (torch 2.13) exactly, for every rule (`tests/test_flops.py`). The
count differs on two other attention paths:

- the fused CUDA kernels (flash, memory-efficient, cuDNN) recompute `Q K^T` in their backward, which
  FlopCounterMode counts as one more `2 T d` per token and block under `bp` and `dfa`. That recomputation is
  left out here, as model FLOPs utilisation leaves it out; for 85M at T = 1024 and V = 50257 it is 2.2% of a
  `bp` step.
- FlopCounterMode does not count the CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu`, taken
  without attention dropout) at all, so there its count lacks the attention products.
"""

from dataclasses import dataclass

from torch import nn

from .config import DFAConfig


@dataclass(frozen=True)
class FlopCounts:
    """The model quantities that the per-token formulas need.

    Args:
        block_params (`int`): weights with two or more dimensions in all blocks (`P` above).
        n_layer (`int`): number of blocks (`L`).
        d_model (`int`): width of the residual stream (`d`).
        vocab_size (`int`): rows of the LM head (`V`).
    """

    block_params: int
    n_layer: int
    d_model: int
    vocab_size: int

    @classmethod
    def from_model(cls, model: nn.Module, blocks: nn.ModuleList) -> "FlopCounts":
        block_params = sum(p.numel() for p in blocks.parameters() if p.dim() >= 2)
        head = model.get_output_embeddings()
        return cls(block_params, len(blocks), model.config.hidden_size, head.weight.shape[0])

    def forward_per_token(self, seq_len: int) -> tuple[int, int]:
        """Return `(F_blocks, F_head)`, the forward FLOPs per token of the blocks and of the head."""
        blocks = 2 * self.block_params + 4 * self.n_layer * seq_len * self.d_model
        head = 2 * self.d_model * self.vocab_size
        return blocks, head

    def feedback_per_token(self, config: DFAConfig) -> int:
        if config.feedback == "identity":
            return 0
        d_error = self.vocab_size if config.error_source == "logits" else self.d_model
        n_matrices = self.n_layer if config.per_block_feedback else 1
        return 2 * d_error * self.d_model * n_matrices

    def training_per_token(self, config: DFAConfig, seq_len: int) -> int:
        """Return the FLOPs of one training step per token under `config.rule`, by the formulas above."""
        blocks, head = self.forward_per_token(seq_len)
        if config.rule == "bp":
            return 3 * (blocks + head)
        if config.rule == "dfa":
            return 3 * (blocks + head) + self.feedback_per_token(config)
        return blocks + 3 * head


def paper_flops(n_params_non_embedding: int, tokens: int) -> int:
    """Return `6 N D`, the compute convention of Kaplan et al. 2020, for comparison with the counted FLOPs."""
    return 6 * n_params_non_embedding * tokens
