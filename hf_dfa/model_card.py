"""Model cards (README.md) for models trained with hf-dfa, in the format `huggingface_hub.ModelCard` reads.

`DFATrainer` writes one beside every checkpoint and the final model, so the folder that `--push_to_hub` uploads
carries it. The card gives the training rule and feedback settings, the model's size, the training budget, the last
validation loss, how to load the model with plain transformers, and the references for the method.
"""

import math
import os
import re

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from .blocks import UnsupportedModelError, find_blocks
from .config import DFAConfig
from .records import read_run_record

MODEL_CARD_NAME = "README.md"
EMBEDDED_DATASET = "embedded"

RULE_NAMES = {
    "bp": "backpropagation",
    "dfa": "Direct Feedback Alignment (DFA)",
    "shallow": "the shallow baseline",
}
RULE_DESCRIPTIONS = {
    "bp": "Every parameter learned from the gradient of the loss, computed by ordinary backpropagation.",
    "dfa": (
        "The final norm and the LM head learned by backpropagation. Every block received, at its output, the global "
        "error `e` projected by a fixed random matrix (`B e`, or `B_i e` with one matrix per block) in place of the "
        "gradient from the blocks above it, "
        "and learned from it by backpropagation inside the block. The embeddings learned through the first block."
    ),
    "shallow": (
        "The embeddings and every block stayed at their random initialisation; only the final norm and the LM head "
        "learned, by backpropagation. It measures what the LM head alone learns from random features."
    ),
}
# settings of `DFAConfig` that shape the feedback, shown in the card for `rule="dfa"`
FEEDBACK_SETTINGS = (
    "feedback",
    "error_source",
    "per_block_feedback",
    "feedback_scale",
    "feedback_seed",
    "last_block_true_error",
)
CITATIONS = r"""```bibtex
@inproceedings{nokland2016direct,
  title     = {Direct Feedback Alignment Provides Learning in Deep Neural Networks},
  author    = {N{\o}kland, Arild},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {29},
  year      = {2016},
  note      = {arXiv:1609.01596}
}

@inproceedings{launay2020direct,
  title     = {Direct Feedback Alignment Scales to Modern Deep Learning Tasks and Architectures},
  author    = {Launay, Julien and Poli, Iacopo and Boniface, Fran{\c{c}}ois and Krzakala, Florent},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {33},
  year      = {2020},
  note      = {arXiv:2006.12878}
}

@article{filipovich2022scaling,
  title   = {Scaling Laws Beyond Backpropagation},
  author  = {Filipovich, Matthew J. and Cappelli, Alessandro and Hesslow, Daniel and Launay, Julien},
  journal = {arXiv preprint arXiv:2210.14593},
  year    = {2022}
}
```"""
# file types that `hf_dfa.data` reads from local paths
LOCAL_EXTENSIONS = (".txt", ".json", ".jsonl")
CITATION_SECTION = f"""## Citation

Direct Feedback Alignment was introduced by Nøkland (2016), applied to Transformers and other modern architectures
by Launay et al. (2020), and compared with backpropagation through scaling laws by Filipovich et al. (2022):

{CITATIONS}"""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def card_tags(rule: str, extra_tags=None) -> list[str]:
    """Return the card's tags: `hf-dfa`, the rule, `direct-feedback-alignment` for DFA, then `extra_tags`."""
    tags = ["hf-dfa", rule]
    if rule == "dfa":
        tags.append("direct-feedback-alignment")
    if isinstance(extra_tags, str):
        extra_tags = [extra_tags]
    for tag in extra_tags or []:
        if tag not in tags:
            tags.append(tag)
    return tags


def is_hub_id(name: str | None) -> bool:
    """Return whether `name` reads as a Hugging Face Hub repository id rather than a local path."""
    if not name or not HUB_ID.match(name):
        return False
    return not name.endswith(LOCAL_EXTENSIONS) and not os.path.exists(name)


def hub_datasets(dataset: str | None) -> list[str]:
    """Return the entries of the comma-separated `dataset` that name Hugging Face Hub datasets, not local files."""
    if not dataset:
        return []
    names = [name.strip() for name in dataset.split(",")]
    return [name for name in names if name != EMBEDDED_DATASET and is_hub_id(name)]


def describe_dataset(dataset: str | None) -> str:
    if not dataset:
        return "not recorded"
    if dataset == EMBEDDED_DATASET:
        return "`embedded`: Shakespeare's Project Gutenberg texts and the King James Bible, packaged with hf-dfa"
    return f"`{dataset}`"


def parameter_counts(model: nn.Module, dfa_config: DFAConfig) -> dict:
    """Return `n_params` (all distinct parameters) and `n_params_non_embedding` (weight matrices of the blocks).

    The second count is the `N` of scaling laws, `12 n_layer d_model**2` for GPT-2, and is left out when the blocks
    of the model cannot be found.
    """
    counts = {"n_params": sum(p.numel() for p in model.parameters())}
    try:
        blocks, _ = find_blocks(model, dfa_config.blocks, dfa_config.final_norm)
    except UnsupportedModelError:
        return counts
    counts["n_params_non_embedding"] = sum(p.numel() for p in blocks.parameters() if p.dim() >= 2)
    counts["n_layer"] = len(blocks)
    return counts


def last_evaluation(log_history) -> dict | None:
    """Return the last row of a Trainer log history that has `eval_loss`, or None."""
    rows = [row for row in log_history or [] if "eval_loss" in row]
    return rows[-1] if rows else None


def format_count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.3e}"


def build_model_card(
    dfa_config: DFAConfig,
    model: nn.Module | None = None,
    run_record: dict | None = None,
    log_history=None,
    global_step: int | None = None,
    total_flos: float | None = None,
    tokens: int | None = None,
    flops_source: str = "`hf_dfa.flops`: the matrix products of the training rule",
    model_id: str | None = None,
    tags=None,
    license: str | None = None,
    base_model: str | None = None,
) -> ModelCard:
    """Build the model card of a model trained with hf-dfa.

    Args:
        dfa_config (`DFAConfig`): the training rule and feedback settings.
        model (`nn.Module`, *optional*): the trained model, for its architecture and parameter counts.
        run_record (`dict`, *optional*): the contents of `run.json` (size, dataset, tokenizer, batch size...).
        log_history (`list[dict]`, *optional*): `TrainerState.log_history`; its last `eval_loss` is reported.
        global_step (`int`, *optional*): optimiser steps taken.
        total_flos (`float`, *optional*): training FLOPs so far.
        tokens (`int`, *optional*): training tokens so far.
        flops_source (`str`, *optional*): how `total_flos` was counted, shown beside it.
        model_id (`str`, *optional*): Hub repository id (`user/name`) or path shown in the loading example.
        tags (`str` or `list[str]`, *optional*): tags added after `hf-dfa`, the rule and `direct-feedback-alignment`.
        license (`str`, *optional*): license identifier for the metadata.
        base_model (`str`, *optional*): the model whose weights training started from.
    """
    record = run_record or {}
    rule = dfa_config.rule
    dataset = record.get("dataset")
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=card_tags(rule, tags),
        datasets=hub_datasets(dataset) or None,
        license=license,
        # the Hub accepts repository ids only; a local path stays in the card's text
        base_model=base_model if is_hub_id(base_model) else None,
    )

    counts = parameter_counts(model, dfa_config) if model is not None else {}
    architecture = type(model).__name__ if model is not None else "causal LM"
    name = (model_id or "").rstrip("/").split("/")[-1] or f"{architecture} trained with {RULE_NAMES[rule]}"
    sections = [f"# {name}", summary_section(rule, architecture, counts, base_model)]
    sections.append(rule_section(dfa_config))
    sections.append(size_section(record, counts, model))
    sections.append(training_section(record, global_step, tokens, total_flos, flops_source, dataset))
    sections.append(results_section(last_evaluation(log_history)))
    sections.append(usage_section(model_id))
    sections.append(CITATION_SECTION)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def summary_section(rule, architecture, counts, base_model) -> str:
    size = f" with {counts['n_params']:,} parameters" if "n_params" in counts else ""
    start = f"starting from the weights of `{base_model}`" if base_model else "from random initialisation"
    summary = f"A `{architecture}` causal language model{size}, trained {start} by {RULE_NAMES[rule]} with hf-dfa"
    if rule == "bp":
        return summary + ", as the reference for models trained by Direct Feedback Alignment."
    return summary + " in place of end-to-end backpropagation."


def rule_section(dfa_config: DFAConfig) -> str:
    lines = ["## Training rule", "", f"Rule: `{dfa_config.rule}`. {RULE_DESCRIPTIONS[dfa_config.rule]}"]
    if dfa_config.rule == "dfa":
        lines += ["", "| Feedback setting | Value |", "|---|---|"]
        lines += [f"| `{key}` | `{getattr(dfa_config, key)}` |" for key in FEEDBACK_SETTINGS]
        lines += [
            "",
            "The feedback matrices are not stored: they are drawn again from `feedback_seed`. `dfa_config.json` in "
            "this folder holds every setting, so `hf_dfa.DFAConfig.from_pretrained` restores them to continue "
            "training.",
        ]
    return "\n".join(lines)


def size_section(record, counts, model) -> str:
    rows = []
    if record.get("size"):
        rows.append(("Size", f"`{record['size']}`"))
    if "n_params" in counts:
        rows.append(("Parameters", f"{counts['n_params']:,}"))
    if "n_params_non_embedding" in counts:
        rows.append(
            ("Non-embedding parameters (weight matrices of the blocks)", f"{counts['n_params_non_embedding']:,}")
        )
    if "n_layer" in counts:
        rows.append(("Blocks", str(counts["n_layer"])))
    config = getattr(model, "config", None)
    if getattr(config, "hidden_size", None):
        rows.append(("Width (`hidden_size`)", str(config.hidden_size)))
    if getattr(config, "vocab_size", None):
        rows.append(("Vocabulary", f"{config.vocab_size:,}"))
    return table_section("Model", rows)


def training_section(record, global_step, tokens, total_flos, flops_source, dataset) -> str:
    rows = [("Dataset", describe_dataset(dataset))]
    if record.get("tokenizer"):
        rows.append(("Tokenizer", f"`{record['tokenizer']}`"))
    if global_step is not None:
        rows.append(("Optimiser steps", f"{global_step:,}"))
    if tokens:
        rows.append(("Training tokens", f"{tokens:,}"))
    if total_flos:
        rows.append(("Training FLOPs", f"{total_flos:.3e}, counted by {flops_source}"))
    for key, label in (("seq_len", "Sequence length"), ("batch_size", "Sequences per step")):
        if record.get(key):
            rows.append((label, format_count(record[key])))
    for key, label in (("learning_rate", "Peak learning rate"), ("seed", "Seed")):
        if record.get(key) is not None:
            rows.append((label, str(record[key])))
    return table_section("Training", rows)


def results_section(evaluation: dict | None) -> str:
    if evaluation is None:
        return "## Results\n\nNo validation loss was recorded."
    loss = evaluation["eval_loss"]
    perplexity = math.exp(min(loss, 700.0))
    step = evaluation.get("step")
    at_step = f" at step {step:,}" if isinstance(step, int) else ""
    rows = [("Validation loss (nats per token)", f"{loss:.4f}"), ("Validation perplexity", f"{perplexity:.2f}")]
    return table_section("Results", rows, f"Last evaluation{at_step}, on the trainer's evaluation dataset.")


def usage_section(model_id: str | None) -> str:
    path = model_id or "path/to/this/folder"
    return f"""## How to use

The weights are an ordinary transformers checkpoint; loading and generating need no hf-dfa:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForCausalLM.from_pretrained("{path}")
inputs = tokenizer("The quality of mercy", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```"""


def table_section(title: str, rows: list[tuple[str, str]], caption: str = "") -> str:
    lines = [f"## {title}", ""]
    if caption:
        lines += [caption, ""]
    lines += ["| | |", "|---|---|"] + [f"| {label} | {value} |" for label, value in rows]
    return "\n".join(lines)


def trainer_model_card(trainer, **overrides) -> ModelCard:
    """Build the model card of `trainer`'s model from its state and the `run.json` in its `output_dir`.

    Args:
        trainer (`DFATrainer`): the trainer.
        **overrides: arguments of `build_model_card` that replace what the trainer provides (`tags`, `license`...).
    """
    # `state.total_flos` is brought up to date at every log and checkpoint. `store_flos` would be a collective
    # call, and this runs on the main process only.
    record = read_run_record(trainer.args.output_dir) or {}
    state = trainer.state
    tokens = state.num_input_tokens_seen or None
    if record.get("batch_size") and record.get("seq_len"):
        tokens = state.global_step * record["batch_size"] * record["seq_len"]
    values = dict(
        dfa_config=trainer.dfa_config,
        model=trainer.accelerator.unwrap_model(trainer.model),
        run_record=record,
        log_history=state.log_history,
        global_step=state.global_step,
        total_flos=state.total_flos,
        tokens=tokens,
        model_id=trainer.args.hub_model_id,
        base_model=record.get("base_model"),
    )
    if trainer.flop_counts is None:
        values["flops_source"] = "`transformers.Trainer` (6 x parameters x tokens)"
    values.update({key: value for key, value in overrides.items() if value is not None})
    return build_model_card(**values)


def write_model_card(card: ModelCard, directory: str) -> str:
    """Write `card` to `README.md` in `directory` and return the file's path."""
    path = os.path.join(directory, MODEL_CARD_NAME)
    card.save(path)
    return path
