"""Model cards: their metadata and content, and the folders that `DFATrainer` saves and uploads."""

import concurrent.futures
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainingArguments, default_data_collator

from hf_dfa import DFAConfig, DFAConfigError, DFATrainer
from hf_dfa.model_card import build_model_card, write_model_card

WORDS = ["the", "quality", "of", "mercy", "is", "not", "strained", "it", "droppeth", "as", "gentle", "rain"]
SEQ = 8


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_llama(vocab_size: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def token_blocks(vocab_size: int, n: int = 16) -> list[dict]:
    ids = torch.randint(2, vocab_size, (n, SEQ), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def make_trainer(output_dir, rule="dfa", **overrides) -> DFATrainer:
    tokenizer = tiny_tokenizer()
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    values.update(overrides)
    data = token_blocks(len(tokenizer))
    return DFATrainer(
        model=tiny_llama(len(tokenizer)),
        args=TrainingArguments(**values),
        dfa_config=DFAConfig(rule=rule, feedback="uniform", feedback_seed=3),
        train_dataset=data,
        eval_dataset=data[:4],
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )


def write_run_record(output_dir, **values):
    os.makedirs(output_dir, exist_ok=True)
    record = {"size": "tiny-llama", "dataset": "embedded", "tokenizer": "word-level", "batch_size": 4, "seq_len": SEQ}
    record.update(values)
    with open(os.path.join(output_dir, "run.json"), "w") as f:
        json.dump(record, f)


# ---- the card itself ----


def test_card_parses_with_metadata_and_sections(tmp_path):
    config = DFAConfig(rule="dfa", per_block_feedback=True, feedback_seed=7)
    log_history = [{"loss": 4.0, "step": 10}, {"eval_loss": 3.5, "step": 20}]
    card = build_model_card(
        config,
        model=tiny_llama(64),
        run_record={"size": "tiny", "dataset": "Salesforce/wikitext", "seq_len": 128, "batch_size": 32},
        log_history=log_history,
        global_step=20,
        total_flos=1.25e12,
        tokens=81920,
        model_id="someone/tiny-dfa",
        tags=["experiment"],
    )
    path = write_model_card(card, str(tmp_path))
    loaded = ModelCard.load(path)

    assert loaded.data.tags == ["hf-dfa", "dfa", "direct-feedback-alignment", "experiment"]
    assert loaded.data.library_name == "transformers"
    assert loaded.data.pipeline_tag == "text-generation"
    assert loaded.data.datasets == ["Salesforce/wikitext"]
    text = loaded.text
    assert text.lstrip().startswith("# tiny-dfa\n")
    assert "Rule: `dfa`" in text
    assert "| `per_block_feedback` | `True` |" in text
    assert "| `feedback_seed` | `7` |" in text
    assert "| Validation loss (nats per token) | 3.5000 |" in text
    assert f"| Validation perplexity | {torch.tensor(3.5).exp().item():.2f} |" in text
    assert "Last evaluation at step 20" in text
    assert "| Training tokens | 81,920 |" in text
    assert "| Training FLOPs | 1.250e+12" in text
    assert "| Non-embedding parameters (weight matrices of the blocks) |" in text
    assert 'AutoModelForCausalLM.from_pretrained("someone/tiny-dfa")' in text
    for key in ("nokland2016direct", "launay2020direct", "filipovich2022scaling", "arXiv:2210.14593"):
        assert key in text


@pytest.mark.parametrize("rule", ["bp", "shallow"])
def test_card_tags_follow_rule(rule):
    card = build_model_card(DFAConfig(rule=rule))
    assert card.data.tags == ["hf-dfa", rule]
    assert "Feedback setting" not in card.text
    assert "No validation loss was recorded." in card.text


@pytest.mark.parametrize("dataset", ["embedded", "corpus/train.txt", "a.jsonl,b.jsonl"])
def test_local_datasets_stay_out_of_metadata(tmp_path, dataset):
    card = build_model_card(DFAConfig(), run_record={"dataset": dataset})
    assert card.data.datasets is None
    assert f"`{dataset}`" in card.text


# ---- saved and uploaded folders ----


def test_checkpoints_and_model_carry_card(tmp_path):
    output_dir = tmp_path / "run"
    write_run_record(output_dir)
    trainer = make_trainer(output_dir)
    trainer.train()
    trainer.save_model(str(output_dir))

    for folder in (output_dir / "checkpoint-2", output_dir / "checkpoint-4", output_dir):
        card = ModelCard.load(folder / "README.md")
        assert card.data.tags == ["hf-dfa", "dfa", "direct-feedback-alignment"]
        assert DFAConfig.from_pretrained(str(folder)).feedback == "uniform"
    final = ModelCard.load(output_dir / "README.md").text
    last_eval = [row for row in trainer.state.log_history if "eval_loss" in row][-1]
    assert last_eval["step"] == 4
    assert f"| Validation loss (nats per token) | {last_eval['eval_loss']:.4f} |" in final
    assert f"| Training tokens | {4 * 4 * SEQ:,} |" in final
    assert f"| Training FLOPs | {trainer.state.total_flos:.3e}" in final
    assert "| Size | `tiny-llama` |" in final

    # loading and generating need transformers only
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(output_dir)!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(output_dir)!r})\n"
        "inputs = tokenizer('the quality of mercy', return_tensors='pt')\n"
        "out = model.generate(**inputs, max_new_tokens=5, do_sample=False)\n"
        "assert out.shape[1] == inputs['input_ids'].shape[1] + 5, out.shape\n"
        "assert 'hf_dfa' not in sys.modules\n"
        "print(tokenizer.decode(out[0]))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("the quality of mercy")


def test_resume_still_checks_saved_dfa_config(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, eval_strategy="no")
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "README.md").is_file()

    (checkpoint / "dfa_config.json").write_text("{not json")
    with pytest.raises(DFAConfigError, match="is not valid JSON"):
        make_trainer(tmp_path, max_steps=4, eval_strategy="no").train(resume_from_checkpoint=str(checkpoint))
    os.remove(checkpoint / "dfa_config.json")
    with pytest.raises(DFAConfigError, match="No dfa_config.json in"):
        make_trainer(tmp_path, max_steps=4, eval_strategy="no").train(resume_from_checkpoint=str(checkpoint))


class RecordingHubApi:
    """Stands in for `huggingface_hub.HfApi`: records the files of every uploaded folder and uploads nothing."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, run_as_future=False, **kwargs):
        files = {}
        for name in sorted(os.listdir(folder_path)):
            path = os.path.join(folder_path, name)
            if not os.path.isfile(path) or name.startswith("_"):
                continue
            files[name] = None
            if name.endswith((".md", ".json")):
                with open(path, encoding="utf-8") as f:
                    files[name] = f.read()
        self.uploads.append({"repo_id": repo_id, "path_in_repo": kwargs.get("path_in_repo"), "files": files})
        if run_as_future:
            future = concurrent.futures.Future()
            future.set_result(None)
            return future
        return None


def test_push_to_hub_uploads_card_config_tokenizer(tmp_path, monkeypatch):
    api = RecordingHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    output_dir = tmp_path / "run"
    write_run_record(output_dir)
    trainer = make_trainer(output_dir, push_to_hub=True, hub_model_id="someone/tiny-dfa", eval_strategy="no")
    trainer.train()
    trainer.push_to_hub(tags=["experiment"])

    # one upload per checkpoint (hub_strategy "every_save"), then the final one
    folders = [upload for upload in api.uploads if upload["path_in_repo"] is None]
    assert len(folders) == 3
    for upload in folders:
        assert upload["repo_id"] == "someone/tiny-dfa"
        for name in ("README.md", "dfa_config.json", "tokenizer.json", "config.json", "model.safetensors"):
            assert name in upload["files"], f"{name} missing from an upload"
        assert json.loads(upload["files"]["dfa_config.json"])["feedback"] == "uniform"

    final = ModelCard(folders[-1]["files"]["README.md"])
    assert final.data.tags == ["hf-dfa", "dfa", "direct-feedback-alignment", "experiment"]
    assert 'AutoModelForCausalLM.from_pretrained("someone/tiny-dfa")' in final.text
    assert "| Optimiser steps | 4 |" in final.text


def test_base_model_metadata_only_for_hub_ids(tmp_path):
    local = build_model_card(DFAConfig(), base_model=str(tmp_path))
    assert local.data.base_model is None
    assert f"starting from the weights of `{tmp_path}`" in local.text

    hub = build_model_card(DFAConfig(), base_model="HuggingFaceTB/SmolLM2-135M")
    assert hub.data.base_model == "HuggingFaceTB/SmolLM2-135M"
