"""Alignment of DFA's updates with backpropagation, measured per block on a training batch.

For every block i, `measure_alignment` returns

- `alignment/block_{i}/update_cos`: the cosine between the block's DFA gradient and its true backpropagation
  gradient, each flattened over all trainable parameters of the block;
- `alignment/block_{i}/feedback_cos`: the cosine between the feedback `B_i e` that reaches the block's output and
  the true gradient of the loss at that output, each flattened over the batch;

and their means over blocks, `alignment/update_cos_mean` and `alignment/feedback_cos_mean`.

Both gradients come from two extra forward and backward passes through `torch.autograd.grad` on the same batch: one
with the DFA hooks active, one with them suspended. Neither touches the `.grad` of any parameter, and both start from
the same random state, which is restored afterwards, so a run that measures alignment follows the same trajectory as
one that does not.
"""

import contextlib

import torch
from torch import nn

from .feedback import FeedbackHandle, hidden_states_of

# guards the cosine of a zero vector, which is reported as 0
EPS = 1e-30


def fork_rng_state() -> tuple:
    """Return the random state of the CPU and of every initialised CUDA device."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def capture_block_outputs(blocks: nn.ModuleList, outputs: list):
    """Append every block's output hidden states to `outputs` as the blocks run.

    The hooks run before any other forward hook of the block, so they see the block's own output, before the DFA
    hook of the last block replaces it.
    """
    hooks = [
        block.register_forward_hook(lambda module, args, out: outputs.append(hidden_states_of(out)), prepend=True)
        for block in blocks
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def gradients_of_blocks(compute_loss, blocks: nn.ModuleList, params: list) -> tuple[list, list]:
    """Run `compute_loss()` and return the gradients of the loss at `params` and at every block's output."""
    outputs = []
    with capture_block_outputs(blocks, outputs):
        loss = compute_loss()
    if len(outputs) != len(blocks):
        raise RuntimeError(
            f"Alignment expected each of the {len(blocks)} blocks to run once per forward pass; {len(outputs)} ran."
        )
    grads = torch.autograd.grad(loss, params + outputs, allow_unused=True)
    # a tensor that does not reach the loss has a zero gradient
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(params + outputs, grads)]
    return grads[: len(params)], grads[len(params) :]


def cosine(a: list, b: list) -> float:
    """Return the cosine between the concatenations of the tensors `a` and of the tensors `b`, in float64."""
    dot = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
    norm_a = torch.sqrt(sum(x.double().square().sum() for x in a))
    norm_b = torch.sqrt(sum(y.double().square().sum() for y in b))
    return float(dot / torch.clamp(norm_a * norm_b, min=EPS))


def measure_alignment(handle: FeedbackHandle, compute_loss) -> dict[str, float]:
    """Measure per block how DFA's update and feedback align with backpropagation on one batch.

    Args:
        handle (`FeedbackHandle`): the `dfa` hooks on the model.
        compute_loss (`Callable[[], torch.Tensor]`): runs a forward pass of the hooked model on the batch and
            returns the loss; called twice, once with the hooks suspended.

    Returns:
        `dict[str, float]`: the `alignment/...` metrics of the module docstring.
    """
    if handle.config.rule != "dfa":
        raise ValueError(f"Alignment is measured for `rule='dfa'` only, got rule={handle.config.rule!r}.")
    blocks = handle.blocks
    params_per_block = [[p for p in block.parameters() if p.requires_grad] for block in blocks]
    params = [p for block_params in params_per_block for p in block_params]

    state = fork_rng_state()
    try:
        dfa_grads, feedback = gradients_of_blocks(compute_loss, blocks, params)
        set_rng_state(state)
        with handle.suspended():
            bp_grads, true_output_grads = gradients_of_blocks(compute_loss, blocks, params)
    finally:
        set_rng_state(state)
        handle.logits_error = None

    metrics = {}
    start = 0
    for i, block_params in enumerate(params_per_block):
        end = start + len(block_params)
        if block_params:
            metrics[f"alignment/block_{i}/update_cos"] = cosine(dfa_grads[start:end], bp_grads[start:end])
        metrics[f"alignment/block_{i}/feedback_cos"] = cosine([feedback[i]], [true_output_grads[i]])
        start = end
    for name in ("update_cos", "feedback_cos"):
        values = [value for key, value in metrics.items() if key.endswith(f"/{name}")]
        if values:
            metrics[f"alignment/{name}_mean"] = sum(values) / len(values)
    return metrics
