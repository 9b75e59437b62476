"""Direct Feedback Alignment attached to the blocks of a causal LM, inside one ordinary backward pass.

Under `rule="dfa"` every block's input is detached from the block below, so no block receives gradient from the
blocks above it. The last block's output passes through `DirectFeedback`, an autograd function that takes every
block's output as an input and returns the last one unchanged. In the backward pass it receives the global error
`e` and returns `B_i e` as the gradient of block i's output. Each block then learns by ordinary backpropagation
inside itself, and the first block carries the feedback on into the embeddings. The final norm and the LM head
sit after the function and learn by true backpropagation.

Everything happens in the one `loss.backward()` (or `accelerator.backward(loss)`) of a normal training step, so
DDP's all-reduce, gradient accumulation, fp16 loss scaling and clipping see ordinary gradients.
"""

import contextlib
import math

import torch
import transformers
from torch import nn

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # transformers without the shared checkpointing layer
    GradientCheckpointingLayer = None

from .blocks import UnsupportedModelError, find_blocks
from .config import DFAConfig


def hidden_states_of(output):
    """Return the hidden states of a block's output: the tensor itself or the first element of a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_hidden_states(output, hidden_states):
    if isinstance(output, tuple):
        return (hidden_states,) + output[1:]
    if isinstance(output, list):
        return [hidden_states] + output[1:]
    return hidden_states


def check_checkpointing_keeps_hooks_outside(block: nn.Module) -> None:
    """Raise `UnsupportedModelError` if gradient checkpointing of `block` would run the DFA hooks a second time.

    Older transformers releases (5.5.3 among them) checkpoint the whole module call in
    `GradientCheckpointingLayer.__call__`, hooks included, so the backward pass replays the hooks. transformers 5.25
    checkpoints `forward` only and leaves the hooks outside.
    """
    if not getattr(block, "gradient_checkpointing", False):
        return
    if GradientCheckpointingLayer is not None and "__call__" in vars(GradientCheckpointingLayer):
        raise UnsupportedModelError(
            f"transformers {transformers.__version__} checkpoints the whole call of each block, so the DFA hooks would "
            "run again in the backward pass. Turn gradient checkpointing off or upgrade transformers to a version "
            "that checkpoints `forward` only (5.25 does)."
        )


def uses_reentrant_checkpointing(block: nn.Module) -> bool:
    """Return whether `block` runs under reentrant gradient checkpointing in this forward pass."""
    if not (getattr(block, "gradient_checkpointing", False) and block.training):
        return False
    check_checkpointing_keeps_hooks_outside(block)
    checkpoint = getattr(block, "_gradient_checkpointing_func", None)
    # torch.utils.checkpoint treats a missing `use_reentrant` as True
    return bool(getattr(checkpoint, "keywords", {}).get("use_reentrant", True))


def cut_gradient(hidden_states: torch.Tensor, reentrant: bool) -> torch.Tensor:
    """Return `hidden_states` cut from the autograd graph of the blocks below.

    Reentrant checkpointing runs a block's forward without gradient and only builds the graph in the backward pass
    if one of its inputs requires gradient, so under it the cut input becomes a leaf that requires gradient. The
    block then also computes the gradient of its input, which nothing uses.
    """
    detached = hidden_states.detach()
    return detached.requires_grad_(True) if reentrant else detached


def make_feedback_matrices(config: DFAConfig, n_blocks: int, d_error: int, d_model: int) -> torch.Tensor | None:
    """Draw the fixed feedback matrices from `config.feedback_seed`, on the CPU so every device gets the same ones.

    Returns `None` for `feedback="identity"`, otherwise a float32 tensor of shape `(n_matrices, d_error, d_model)`
    with `n_matrices` = `n_blocks` or 1 (shared). The entries have mean 0 and variance `feedback_scale**2 / d_model`,
    so `E ||B e||^2 = feedback_scale**2 ||e||^2` for any width and any `d_error`.
    """
    if config.feedback == "identity":
        return None
    n_matrices = n_blocks if config.per_block_feedback else 1
    generator = torch.Generator(device="cpu").manual_seed(config.feedback_seed)
    shape = (n_matrices, d_error, d_model)
    std = config.feedback_scale / math.sqrt(d_model)
    if config.feedback == "gaussian":
        return torch.randn(shape, generator=generator) * std
    # uniform on [-a, a] has variance a^2 / 3
    bound = std * math.sqrt(3.0)
    return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound


class DirectFeedback(torch.autograd.Function):
    """Identity on the last block's output in the forward pass; `B_i e` for every block's output in the backward."""

    @staticmethod
    def forward(ctx, handle, *block_outputs):
        ctx.handle = handle
        return block_outputs[-1].detach()

    @staticmethod
    def backward(ctx, grad_last):
        handle = ctx.handle
        error = grad_last if handle.config.error_source == "last_block" else handle.pop_logits_error()
        feedback = handle.project(error, grad_last.dtype)
        grads = list(feedback)
        if handle.config.last_block_true_error:
            grads[-1] = grad_last
        return (None, *grads)


class CaptureError(torch.autograd.Function):
    """Identity on the logits that keeps their gradient for `DirectFeedback` (`error_source="logits"`)."""

    @staticmethod
    def forward(ctx, handle, logits):
        ctx.handle = handle
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad_logits):
        ctx.handle.logits_error = grad_logits
        return None, grad_logits


class FeedbackHandle:
    """The hooks that `attach_feedback` put on a model, with the feedback matrices; `remove()` undoes everything."""

    def __init__(self, model: nn.Module, config: DFAConfig):
        self.model = model
        self.config = config
        self.blocks, self.final_norm = find_blocks(model, config.blocks, config.final_norm)
        self.n_blocks = len(self.blocks)
        self.block_outputs = []
        self.logits_error = None
        self.hooks = []
        self.frozen = []
        self.untied = False
        self.matrices = None
        self.matrices_on_device = {}
        self.active = True

        if config.rule == "dfa":
            self._attach_dfa()
        elif config.rule == "shallow":
            self._attach_shallow()

    # ---- dfa ----

    def _attach_dfa(self):
        layerdrop = max(getattr(module, "layerdrop", 0.0) or 0.0 for module in self.model.modules())
        if layerdrop > 0:
            raise UnsupportedModelError(
                f"DFA needs every block to run in every training step, but layerdrop={layerdrop} skips blocks at "
                "random; build the model with `layerdrop=0.0` in its config."
            )
        d_model = self.model.config.hidden_size
        if self.config.error_source == "logits":
            head = self.model.get_output_embeddings()
            d_error = head.weight.shape[0]
            self.hooks.append(head.register_forward_hook(self._capture_logits_hook))
        else:
            d_error = d_model
        self.matrices = make_feedback_matrices(self.config, self.n_blocks, d_error, d_model)

        for index, block in enumerate(self.blocks):
            check_checkpointing_keeps_hooks_outside(block)
            self.hooks.append(block.register_forward_pre_hook(self._make_pre_hook(index), with_kwargs=True))
            self.hooks.append(block.register_forward_hook(self._make_output_hook(index)))

    def _make_pre_hook(self, index):
        def pre_hook(module, args, kwargs):
            if not torch.is_grad_enabled() or not self.active:
                return None
            reentrant = uses_reentrant_checkpointing(module)
            if index == 0:
                # the first block keeps its input attached so that the embeddings learn from its local backward
                self.block_outputs = []
                return None
            if args:
                return (cut_gradient(args[0], reentrant),) + tuple(args[1:]), kwargs
            if "hidden_states" not in kwargs:
                raise UnsupportedModelError(
                    f"Block {index} of {type(self.model).__name__} was called without positional arguments and "
                    f"without a `hidden_states` keyword (got {sorted(kwargs)}), so DFA cannot find its input; pass the hidden "
                    "states first or as `hidden_states=`."
                )
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = cut_gradient(kwargs["hidden_states"], reentrant)
            return args, kwargs

        return pre_hook

    def _make_output_hook(self, index):
        def output_hook(module, args, out):
            if not torch.is_grad_enabled() or not self.active:
                return None
            hidden = hidden_states_of(out)
            self.block_outputs.append(hidden)
            if index < self.n_blocks - 1:
                return None
            if len(self.block_outputs) != self.n_blocks:
                raise RuntimeError(
                    f"DFA expected the {self.n_blocks} blocks to run once each, in order, per forward pass; "
                    f"{len(self.block_outputs)} ran. Models that skip or repeat blocks are not supported."
                )
            outputs, self.block_outputs = self.block_outputs, []
            return replace_hidden_states(out, DirectFeedback.apply(self, *outputs))

        return output_hook

    def _capture_logits_hook(self, module, args, output):
        if not torch.is_grad_enabled() or not self.active:
            return None
        return CaptureError.apply(self, output)

    def pop_logits_error(self) -> torch.Tensor:
        error, self.logits_error = self.logits_error, None
        if error is None:
            raise RuntimeError(
                "No gradient reached the logits before the feedback; the LM head must produce the loss."
            )
        return error

    def feedback_matrices(self, device: torch.device) -> torch.Tensor | None:
        """Return the feedback matrices, `(n_matrices, d_error, d_model)` float32, cached on `device`."""
        if self.matrices is None:
            return None
        key = str(device)
        if key not in self.matrices_on_device:
            self.matrices_on_device[key] = self.matrices.to(device)
        return self.matrices_on_device[key]

    def project(self, error: torch.Tensor, dtype: torch.dtype) -> list:
        """Return the feedback `B_i e` for each block, computed in float32 and cast to `dtype`.

        Args:
            error (`torch.Tensor`): the global error, `(batch, seq, d_error)`.
            dtype (`torch.dtype`): dtype of the block outputs.
        """
        matrices = self.feedback_matrices(error.device)
        if matrices is None:
            # identity: every block receives e itself
            scaled = error * self.config.feedback_scale if self.config.feedback_scale != 1.0 else error
            return [scaled] * self.n_blocks

        error32 = error.float()
        if matrices.shape[0] == 1:
            # (B, T, d_err) @ (d_err, d_model) -> (B, T, d_model), shared by all blocks
            shared = (error32 @ matrices[0]).to(dtype)
            return [shared] * self.n_blocks
        # (B, T, d_err) x (L, d_err, d_model) -> (L, B, T, d_model), one batched product for all blocks
        per_block = torch.einsum("btk,lkd->lbtd", error32, matrices).to(dtype)
        return list(per_block.unbind(0))

    @contextlib.contextmanager
    def suspended(self):
        """Let the `dfa` hooks pass everything through inside this context, so the model trains by backpropagation.

        The hooks stay registered and the feedback matrices stay in place. The `shallow` rule is not affected.
        """
        self.active = False
        try:
            yield
        finally:
            self.active = True

    # ---- shallow ----

    def _attach_shallow(self):
        head = self.model.get_output_embeddings()
        inputs = self.model.get_input_embeddings()
        if head is not None and inputs is not None and head.weight is inputs.weight:
            # The head gets its own copy of the tied matrix, so that it can learn while the input embedding
            # stays at its initialisation. The saved config records the untying.
            head.weight = nn.Parameter(inputs.weight.detach().clone())
            self.model.config.tie_word_embeddings = False
            self.untied = True

        trainable = {id(p) for p in head.parameters()}
        if self.final_norm is not None:
            trainable |= {id(p) for p in self.final_norm.parameters()}
        for param in self.model.parameters():
            if id(param) not in trainable and param.requires_grad:
                param.requires_grad_(False)
                self.frozen.append(param)
        self.hooks.append(self.blocks[-1].register_forward_hook(self._detach_output_hook))

    @staticmethod
    def _detach_output_hook(module, args, output):
        return replace_hidden_states(output, hidden_states_of(output).detach())

    # ---- common ----

    def remove(self):
        """Remove the hooks and unfreeze what `shallow` froze. An untied head stays untied."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        for param in self.frozen:
            param.requires_grad_(True)
        self.frozen = []
        self.block_outputs = []
        self.logits_error = None


def attach_feedback(model: nn.Module, config: DFAConfig | None = None) -> FeedbackHandle:
    """Make `model` train by `config.rule` in an ordinary training loop; return a handle whose `remove()` undoes it.

    Args:
        model (`nn.Module`): a Hugging Face causal LM (or any model whose blocks `config.blocks` names).
        config (`DFAConfig`, *optional*): the rule and feedback settings; default `DFAConfig()` (DFA, Gaussian
            feedback shared by all blocks).

    Example:

    ```python
    handle = attach_feedback(model, DFAConfig(rule="dfa"))
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()  # blocks receive B e at their outputs
    handle.remove()
    ```
    """
    return FeedbackHandle(model, config or DFAConfig())
