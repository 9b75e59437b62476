"""The FLOPs that DFATrainer reports per step against `torch.utils.flop_counter.FlopCounterMode` on a real step."""

import functools
import tempfile

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2LMHeadModel, TrainingArguments

from hf_dfa import DFAConfig, DFATrainer
from hf_dfa.grid import get_size

VOCAB = 64
BATCH = 2

RULES = {
    "bp": DFAConfig(rule="bp"),
    "dfa_shared": DFAConfig(rule="dfa"),
    "dfa_per_block": DFAConfig(rule="dfa", per_block_feedback=True),
    "dfa_identity": DFAConfig(rule="dfa", feedback="identity"),
    "dfa_logits": DFAConfig(rule="dfa", error_source="logits"),
    "dfa_logits_per_block": DFAConfig(rule="dfa", error_source="logits", per_block_feedback=True),
    "dfa_true_last": DFAConfig(rule="dfa", per_block_feedback=True, last_block_true_error=True),
    "shallow": DFAConfig(rule="shallow"),
}


class RandomBlocks(torch.utils.data.Dataset):
    def __init__(self, seq_len, n=BATCH):
        self.ids = torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@functools.cache
def counted_step(size, seq_len, rule):
    """Run one optimiser step of DFATrainer under FlopCounterMode.

    Returns the counted FLOPs by operator, the FLOPs the trainer reported and its `FlopCounts`. Cached, so that
    the tests below share the steps they both need.
    """
    torch.manual_seed(0)
    # The grid's default attention dropout (0.1) makes CPU training take the math path of SDPA, whose batched
    # products FlopCounterMode counts. It would not count the CPU flash kernel at all.
    model = GPT2LMHeadModel(get_size(size).gpt2_config(vocab_size=VOCAB, n_positions=seq_len))
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=BATCH,
            max_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = DFATrainer(model=model, args=args, train_dataset=RandomBlocks(seq_len), dfa_config=RULES[rule])
        counter = FlopCounterMode(display=False)
        with counter:
            trainer.train()
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    return by_op, trainer.state.total_flos, trainer.flop_counts


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("seq_len", [32, 128])
@pytest.mark.parametrize("size", ["0.4M", "3.1M"])
def test_reported_flops_match_counter(size, seq_len, rule):
    by_op, reported, _ = counted_step(size, seq_len, rule)
    counted = sum(by_op.values())

    assert by_op.get("aten.bmm", 0) > 0, f"attention products were not counted: {by_op}"
    assert reported == pytest.approx(counted, rel=0.02), by_op


@pytest.mark.parametrize("rule", [name for name in RULES if name.startswith("dfa")])
def test_dfa_extra_flops_are_feedback(rule):
    """DFA runs every product of BP plus the feedback products, exactly."""
    size, seq_len = "3.1M", 32
    bp_by_op, _, flop_counts = counted_step(size, seq_len, "bp")
    dfa_by_op, _, _ = counted_step(size, seq_len, rule)

    extra = sum(dfa_by_op.values()) - sum(bp_by_op.values())
    assert extra == BATCH * seq_len * flop_counts.feedback_per_token(RULES[rule])
