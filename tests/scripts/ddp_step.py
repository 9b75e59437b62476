"""Train a tiny Llama for a few SGD steps in each process of a launch and save the final parameters.

    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml tests/scripts/ddp_step.py --output params.pt

Each of the N processes takes 1/N of every batch. `loop` runs a plain PyTorch loop with `accelerate.Accelerator`
(DDP), `fsdp2` the same loop on a model sharded by `fully_shard`, and `trainer` runs `DFATrainer`.
`tests/test_distributed.py` compares the parameters with one process on whole batches.
"""

import argparse

import torch
import transformers
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, TrainingArguments

from hf_dfa import DFAConfig, DFATrainer, attach_feedback

VOCAB = 96
SEQ = 10
BATCH = 8
STEPS = 2
LEARNING_RATE = 0.5


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def token_batches() -> torch.Tensor:
    """Return `STEPS` batches of `BATCH` random sequences, `(STEPS, BATCH, SEQ)`."""
    generator = torch.Generator().manual_seed(2)
    return torch.randint(3, VOCAB, (STEPS, BATCH, SEQ), generator=generator)


def train_loop(rule: str, accelerator: Accelerator = None) -> dict:
    """Train with SGD on this process's share of every batch; return the final parameters on the CPU.

    Args:
        rule (`str`): `bp`, `dfa` or `shallow`.
        accelerator (`Accelerator`, *optional*): wraps the model for the launch; without it the loop runs on the
            whole batches in this process.
    """
    model = tiny_llama()
    attach_feedback(model, DFAConfig(rule=rule, per_block_feedback=True))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    rank, world_size = 0, 1
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
        rank, world_size = accelerator.process_index, accelerator.num_processes

    share = BATCH // world_size
    for batch in token_batches():
        ids = batch[rank * share : (rank + 1) * share]
        loss = model(ids, labels=ids).loss
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    return {name: param.detach().cpu().clone() for name, param in model.named_parameters()}


def train_fsdp2(rule: str, accelerator: Accelerator) -> dict:
    """Train like `train_loop` with every block and then the whole model sharded by FSDP2's `fully_shard`.

    The hooks are attached before sharding, the order in which `DFATrainer` and a sharding wrapper would apply them.
    """
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    attach_feedback(model, DFAConfig(rule=rule, per_block_feedback=True))
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    share = BATCH // accelerator.num_processes
    for batch in token_batches():
        ids = batch[accelerator.process_index * share : (accelerator.process_index + 1) * share]
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # every process takes part in gathering the shards
    return {name: param.full_tensor().detach().cpu().clone() for name, param in model.named_parameters()}


def train_with_trainer(rule: str, output_dir: str, world_size: int = 1) -> dict:
    """Train with `DFATrainer` and SGD, `BATCH // world_size` sequences per process; return the final parameters."""
    rows = token_batches().reshape(-1, SEQ)
    dataset = [{"input_ids": row, "labels": row} for row in rows]
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=BATCH // world_size,
        max_steps=STEPS,
        optim="sgd",
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = DFATrainer(model=tiny_llama(), args=args, train_dataset=dataset, dfa_config=DFAConfig(rule=rule))
    trainer.train()
    return {name: param.detach().cpu().clone() for name, param in trainer.model.named_parameters()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="File to write the final parameters to (torch.save).")
    parser.add_argument("--rules", nargs="+", default=["bp", "dfa"], help="Training rules to run. Default: bp dfa.")
    parser.add_argument(
        "--modes", nargs="+", default=["loop", "trainer"], choices=["loop", "trainer", "fsdp2"], help="What to run."
    )
    parser.add_argument("--trainer_output_dir", default="ddp_trainer", help="`output_dir` of the `trainer` mode.")
    options = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    results = {}
    for rule in options.rules:
        if "loop" in options.modes:
            results[f"loop/{rule}"] = train_loop(rule, accelerator)
        if "fsdp2" in options.modes:
            results[f"fsdp2/{rule}"] = train_fsdp2(rule, accelerator)
        if "trainer" in options.modes:
            output_dir = f"{options.trainer_output_dir}/{rule}"
            results[f"trainer/{rule}"] = train_with_trainer(rule, output_dir, accelerator.num_processes)
    results["num_processes"] = accelerator.num_processes
    if accelerator.is_main_process:
        torch.save(results, options.output)
    accelerator.wait_for_everyone()
    # a gloo process group left to the interpreter's shutdown sometimes aborted a rank after its work was done
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
