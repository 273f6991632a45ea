"""What tests/test_distributed.py runs on two processes, in one launch (start-up is the cost):

    accelerate launch --multi_gpu --num_processes 2 tests/launched_checks.py FOLDER

Each rank writes FOLDER/rank{R}.pt: the support and sign(g_M) of selection, the values after DDP, fused and FSDP2
steps with the guard, FSDP2's layout, outputs, gradients and values; then runs the CLI's select and train (as
`peft-cpl` would under accelerate launch) into FOLDER/cli; then the bad-input cases, which break the process group
(a timed-out gloo group cannot be used again), so they come last.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from distributed_cases import (
    WORLD,
    batches,
    cli_commands,
    fresh,
    guarded_sgd,
    new_model,
    plain_sgd,
    random_values,
    selected,
    shard,
    signs,
    step_batch,
    values,
)
from peft import get_peft_model

from peft_cpl import CollaborativeGuard, CPLConfig, cpl_layers, select_collaborative
from peft_cpl.toolkit.cli import main as cli
from peft_cpl.toolkit.tiny import tiny_llama
from peft_cpl.tuner.adapters import export_support
from peft_cpl.tuner.distributed import RanksDisagree

TIMEOUT = datetime.timedelta(seconds=60)  # a collective that waits longer fails the test instead of hanging it
SHORT_TIMEOUT = datetime.timedelta(seconds=2)  # for the bad-input cases, which wait for it


def fsdp_scenario(exported, rank: int, folder: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    model = fresh(exported)
    random_values(model)
    shard(model)
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    delta = cpl_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"].cpl_values["default"]
    out = {"layout": {
        "base sharded and frozen": isinstance(base, DTensor) and not base.requires_grad
        and base.to_local().shape[0] == base.shape[0] // WORLD,
        "values sharded": isinstance(delta, DTensor) and delta.dim() == 1 and delta.to_local().numel() < delta.numel(),
    }}
    out["local value bytes"] = sum(layer.cpl_values["default"].to_local().nbytes
                                   for layer in cpl_layers(model).values())
    output = model(**step_batch(0, rank))
    output.loss.backward()
    out["logits"] = output.logits.detach()
    out["grads"] = {name: layer.cpl_values["default"].grad.full_tensor() for name, layer in cpl_layers(model).items()}
    for param in model.parameters():
        param.grad = None
    plain_sgd(model, rank)
    out["values"] = values(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(folder / "fsdp-adapter", state_dict=state)
    dist.barrier()
    return out


def bad_input_scenario(rank: int) -> dict[str, str]:
    errors = {}
    config = CPLConfig(target_modules=["q_proj"], support="random", density=0.2, seed=rank)  # another adapter each
    try:
        CollaborativeGuard(get_peft_model(tiny_llama(seed=0), config), mastered=batches(1, rank))
    except RanksDisagree as error:
        errors["different adapters"] = str(error)
    model = new_model()
    if rank == 1:
        model.peft_config["default"].density = 0.3
    try:
        select_collaborative(model, batches(1, rank), batches(2, rank), progress=False)
    except RanksDisagree as error:
        errors["different configs"] = str(error)
    if rank == 0:  # rank 1 does not select: rank 0 must fail within the timeout, not wait for ever
        try:
            select_collaborative(new_model(), batches(1, rank), batches(2, rank), progress=False)
        except RanksDisagree as error:
            errors["only some ranks"] = str(error)
    else:
        time.sleep(SHORT_TIMEOUT.total_seconds() + 1)  # busy elsewhere (not gone, which gloo would report at once)
    return errors


def main(folder: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=TIMEOUT)  # from the launcher's environment
    rank = dist.get_rank()
    result = {}
    model = selected(rank)
    exported = export_support(model)
    result["supports"] = {name: support.indices for name, support in exported.supports.items()}
    result["selection signs"] = exported.mastered_signs

    ddp_model = fresh(exported)
    guard = guarded_sgd(ddp_model, torch.nn.parallel.DistributedDataParallel(ddp_model), rank)
    result["ddp"] = {"values": values(ddp_model), "signs": signs(ddp_model), "reverted": guard.reverted}
    fused_model = fresh(exported)
    guarded_sgd(fused_model, fused_model, rank, fused=True)
    result["fused"] = {"values": values(fused_model), "signs": signs(fused_model)}
    result["fsdp"] = fsdp_scenario(exported, rank, folder)
    guarded = fresh(exported)
    shard(guarded)
    guard = guarded_sgd(guarded, guarded, rank)
    result["fsdp guarded"] = {"values": values(guarded), "signs": signs(guarded), "reverted": guard.reverted}

    result["cli"] = [cli(command) for command in cli_commands(folder / "cli", "-2")]

    dist.group.WORLD.set_timeout(SHORT_TIMEOUT)
    result["errors"] = bad_input_scenario(rank)
    torch.save(result, folder / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
