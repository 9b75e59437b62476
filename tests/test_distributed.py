"""DFA across processes (DDP, FSDP2) and precisions (bf16, fp16 loss scaling), and the launch configurations."""

import copy
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from transformers import TrainingArguments

from hf_dfa import DFAConfig, DFATrainer, attach_feedback
from hf_dfa.trainer import UnsupportedParallelismError, check_parallelism

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ddp_step.py"
ACCELERATE_CONFIGS = ROOT / "recipes" / "accelerate"

spec = importlib.util.spec_from_file_location("ddp_step", SCRIPT)
ddp_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ddp_step)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """Run `ddp_step.py` in two CPU processes over gloo, launched with the shipped `cpu_2proc.yaml`."""
    folder = tmp_path_factory.mktemp("ddp")
    output = folder / "params.pt"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(ACCELERATE_CONFIGS / "cpu_2proc.yaml"), "--main_process_port", str(free_port()), str(SCRIPT)]
    command += ["--output", str(output), "--trainer_output_dir", str(folder / "trainer")]
    command += ["--rules", "bp", "dfa", "--modes", "loop", "fsdp2", "trainer"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output)


def assert_params_match(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_launch_starts_two_processes(two_process_results):
    assert two_process_results["num_processes"] == 2


@pytest.mark.parametrize("mode", ["loop", "fsdp2"])
@pytest.mark.parametrize("rule", ["bp", "dfa"])
def test_two_processes_equal_one(two_process_results, mode, rule):
    # FSDP2 with half batches must give what one unsharded process gives on whole batches
    expected = ddp_step.train_loop(rule)
    initial = dict(ddp_step.tiny_llama().named_parameters())
    for name, value in expected.items():
        assert not torch.equal(value, initial[name]), f"{name} did not change, so the comparison is not sharp"
    assert_params_match(two_process_results[f"{mode}/{rule}"], expected)


@pytest.mark.parametrize("rule", ["bp", "dfa"])
def test_two_process_trainer_equals_one(two_process_results, tmp_path, rule):
    expected = ddp_step.train_with_trainer(rule, str(tmp_path))
    assert_params_match(two_process_results[f"trainer/{rule}"], expected)


def test_dfa_and_bp_runs_differ(two_process_results):
    differs = [
        not torch.equal(two_process_results["loop/dfa"][name], value)
        for name, value in two_process_results["loop/bp"].items()
    ]
    assert any(differs)


# ---- precisions ----


def tiny_llama_pair():
    """Return two identical tiny Llamas without hooks and a batch of token ids."""
    model = ddp_step.tiny_llama().train()
    ids = ddp_step.token_batches()[0]
    return model, copy.deepcopy(model), ids


def relative_errors(model, reference) -> dict:
    errors = {}
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        difference = param.grad.float() - expected.grad.float()
        errors[name] = (difference.norm() / expected.grad.float().norm()).item()
    return errors


@pytest.mark.parametrize("precision", ["autocast", "weights"])
def test_bf16_dfa_grads_close_to_fp32(precision):
    model, reference, ids = tiny_llama_pair()
    config = DFAConfig(rule="dfa", per_block_feedback=True)
    attach_feedback(reference, config)
    reference(ids, labels=ids).loss.backward()

    if precision == "weights":
        model.to(torch.bfloat16)
    attach_feedback(model, config)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        loss = model(ids, labels=ids).loss
    loss.backward()

    for name, param in model.named_parameters():
        assert torch.isfinite(param.grad).all(), name
    # bf16 keeps 8 significant bits (relative step 2**-7 = 0.8%); the measured errors are about 1%
    errors = relative_errors(model, reference)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 0.05, f"{worst}: relative error {errors[worst]:.3f}"


def test_scaled_loss_scales_dfa_grads():
    model, reference, ids = tiny_llama_pair()
    attach_feedback(reference, DFAConfig(rule="dfa"))
    attach_feedback(model, DFAConfig(rule="dfa"))
    reference(ids, labels=ids).loss.backward()
    (model(ids, labels=ids).loss * 1024).backward()

    # B e is linear in e, and scaling by a power of two is exact in floating point
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(param.grad, expected.grad * 1024), name


def test_fp16_grad_scaler_unscales_dfa_grads():
    model, reference, ids = tiny_llama_pair()
    attach_feedback(reference, DFAConfig(rule="dfa"))
    attach_feedback(model, DFAConfig(rule="dfa"))
    reference(ids, labels=ids).loss.backward()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(ids, labels=ids).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)

    for name, param in model.named_parameters():
        assert torch.isfinite(param.grad).all(), name
    errors = relative_errors(model, reference)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 0.02, f"{worst}: relative error {errors[worst]:.4f}"


# ---- start-up checks and launch configurations ----


def test_trainer_rejects_fsdp_for_dfa(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, fsdp=True, report_to="none")
    model = ddp_step.tiny_llama()
    with pytest.raises(UnsupportedParallelismError, match=r"rule='dfa' under FSDP is not tested.*rule='bp'"):
        DFATrainer(model=model, args=args, dfa_config=DFAConfig(rule="dfa"))
    # nothing was attached to the model
    assert not any(block._forward_pre_hooks for block in model.model.layers)


@pytest.mark.parametrize("rule", ["dfa", "shallow"])
def test_launcher_deepspeed_rejected(monkeypatch, rule):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UnsupportedParallelismError, match=f"rule='{rule}' under DeepSpeed is not tested"):
        check_parallelism(None, rule)


def test_bp_allowed_under_fsdp_and_deepspeed(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    check_parallelism(None, "bp")


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "multi_node", "cpu_2proc"])
def test_accelerate_config_loads(name):
    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
    assert config.compute_environment.value == "LOCAL_MACHINE"
    expected_processes = {"single_gpu": 1, "multi_gpu": 8, "multi_node": 16, "cpu_2proc": 2}[name]
    assert config.num_processes == expected_processes
