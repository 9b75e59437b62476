"""Alignment of DFA with backpropagation: the measurement itself, its logging and that it leaves training alone."""

import json
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from hf_dfa import DFAConfig, DFATrainer, attach_feedback
from hf_dfa import alignment as alignment_module
from hf_dfa.alignment import measure_alignment
from hf_dfa.records import METRICS, RunRecorder

VOCAB = 64
SEQ = 16


def tiny_gpt2(n_layer=3, seed=0, dropout=0.1):
    """A GPT-2 with dropout on, so that a measurement that drew other dropout masks would show."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=32,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    return GPT2LMHeadModel(config).train()


def batch(seed=1):
    return torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(seed))


class TokenBlocks(torch.utils.data.Dataset):
    def __init__(self, n=64):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def test_identity_feedback_one_block_is_exact():
    """With one block and its true error, DFA is backpropagation, so both cosines are 1."""
    model, ids = tiny_gpt2(n_layer=1), batch()
    handle = attach_feedback(model, DFAConfig(rule="dfa", feedback="identity", last_block_true_error=True))
    metrics = measure_alignment(handle, lambda: model(ids, labels=ids).loss)

    assert metrics["alignment/block_0/update_cos"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["alignment/block_0/feedback_cos"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["alignment/update_cos_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["alignment/feedback_cos_mean"] == pytest.approx(1.0, abs=1e-6)


def test_random_feedback_cosines_in_range():
    model, ids = tiny_gpt2(n_layer=3), batch()
    handle = attach_feedback(model, DFAConfig(rule="dfa", feedback="gaussian", feedback_seed=2))
    metrics = measure_alignment(handle, lambda: model(ids, labels=ids).loss)

    expected = {f"alignment/block_{i}/{name}" for i in range(3) for name in ("update_cos", "feedback_cos")}
    expected |= {"alignment/update_cos_mean", "alignment/feedback_cos_mean"}
    assert set(metrics) == expected
    for key, value in metrics.items():
        assert -1.0 <= value <= 1.0, f"{key} = {value}"
    # a random 32 x 32 projection of e is nearly orthogonal to the true gradient
    for i in range(3):
        assert abs(metrics[f"alignment/block_{i}/feedback_cos"]) < 0.9


def test_measurement_leaves_grads_and_rng():
    model, ids = tiny_gpt2(), batch()
    handle = attach_feedback(model, DFAConfig(rule="dfa", error_source="logits"))
    before = torch.get_rng_state()
    measure_alignment(handle, lambda: model(ids, labels=ids).loss)

    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in model.parameters())
    assert handle.active
    assert handle.logits_error is None
    # the DFA hooks still act after the measurement
    model(ids, labels=ids).loss.backward()
    assert model.transformer.h[1].attn.c_attn.weight.grad is not None


def test_logged_keys_reach_metrics_jsonl(tmp_path):
    config = DFAConfig(rule="dfa", alignment_every=2)
    trainer = DFATrainer(
        model=tiny_gpt2(), args=training_args(tmp_path), train_dataset=TokenBlocks(), dfa_config=config
    )
    trainer.add_callback(RunRecorder(str(tmp_path), tokens_per_step=8 * SEQ))
    trainer.train()

    with open(os.path.join(tmp_path, METRICS)) as f:
        rows = [json.loads(line) for line in f]
    aligned = [row for row in rows if "alignment/update_cos_mean" in row]
    assert [row["step"] for row in aligned] == [0, 2]
    for row in aligned:
        for i in range(3):
            assert -1.0 <= row[f"alignment/block_{i}/update_cos"] <= 1.0
            assert -1.0 <= row[f"alignment/block_{i}/feedback_cos"] <= 1.0
        assert "alignment/feedback_cos_mean" in row


def test_alignment_keeps_trajectory(tmp_path):
    runs = {}
    for every in (0, 1):
        config = DFAConfig(rule="dfa", alignment_every=every)
        trainer = DFATrainer(
            model=tiny_gpt2(),
            args=training_args(tmp_path / str(every), gradient_accumulation_steps=2, per_device_train_batch_size=4),
            train_dataset=TokenBlocks(),
            dfa_config=config,
        )
        trainer.train()
        runs[every] = trainer

    losses = {every: [row["loss"] for row in t.state.log_history if "loss" in row] for every, t in runs.items()}
    assert len(losses[0]) == 4
    assert losses[1] == losses[0]
    for (name, p), q in zip(runs[0].model.named_parameters(), runs[1].model.parameters()):
        assert torch.equal(p, q), name
    # one measurement per optimiser step, not per accumulated batch
    measured = [row["step"] for row in runs[1].state.log_history if "alignment/update_cos_mean" in row]
    assert measured == [0, 1, 2, 3]


def test_alignment_off_costs_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("measure_alignment ran with alignment_every=0")

    monkeypatch.setattr("hf_dfa.trainer.measure_alignment", fail)
    model = tiny_gpt2()
    trainer = DFATrainer(
        model=model, args=training_args(tmp_path), train_dataset=TokenBlocks(), dfa_config=DFAConfig()
    )
    hooks_before = [len(block._forward_hooks) + len(block._forward_pre_hooks) for block in model.transformer.h]
    trainer.train()

    hooks_after = [len(block._forward_hooks) + len(block._forward_pre_hooks) for block in model.transformer.h]
    assert hooks_after == hooks_before
    assert not any(key.startswith("alignment/") for row in trainer.state.log_history for key in row)


def test_alignment_removes_its_hooks(tmp_path):
    model = tiny_gpt2()
    trainer = DFATrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=TokenBlocks(),
        dfa_config=DFAConfig(alignment_every=1),
    )
    hooks_before = [len(block._forward_hooks) for block in model.transformer.h]
    trainer.train()

    assert [len(block._forward_hooks) for block in model.transformer.h] == hooks_before
    assert any("alignment/update_cos_mean" in row for row in trainer.state.log_history)


@pytest.mark.parametrize("rule", ["bp", "shallow"])
def test_alignment_ignored_outside_dfa(tmp_path, rule):
    trainer = DFATrainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=TokenBlocks(),
        dfa_config=DFAConfig(rule=rule, alignment_every=1),
    )
    trainer.train()
    assert not any(key.startswith("alignment/") for row in trainer.state.log_history for key in row)


def test_measure_alignment_rejects_shallow():
    handle = attach_feedback(tiny_gpt2(), DFAConfig(rule="shallow"))
    with pytest.raises(ValueError, match="for `rule='dfa'` only, got rule='shallow'"):
        alignment_module.measure_alignment(handle, lambda: None)
