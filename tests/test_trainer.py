"""DFATrainer against plain Trainer, gradient accumulation, resume, divergence and FLOP counting."""

import copy
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from hf_dfa import DFAConfig, DFAConfigError, DFATrainer
from hf_dfa.flops import FlopCounts

VOCAB = 64
SEQ = 16


class TokenBlocks(torch.utils.data.Dataset):
    def __init__(self, n=64, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_model(seed=0, tied=True):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tied,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    return GPT2LMHeadModel(config)


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
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def losses(trainer):
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def test_bp_matches_plain_trainer(tmp_path):
    data = TokenBlocks()
    plain = Trainer(model=tiny_model(), args=training_args(tmp_path / "plain"), train_dataset=data)
    plain.train()
    dfa = DFATrainer(
        model=tiny_model(), args=training_args(tmp_path / "bp"), train_dataset=data, dfa_config=DFAConfig(rule="bp")
    )
    dfa.train()

    assert losses(dfa) == losses(plain)
    assert len(losses(dfa)) == 4
    for (name, p), q in zip(plain.model.named_parameters(), dfa.model.parameters()):
        assert torch.equal(p, q), name


def test_dfa_accumulation_equals_full_batch(tmp_path):
    data = TokenBlocks()
    runs = {}
    for name, batch_size, accumulation in [("full", 8, 1), ("accumulated", 4, 2)]:
        args = training_args(
            tmp_path / name,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=2,
            optim="sgd",
            learning_rate=0.5,
        )
        trainer = DFATrainer(model=tiny_model(), args=args, train_dataset=data, dfa_config=DFAConfig(rule="dfa"))
        trainer.train()
        runs[name] = trainer.model

    for (name, p), q in zip(runs["full"].named_parameters(), runs["accumulated"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_dfa_changes_every_trainable_parameter(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DFATrainer(
        model=model, args=training_args(tmp_path), train_dataset=TokenBlocks(), dfa_config=DFAConfig(rule="dfa")
    )
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert param.requires_grad, name
        assert not torch.equal(param, before[name]), f"{name} did not change"


def test_shallow_trainer_freezes_blocks(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DFATrainer(
        model=model, args=training_args(tmp_path), train_dataset=TokenBlocks(), dfa_config=DFAConfig(rule="shallow")
    )
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert torch.equal(params["transformer.wte.weight"], before["transformer.wte.weight"])
    assert torch.equal(params["transformer.h.1.mlp.c_fc.weight"], before["transformer.h.1.mlp.c_fc.weight"])
    assert not torch.equal(params["lm_head.weight"], before["transformer.wte.weight"])


def test_resume_equals_uninterrupted_run(tmp_path):
    data = TokenBlocks()
    config = DFAConfig(rule="dfa", feedback_seed=4)
    full = DFATrainer(
        model=tiny_model(), args=training_args(tmp_path / "full", max_steps=6), train_dataset=data, dfa_config=config
    )
    full.train()

    first = DFATrainer(
        model=tiny_model(),
        args=training_args(tmp_path / "resumed", max_steps=6, save_strategy="steps", save_steps=3),
        train_dataset=data,
        dfa_config=config,
    )

    class StopAtThree(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    first.add_callback(StopAtThree())
    first.train()
    assert os.path.isfile(tmp_path / "resumed" / "checkpoint-3" / "dfa_config.json")

    # a fresh process would build the model from another seed: the checkpoint must restore everything
    second = DFATrainer(
        model=tiny_model(seed=1),
        args=training_args(tmp_path / "resumed", max_steps=6, save_strategy="steps", save_steps=3),
        train_dataset=data,
        dfa_config=DFAConfig(rule="dfa", feedback_seed=4),
    )
    second.train(resume_from_checkpoint=True)

    # the resumed log history carries the first three steps from the checkpoint
    assert losses(second) == losses(full)
    for (name, p), q in zip(full.model.named_parameters(), second.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_resume_rejects_changed_feedback(tmp_path):
    data = TokenBlocks()
    args = training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    DFATrainer(model=tiny_model(), args=args, train_dataset=data, dfa_config=DFAConfig(feedback_seed=1)).train()

    other = DFATrainer(model=tiny_model(), args=args, train_dataset=data, dfa_config=DFAConfig(feedback_seed=2))
    with pytest.raises(DFAConfigError, match="feedback_seed: saved 1, now 2"):
        other.train(resume_from_checkpoint=True)

    os.remove(tmp_path / "checkpoint-2" / "dfa_config.json")
    with pytest.raises(DFAConfigError, match="No dfa_config.json in"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_divergence_stops_without_saving(tmp_path):
    class BlowUp(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    model.lm_head.weight.fill_(float("nan"))

    args = training_args(tmp_path, max_steps=10, save_strategy="steps", save_steps=2, logging_steps=2)
    trainer = DFATrainer(model=tiny_model(), args=args, train_dataset=TokenBlocks(), dfa_config=DFAConfig())
    trainer.add_callback(BlowUp())
    trainer.train()

    assert trainer.diverged_at_step == 4
    assert trainer.state.global_step == 4
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]


@pytest.mark.parametrize("rule", ["bp", "dfa", "shallow"])
def test_total_flos_follow_rule_formula(tmp_path, rule):
    config = DFAConfig(rule=rule)
    model = tiny_model()
    trainer = DFATrainer(model=model, args=training_args(tmp_path), train_dataset=TokenBlocks(), dfa_config=config)
    trainer.train()

    counts = FlopCounts(block_params=2 * 12 * 32 * 32, n_layer=2, d_model=32, vocab_size=VOCAB)
    blocks, head = counts.forward_per_token(SEQ)
    expected_per_token = {
        "bp": 3 * (blocks + head),
        "dfa": 3 * (blocks + head) + 2 * 32 * 32,
        "shallow": blocks + 3 * head,
    }[rule]
    assert trainer.state.total_flos == 4 * 8 * SEQ * expected_per_token


def test_trainer_requires_model(tmp_path):
    with pytest.raises(ValueError, match="DFATrainer needs `model`"):
        DFATrainer(model=None, args=training_args(tmp_path), model_init=lambda: tiny_model())


def test_saved_checkpoint_has_dfa_config(tmp_path):
    trainer = DFATrainer(
        model=copy.deepcopy(tiny_model()),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=TokenBlocks(),
        dfa_config=DFAConfig(feedback="uniform"),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert DFAConfig.from_pretrained(str(tmp_path / "final")).feedback == "uniform"
    assert os.path.isfile(tmp_path / "final" / "model.safetensors")
