"""The feedback rule against gradients computed by hand on a model without hooks."""

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from hf_dfa import DFAConfig, DFAConfigError, UnsupportedModelError, attach_feedback
from hf_dfa.feedback import make_feedback_matrices

VOCAB = 64


def tiny_gpt2(tied=False, n_layer=3, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tied,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    return GPT2LMHeadModel(config).eval()


def batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 12), generator=generator)


def grads_of(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def hand_computed_dfa_grads(model, ids, feedback_for_block, error_at="last_block"):
    """Backpropagate `feedback_for_block(i, e)` through block i alone, on `model`, which has no hooks.

    Block i's parameters only influence block i's output directly, so `grad(out_i, params_i, v)` is the local
    backward of block i whatever sits below it.
    """
    outputs = []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(out)) for block in model.transformer.h]
    logits_holder = []
    hooks.append(model.lm_head.register_forward_hook(lambda m, a, out: logits_holder.append(out)))
    loss = model(ids, labels=ids).loss
    for hook in hooks:
        hook.remove()

    source = outputs[-1] if error_at == "last_block" else logits_holder[0]
    (error,) = torch.autograd.grad(loss, source, retain_graph=True)
    expected = {}

    # the final norm and the head learn by true backpropagation
    top = list(model.transformer.ln_f.named_parameters()) + list(model.lm_head.named_parameters())
    top_grads = torch.autograd.grad(loss, [p for _, p in top], retain_graph=True)
    prefixes = ["transformer.ln_f." + n for n, _ in model.transformer.ln_f.named_parameters()]
    prefixes += ["lm_head." + n for n, _ in model.lm_head.named_parameters()]
    expected.update(dict(zip(prefixes, top_grads)))

    for i, (block, out) in enumerate(zip(model.transformer.h, outputs)):
        names = [f"transformer.h.{i}.{n}" for n, _ in block.named_parameters()]
        params = [p for _, p in block.named_parameters()]
        grads = torch.autograd.grad(out, params, feedback_for_block(i, error), retain_graph=True)
        expected.update(dict(zip(names, grads)))

    # the embeddings learn through the first block's local backward
    embeddings = [model.transformer.wte.weight, model.transformer.wpe.weight]
    grads = torch.autograd.grad(outputs[0], embeddings, feedback_for_block(0, error), retain_graph=True)
    for name, grad in zip(["transformer.wte.weight", "transformer.wpe.weight"], grads):
        expected[name] = expected.get(name, 0) + grad
    return expected


def assert_grads_match(actual, expected):
    assert set(actual) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("feedback", ["gaussian", "uniform"])
def test_dfa_block_grads_equal_hand_computed(feedback):
    model, ids = tiny_gpt2(), batch()
    reference = copy.deepcopy(model)
    config = DFAConfig(rule="dfa", feedback=feedback, feedback_seed=3)
    handle = attach_feedback(model, config)
    model(ids, labels=ids).loss.backward()
    matrix = handle.matrices[0]

    expected = hand_computed_dfa_grads(reference, ids, lambda i, e: e @ matrix)
    assert_grads_match(grads_of(model), expected)


def test_dfa_per_block_matrices_differ_and_match():
    model, ids = tiny_gpt2(), batch()
    reference = copy.deepcopy(model)
    handle = attach_feedback(model, DFAConfig(rule="dfa", per_block_feedback=True))
    model(ids, labels=ids).loss.backward()
    matrices = handle.matrices
    assert matrices.shape == (3, 32, 32)
    assert not torch.equal(matrices[0], matrices[1])

    expected = hand_computed_dfa_grads(reference, ids, lambda i, e: e @ matrices[i])
    assert_grads_match(grads_of(model), expected)


def test_dfa_identity_broadcasts_error():
    model, ids = tiny_gpt2(), batch()
    reference = copy.deepcopy(model)
    attach_feedback(model, DFAConfig(rule="dfa", feedback="identity", feedback_scale=0.5))
    model(ids, labels=ids).loss.backward()

    expected = hand_computed_dfa_grads(reference, ids, lambda i, e: 0.5 * e)
    assert_grads_match(grads_of(model), expected)


def test_dfa_last_block_true_error():
    model, ids = tiny_gpt2(), batch()
    reference = copy.deepcopy(model)
    handle = attach_feedback(model, DFAConfig(rule="dfa", last_block_true_error=True))
    model(ids, labels=ids).loss.backward()
    matrix = handle.matrices[0]

    expected = hand_computed_dfa_grads(reference, ids, lambda i, e: e if i == 2 else e @ matrix)
    assert_grads_match(grads_of(model), expected)


def test_dfa_error_at_logits():
    model, ids = tiny_gpt2(), batch()
    reference = copy.deepcopy(model)
    handle = attach_feedback(model, DFAConfig(rule="dfa", error_source="logits"))
    model(ids, labels=ids).loss.backward()
    matrix = handle.matrices[0]
    assert matrix.shape == (VOCAB, 32)

    expected = hand_computed_dfa_grads(reference, ids, lambda i, e: e @ matrix, error_at="logits")
    assert_grads_match(grads_of(model), expected)


def test_dfa_tied_embedding_sums_head_and_block0_grads():
    untied, ids = tiny_gpt2(tied=False), batch()
    tied = tiny_gpt2(tied=True)
    tied.load_state_dict(untied.state_dict(), strict=False)
    tied.lm_head.weight = tied.transformer.wte.weight
    tied.transformer.wte.weight.data.copy_(untied.transformer.wte.weight.data)
    untied.lm_head.weight.data.copy_(untied.transformer.wte.weight.data)

    for model in (tied, untied):
        attach_feedback(model, DFAConfig(rule="dfa"))
        model(ids, labels=ids).loss.backward()
    expected = untied.transformer.wte.weight.grad + untied.lm_head.weight.grad
    torch.testing.assert_close(tied.transformer.wte.weight.grad, expected)


def test_dfa_no_block_gets_grad_from_above():
    model, ids = tiny_gpt2(), batch()
    attach_feedback(model, DFAConfig(rule="dfa"))
    inputs = []
    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(args[0]), with_kwargs=True)
    model(ids, labels=ids).loss.backward()
    # hooks added after attach_feedback see the detached input of blocks 1 and 2
    assert inputs[0].requires_grad
    assert not inputs[1].requires_grad
    assert not inputs[2].requires_grad


def test_remove_restores_backprop():
    model, ids = tiny_gpt2(), batch()
    reference = copy.deepcopy(model)
    reference(ids, labels=ids).loss.backward()

    handle = attach_feedback(model, DFAConfig(rule="dfa"))
    handle.remove()
    model(ids, labels=ids).loss.backward()
    assert_grads_match(grads_of(model), grads_of(reference))


def test_bp_rule_attaches_nothing():
    model, ids = tiny_gpt2(), batch()
    reference = copy.deepcopy(model)
    handle = attach_feedback(model, DFAConfig(rule="bp"))
    assert handle.hooks == []
    model(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    assert_grads_match(grads_of(model), grads_of(reference))


def test_eval_forward_unchanged_by_dfa():
    model, ids = tiny_gpt2(), batch()
    with torch.no_grad():
        before = model(ids).logits
    attach_feedback(model, DFAConfig(rule="dfa"))
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    # training-mode forward gives the same values too: the feedback is an identity in the forward pass
    torch.testing.assert_close(model(ids).logits, before)


def test_shallow_trains_only_head_and_final_norm():
    model, ids = tiny_gpt2(tied=True), batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = attach_feedback(model, DFAConfig(rule="shallow"))
    assert handle.untied
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.config.tie_word_embeddings is False

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()

    after = dict(model.named_parameters())
    for name, value in before.items():
        if name.startswith(("transformer.h.", "transformer.wte", "transformer.wpe")):
            assert torch.equal(after[name], value), name
    # the untied head started as a copy of the tied matrix and moved away from it
    assert not torch.equal(after["lm_head.weight"], before["transformer.wte.weight"])
    assert not torch.equal(after["transformer.ln_f.weight"], before["transformer.ln_f.weight"])

    handle.remove()
    assert all(p.requires_grad for p in model.parameters())


def test_feedback_matrices_scale_and_seed():
    config = DFAConfig(feedback_seed=7, feedback_scale=2.0)
    first = make_feedback_matrices(config, n_blocks=4, d_error=256, d_model=256)
    again = make_feedback_matrices(config, n_blocks=4, d_error=256, d_model=256)
    other = make_feedback_matrices(DFAConfig(feedback_seed=8), n_blocks=4, d_error=256, d_model=256)
    assert first.shape == (1, 256, 256)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.var().item() == pytest.approx(4.0 / 256, rel=0.02)

    uniform = make_feedback_matrices(DFAConfig(feedback="uniform"), 1, 256, 256)
    assert uniform.var().item() == pytest.approx(1.0 / 256, rel=0.02)
    assert uniform.abs().max().item() <= (3.0 / 256) ** 0.5

    # B e keeps the norm of e in expectation
    error = torch.randn(1000, 256)
    ratio = ((error @ other[0]).norm() / error.norm()).item()
    assert ratio == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rule": "hebbian"}, "`rule` must be one of bp, dfa, shallow, got 'hebbian'"),
        ({"feedback": "sparse"}, "`feedback` must be one of gaussian, uniform, identity, got 'sparse'"),
        ({"error_source": "loss"}, "`error_source` must be one of last_block, logits, got 'loss'"),
        ({"feedback_scale": 0.0}, "`feedback_scale` must be positive, got 0.0"),
        ({"feedback": "identity", "error_source": "logits"}, "`feedback=identity` needs the error at the last block"),
        ({"last_block_true_error": True, "error_source": "logits"}, "`last_block_true_error` needs"),
        ({"alignment_every": -1}, "`alignment_every` must be 0"),
    ],
)
def test_config_rejects_invalid(kwargs, match):
    with pytest.raises(DFAConfigError, match=match):
        DFAConfig(**kwargs)


def test_config_round_trip(tmp_path):
    config = DFAConfig(rule="dfa", feedback="uniform", feedback_seed=5, per_block_feedback=True)
    config.save_pretrained(tmp_path)
    assert DFAConfig.from_pretrained(tmp_path) == config


def test_config_from_pretrained_missing_or_corrupt(tmp_path):
    with pytest.raises(DFAConfigError, match="No dfa_config.json in"):
        DFAConfig.from_pretrained(tmp_path)
    (tmp_path / "dfa_config.json").write_text("{not json")
    with pytest.raises(DFAConfigError, match="is not valid JSON"):
        DFAConfig.from_pretrained(tmp_path)
    (tmp_path / "dfa_config.json").write_text('{"rule": "dfa", "colour": "red"}')
    with pytest.raises(DFAConfigError, match=r"Unknown DFA settings \['colour'\]"):
        DFAConfig.from_pretrained(tmp_path)


def test_unknown_architecture_names_option():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "toy", "hidden_size": 4})()
            self.layers = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(UnsupportedModelError, match="model type 'toy'.*DFAConfig\\(blocks='model.layers'\\)"):
        attach_feedback(Toy(), DFAConfig(rule="dfa"))
    with pytest.raises(UnsupportedModelError, match="path 'decoder.blocks' does not exist in model type 'toy'"):
        attach_feedback(Toy(), DFAConfig(rule="dfa", blocks="decoder.blocks"))
