"""Where the blocks and the final norm sit in each Hugging Face causal LM architecture."""

from torch import nn

# `config.model_type` -> (dotted path of the list of blocks, dotted path of the final norm)
MODEL_BLOCKS = {
    "gpt2": ("transformer.h", "transformer.ln_f"),
    "gptj": ("transformer.h", "transformer.ln_f"),
    "gpt_neo": ("transformer.h", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm"),
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm"),
    "bloom": ("transformer.h", "transformer.ln_f"),
    "falcon": ("transformer.h", "transformer.ln_f"),
    "llama": ("model.layers", "model.norm"),
    "mistral": ("model.layers", "model.norm"),
    "qwen2": ("model.layers", "model.norm"),
    "gemma": ("model.layers", "model.norm"),
    "phi": ("model.layers", "model.final_layernorm"),
    "codegen": ("transformer.h", "transformer.ln_f"),
    "gpt_bigcode": ("transformer.h", "transformer.ln_f"),
    "mpt": ("transformer.blocks", "transformer.norm_f"),
    "mixtral": ("model.layers", "model.norm"),
    "qwen3": ("model.layers", "model.norm"),
    "gemma2": ("model.layers", "model.norm"),
    "gemma3_text": ("model.layers", "model.norm"),
    "phi3": ("model.layers", "model.norm"),
    "starcoder2": ("model.layers", "model.norm"),
    "stablelm": ("model.layers", "model.norm"),
    "olmo": ("model.layers", "model.norm"),
    "olmo2": ("model.layers", "model.norm"),
    "granite": ("model.layers", "model.norm"),
    "cohere": ("model.layers", "model.norm"),
    "smollm3": ("model.layers", "model.norm"),
}


class UnsupportedModelError(ValueError):
    """Raised when the blocks of a model cannot be found."""


def get_submodule(model: nn.Module, path: str, what: str, option: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UnsupportedModelError(
            f"The {what} path {path!r} does not exist in model type {model_type!r}; pass the right dotted path as "
            f"`{option}` (e.g. DFAConfig({option}=...))."
        ) from None


def find_blocks(
    model: nn.Module, blocks: str | None = None, final_norm: str | None = None
) -> tuple[nn.ModuleList, nn.Module | None]:
    """Return the model's list of blocks and its final norm, from the user's paths or the `MODEL_BLOCKS` table.

    Args:
        model (`nn.Module`): a Hugging Face causal LM.
        blocks (`str`, *optional*): dotted path of the list of blocks; overrides the table.
        final_norm (`str`, *optional*): dotted path of the final norm; overrides the table.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = MODEL_BLOCKS.get(model_type)
    if blocks is None:
        if known is None:
            raise UnsupportedModelError(
                f"hf-dfa does not know where the blocks of model type {model_type!r} are; pass their dotted path, "
                f"e.g. DFAConfig(blocks='model.layers') or --blocks model.layers. Known types: "
                f"{', '.join(sorted(MODEL_BLOCKS))}."
            )
        blocks = known[0]
    if final_norm is None and known is not None:
        final_norm = known[1]

    block_list = get_submodule(model, blocks, "blocks", "blocks")
    if not isinstance(block_list, (nn.ModuleList, nn.Sequential)) or len(block_list) == 0:
        raise UnsupportedModelError(
            f"`blocks={blocks!r}` must name a non-empty nn.ModuleList of blocks in model type {model_type!r}, got "
            f"{type(block_list).__name__}."
        )
    norm = None
    if final_norm:
        parent_path, _, name = final_norm.rpartition(".")
        parent = get_submodule(model, parent_path, "final norm", "final_norm")
        # OPT with `do_layer_norm_before=False` (opt-350m) has its final norm set to None
        if not (hasattr(parent, name) and getattr(parent, name) is None):
            norm = get_submodule(model, final_norm, "final norm", "final_norm")
    return block_list, norm
