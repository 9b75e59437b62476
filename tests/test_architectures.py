"""DFA on a tiny random model of every architecture in `MODEL_BLOCKS`, against gradients computed by hand."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, TrainingArguments

from hf_dfa import MODEL_BLOCKS, DFAConfig, DFATrainer, UnsupportedModelError, attach_feedback
from hf_dfa.data import load_tokenizer
from hf_dfa.feedback import hidden_states_of

VOCAB = 96
SEQ = 10
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

# config fields shared by the decoders that follow the Llama layout
LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    attention_dropout=0.0,
    tie_word_embeddings=False,
    **TOKENS,
)
GPT2_LIKE = dict(
    vocab_size=VOCAB,
    n_positions=64,
    n_embd=32,
    n_layer=2,
    n_head=4,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    tie_word_embeddings=False,
    **TOKENS,
)

# `config.model_type` -> (config class in `transformers`, its fields for a 2-block model with no dropout)
TINY_CONFIGS = {
    "gpt2": ("GPT2Config", GPT2_LIKE),
    "gptj": ("GPTJConfig", dict(GPT2_LIKE, rotary_dim=4)),
    "codegen": ("CodeGenConfig", dict(GPT2_LIKE, n_ctx=64, rotary_dim=4)),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(GPT2_LIKE, multi_query=True)),
    "gpt_neo": (
        "GPTNeoConfig",
        dict(
            vocab_size=VOCAB,
            max_position_embeddings=64,
            hidden_size=32,
            num_layers=2,
            attention_types=[[["global", "local"], 1]],
            num_heads=4,
            window_size=4,
            resid_dropout=0.0,
            embed_dropout=0.0,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **TOKENS,
        ),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **TOKENS,
        ),
    ),
    "opt": (
        "OPTConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **TOKENS,
        ),
    ),
    "bloom": (
        "BloomConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            n_layer=2,
            n_head=4,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **TOKENS,
        ),
    ),
    "falcon": (
        "FalconConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **TOKENS,
        ),
    ),
    "mpt": (
        "MptConfig",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            n_heads=4,
            n_layers=2,
            expansion_ratio=2,
            max_seq_len=64,
            resid_pdrop=0.0,
            emb_pdrop=0.0,
            tie_word_embeddings=False,
            **TOKENS,
        ),
    ),
    "llama": ("LlamaConfig", LLAMA_LIKE),
    "mistral": ("MistralConfig", LLAMA_LIKE),
    "mixtral": ("MixtralConfig", dict(LLAMA_LIKE, num_local_experts=2, num_experts_per_tok=1)),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", dict(LLAMA_LIKE, head_dim=8)),
    "gemma": ("GemmaConfig", dict(LLAMA_LIKE, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)),
    "gemma3_text": ("Gemma3TextConfig", dict(LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)),
    "phi": ("PhiConfig", dict(LLAMA_LIKE, resid_pdrop=0.0, embd_pdrop=0.0)),
    "phi3": ("Phi3Config", dict(LLAMA_LIKE, resid_pdrop=0.0, embd_pdrop=0.0)),
    "starcoder2": ("Starcoder2Config", dict(LLAMA_LIKE, residual_dropout=0.0, embedding_dropout=0.0)),
    "stablelm": ("StableLmConfig", dict(LLAMA_LIKE, hidden_dropout=0.0)),
    "olmo": ("OlmoConfig", LLAMA_LIKE),
    "olmo2": ("Olmo2Config", LLAMA_LIKE),
    "granite": ("GraniteConfig", LLAMA_LIKE),
    "cohere": ("CohereConfig", LLAMA_LIKE),
    "smollm3": ("SmolLM3Config", LLAMA_LIKE),
}
ARCHITECTURES = sorted(MODEL_BLOCKS)


def tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    class_name, fields = TINY_CONFIGS[model_type]
    config = getattr(transformers, class_name)(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert model.config.model_type == model_type
    return model.eval()


def batch(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # token 0 is the pad token, which some models leave out of the attention
    return torch.randint(3, VOCAB, (2, SEQ), generator=generator)


def named_grads(model: nn.Module) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def hand_computed_dfa_grads(model: nn.Module, ids: torch.Tensor, matrices: torch.Tensor, above=None) -> dict:
    """Return the DFA gradients of `model`, which has no hooks, with block i's output receiving `e @ matrices[i]`.

    Block i's parameters act on the loss only through block i's output, so `grad(out_i, params_i, B_i e)` is the
    local backward of block i whatever sits below it. The parameters below the first block (embeddings) learn
    through the first block's local backward, and those above the last block (`above`, by default the final norm
    and the head) by backpropagation. The model must have untied embeddings, so that no parameter is both below and
    above the blocks.
    """
    blocks_path, norm_path = MODEL_BLOCKS[model.config.model_type]
    blocks = model.get_submodule(blocks_path)
    if above is None:
        above = [model.get_submodule(norm_path), model.get_output_embeddings()]
    top = [param for module in above for param in module.parameters()]

    outputs = []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(hidden_states_of(out))) for block in blocks]
    loss = model(ids, labels=ids).loss
    for hook in hooks:
        hook.remove()
    assert len(outputs) == len(blocks)
    (error,) = torch.autograd.grad(loss, outputs[-1], retain_graph=True)

    by_param = {}
    for param, grad in zip(top, torch.autograd.grad(loss, top, retain_graph=True)):
        by_param[param] = grad
    for i, (block, out) in enumerate(zip(blocks, outputs)):
        params = list(block.parameters())
        feedback = (error @ matrices[i]).to(out.dtype)
        for param, grad in zip(params, torch.autograd.grad(out, params, feedback, retain_graph=True)):
            by_param[param] = grad

    below = [p for p in model.parameters() if p not in by_param]
    feedback = (error @ matrices[0]).to(outputs[0].dtype)
    grads = torch.autograd.grad(outputs[0], below, feedback, retain_graph=True, allow_unused=True)
    for param, grad in zip(below, grads):
        if grad is not None:
            by_param[param] = grad

    return {name: by_param[p] for name, p in model.named_parameters() if p in by_param}


def assert_grads_match(actual: dict, expected: dict, rtol=1e-5, atol=1e-6):
    assert set(actual) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_every_table_entry_has_tiny_config():
    assert set(MODEL_BLOCKS) <= set(TINY_CONFIGS)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_dfa_grads_equal_hand_computed(model_type):
    model, ids = tiny_model(model_type), batch()
    reference = copy.deepcopy(model)  # before attaching: a deep copy would carry the hooks along
    handle = attach_feedback(model, DFAConfig(rule="dfa", per_block_feedback=True, feedback_seed=5))
    assert handle.n_blocks == 2
    model(ids, labels=ids).loss.backward()

    expected = hand_computed_dfa_grads(reference, ids, handle.matrices)
    assert_grads_match(named_grads(model), expected)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_dfa_grads_exact_with_gradient_checkpointing(model_type):
    model, ids = tiny_model(model_type), batch()
    model.train()
    reference = copy.deepcopy(model)
    handle = attach_feedback(model, DFAConfig(rule="dfa", per_block_feedback=True, feedback_seed=5))
    model.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in handle.blocks)
    model(ids, labels=ids, use_cache=False).loss.backward()

    expected = hand_computed_dfa_grads(reference, ids, handle.matrices)
    assert_grads_match(named_grads(model), expected)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_bp_rule_matches_plain_training(model_type):
    plain, ids = tiny_model(model_type), batch()
    model = copy.deepcopy(plain)
    handle = attach_feedback(model, DFAConfig(rule="bp"))
    assert handle.hooks == []

    for net in (plain, model):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            net(ids, labels=ids).loss.backward()
            optimizer.step()
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_dfa_steps_change_parameters(model_type):
    model, ids = tiny_model(model_type), batch()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    attach_feedback(model, DFAConfig(rule="dfa"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert all(torch.isfinite(torch.tensor(losses)))
    for name, param in model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"


def test_unknown_model_type_names_option():
    config = transformers.LlamaConfig(**LLAMA_LIKE)
    model = AutoModelForCausalLM.from_config(config)
    model.config.model_type = "my_decoder"
    with pytest.raises(UnsupportedModelError, match=r"model type 'my_decoder'.*DFAConfig\(blocks=.*--blocks"):
        attach_feedback(model, DFAConfig(rule="dfa"))
    # the user's paths make the same model work
    handle = attach_feedback(model, DFAConfig(rule="dfa", blocks="model.layers", final_norm="model.norm"))
    assert handle.n_blocks == 2


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "falcon"])
def test_dfa_grads_exact_with_reentrant_checkpointing(model_type):
    model, ids = tiny_model(model_type), batch()
    model.train()
    reference = copy.deepcopy(model)
    handle = attach_feedback(model, DFAConfig(rule="dfa", per_block_feedback=True))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model(ids, labels=ids, use_cache=False).loss.backward()

    expected = hand_computed_dfa_grads(reference, ids, handle.matrices)
    assert_grads_match(named_grads(model), expected)


def test_dfa_grads_exact_with_hidden_states_keyword():
    def to_keyword(module, args, kwargs):
        return (), {"hidden_states": args[0], **kwargs}

    model, ids = tiny_model("llama"), batch()
    for block in model.model.layers:
        block.register_forward_pre_hook(to_keyword, with_kwargs=True)
    reference = copy.deepcopy(model)
    handle = attach_feedback(model, DFAConfig(rule="dfa", per_block_feedback=True))
    seen = []
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    model(ids, labels=ids).loss.backward()

    assert seen[1][0] == ()
    assert not seen[1][1]["hidden_states"].requires_grad
    expected = hand_computed_dfa_grads(reference, ids, handle.matrices)
    assert_grads_match(named_grads(model), expected)


def test_opt_350m_layout_grads_exact():
    # the layout of facebook/opt-350m: no final norm, embeddings narrower than the blocks
    _, fields = TINY_CONFIGS["opt"]
    config = transformers.OPTConfig(**dict(fields, do_layer_norm_before=False, word_embed_proj_dim=16))
    torch.manual_seed(0)
    model, ids = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval(), batch()
    reference = copy.deepcopy(model)
    handle = attach_feedback(model, DFAConfig(rule="dfa", per_block_feedback=True))
    assert handle.final_norm is None
    model(ids, labels=ids).loss.backward()

    above = [reference.model.decoder.project_out, reference.lm_head]
    expected = hand_computed_dfa_grads(reference, ids, handle.matrices, above=above)
    assert_grads_match(named_grads(model), expected)


def test_layerdrop_rejected_at_attach():
    _, fields = TINY_CONFIGS["opt"]
    model = AutoModelForCausalLM.from_config(transformers.OPTConfig(**dict(fields, layerdrop=0.1)))
    with pytest.raises(UnsupportedModelError, match=r"layerdrop=0.1 skips blocks.*`layerdrop=0.0`"):
        attach_feedback(model, DFAConfig(rule="dfa"))


def test_checkpointing_of_whole_call_rejected(monkeypatch):
    class CallCheckpointingLayer(nn.Module):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr("hf_dfa.feedback.GradientCheckpointingLayer", CallCheckpointingLayer)
    model = tiny_model("llama")
    model.activation_checkpointing_enable()
    with pytest.raises(UnsupportedModelError, match="checkpoints the whole call of each block"):
        attach_feedback(model, DFAConfig(rule="dfa"))

    # enabled after attaching, it is caught by the first training forward pass
    model = tiny_model("llama").train()
    attach_feedback(model, DFAConfig(rule="dfa"))
    model.activation_checkpointing_enable()
    with pytest.raises(UnsupportedModelError, match="Turn gradient checkpointing off or upgrade transformers"):
        model(batch(), labels=batch())


def test_trainer_gradient_checkpointing_same_steps(tmp_path):
    ids = torch.randint(3, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(2))
    data = [{"input_ids": row, "labels": row} for row in ids]
    models = {}
    for checkpointing in (False, True):
        args = TrainingArguments(
            output_dir=str(tmp_path / str(checkpointing)),
            per_device_train_batch_size=4,
            max_steps=2,
            optim="sgd",
            learning_rate=0.5,
            activation_checkpointing=checkpointing,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = DFATrainer(model=tiny_model("llama"), args=args, train_dataset=data, dfa_config=DFAConfig())
        trainer.train()
        assert trainer.model.model.layers[1].gradient_checkpointing is checkpointing
        models[checkpointing] = trainer.model

    for (name, p), q in zip(models[False].named_parameters(), models[True].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


# ---- recipes/train.py on a saved model ----

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "train.py"
CORPUS_SENTENCES = [
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place beneath.",
    "In the beginning God created the heaven and the earth, and the earth was without form.",
    "All the world's a stage, and all the men and women merely players.",
]


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """Return a folder with a tiny random Llama and its byte-level BPE tokenizer, and a small text corpus."""
    folder = tmp_path_factory.mktemp("recipe")
    corpus = folder / "corpus.txt"
    corpus.write_text(" ".join(CORPUS_SENTENCES[i % 3] for i in range(150)))
    tokenizer = load_tokenizer("bpe:300", train_texts=[corpus.read_text()], cache_dir=str(folder / "cache"))

    config = transformers.LlamaConfig(
        **dict(LLAMA_LIKE, vocab_size=len(tokenizer), max_position_embeddings=32, pad_token_id=None),
    )
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    model_dir = folder / "tiny-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DFA_CACHE=str(folder / "cache"))
    return SimpleNamespace(model_dir=model_dir, corpus=corpus, env=env)


def run_recipe(saved, output_dir, *extra):
    command = [
        sys.executable,
        str(RECIPE),
        "--model_name_or_path",
        str(saved.model_dir),
        "--dataset",
        str(saved.corpus),
    ]
    command += ["--max_steps", "3", "--seq_len", "16", "--per_device_train_batch_size", "2", "--max_eval_blocks", "4"]
    command += ["--disable_tqdm", "true", "--output_dir", str(output_dir), *extra]
    return subprocess.run(command, env=saved.env, capture_output=True, text=True, timeout=600)


def relative_distance(model, reference) -> float:
    """Return the largest `||a - b|| / ||b||` over the weight matrices of two models of one architecture."""
    distances = [
        ((a - b).norm() / b.norm()).item()
        for a, b in zip(model.parameters(), reference.parameters())
        if a.dim() >= 2 and a.shape == b.shape
    ]
    return max(distances)


def test_recipe_trains_saved_llama(saved_llama, tmp_path):
    result = run_recipe(saved_llama, tmp_path / "out", "--tokenizer", str(saved_llama.model_dir), "--rule", "dfa")
    assert result.returncode == 0, result.stderr[-3000:]

    record = json.loads((tmp_path / "out" / "run.json").read_text())
    saved = AutoModelForCausalLM.from_pretrained(saved_llama.model_dir)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert record["status"] == "completed"
    assert record["size"] == "tiny-llama"
    assert record["n_params_non_embedding"] == sum(p.numel() for p in saved.model.layers.parameters() if p.dim() >= 2)
    assert record["n_layer"] == 2
    assert record["from_scratch"] is False
    assert record["base_model"] == str(saved_llama.model_dir)
    assert type(trained).__name__ == "LlamaForCausalLM"
    # three small steps from the loaded weights; a fresh initialisation would be about sqrt(2) away
    assert 0 < relative_distance(trained, saved) < 0.5
    assert "starting from the weights of" in (tmp_path / "out" / "README.md").read_text()


def test_recipe_builds_model_from_scratch(saved_llama, tmp_path):
    result = run_recipe(saved_llama, tmp_path / "out", "--from_scratch", "--tokenizer", "bpe:260", "--rule", "bp")
    assert result.returncode == 0, result.stderr[-3000:]

    record = json.loads((tmp_path / "out" / "run.json").read_text())
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert record["from_scratch"] is True
    assert record["base_model"] is None
    assert trained.config.model_type == "llama"
    assert trained.config.vocab_size == 260
    assert trained.config.num_hidden_layers == 2


def test_recipe_rejects_seq_len_over_positions(saved_llama, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    argv = ["--model_name_or_path", str(saved_llama.model_dir), "--seq_len", "64", "--output_dir", str(tmp_path)]
    assert recipe.main(argv) == 1
    assert "`--seq_len 64` exceeds the model's 32 positions; pass --seq_len 32 or less." in capsys.readouterr().err
