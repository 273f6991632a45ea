"""The problem that tests/test_distributed.py solves in one process and tests/launched_checks.py in two.

Each rank takes half of every global batch; one process takes all of it. Shared by both sides, so that they run the
same steps on the same data.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model

from peft_cpl import CollaborativeGuard, CPLConfig, cpl_layers, select_collaborative
from peft_cpl.toolkit.tiny import tiny_llama
from peft_cpl.tuner.adapters import restore_support
from peft_cpl.tuner.fused import FusedStep

WORLD, STEPS, LR = 2, 3, 0.5


def new_model():
    config = CPLConfig(target_modules=["q_proj", "v_proj", "down_proj"], density=0.2)
    return get_peft_model(tiny_llama(seed=0), config)


def examples(seed: int, count: int) -> torch.Tensor:
    return torch.randint(0, 1000, (count, 8), generator=torch.Generator().manual_seed(seed))


def batches(seed: int, rank: int | None) -> list[dict]:
    """Four global batches of two examples; rank r gets batches r, r + 2 (None: one process, all four)."""
    ids = examples(seed, 8).split(2)
    chosen = ids if rank is None else ids[rank::WORLD]
    return [{"input_ids": batch, "labels": batch} for batch in chosen]


def step_batch(step: int, rank: int | None) -> dict:
    """The global training batch of a step (four examples); rank r gets examples 2r, 2r + 1."""
    ids = examples(100 + step, 4)
    ids = ids if rank is None else ids[2 * rank: 2 * rank + 2]
    return {"input_ids": ids, "labels": ids}


def values(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in cpl_layers(model).items():
        tensor = layer.cpl_values["default"].detach()
        out[name] = (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).clone()
    return out


def signs(model) -> dict[str, torch.Tensor]:
    return {name: layer.cpl_mastered_sign["default"].clone() for name, layer in cpl_layers(model).items()}


def selected(rank: int | None):
    model = new_model()
    select_collaborative(model, batches(1, rank), batches(2, rank), progress=False)
    return model


def fresh(exported) -> torch.nn.Module:
    model = new_model()
    restore_support(model, exported)
    return model


def guarded_sgd(model, forward, rank: int | None, *, fused: bool = False) -> CollaborativeGuard:
    """STEPS guarded SGD steps, sign(g_M) refreshed after step 2 from each rank's mastered share."""
    guard = CollaborativeGuard(model, mastered=batches(1, rank), refresh=2)
    params = [p for p in model.parameters() if p.requires_grad]
    if fused:
        optimizer = FusedStep(params, torch.optim.SGD, guard=guard, lr=LR)
    else:
        optimizer = torch.optim.SGD(params, lr=LR)
        guard.attach(optimizer)
    for step in range(STEPS):
        optimizer.zero_grad()
        forward(**step_batch(step, rank)).loss.backward()
        optimizer.step()
    return guard


def plain_sgd(model, rank: int | None) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        optimizer.zero_grad()
        model(**step_batch(step, rank)).loss.backward()
        optimizer.step()


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def random_values(model) -> None:
    """Non-zero values, so that forward and backward go through the delta."""
    with torch.no_grad():
        for layer in cpl_layers(model).values():
            values_ = layer.cpl_values["default"]
            values_.copy_(torch.randn(values_.shape, generator=torch.Generator().manual_seed(values_.numel())) * 0.1)


def cli_commands(root: Path, suffix: str) -> list[list[str]]:
    """select, then train with the guard (fused, the default) and without the fused step."""
    model, items = str(root / "model"), root / "items"
    adapter = str(root / f"adapter{suffix}")
    train = ["train", "--model", model, "--adapter", adapter, "--injection", str(items / "injection.jsonl"),
             "--mastered", str(items / "mastered.jsonl"), "--guard", "--guard-refresh", "epoch", "--optimizer", "sgd",
             "--lr", "0.5", "--batch-size", "3", "--epochs", "2"]
    return [
        ["select", "--model", model, "--mastered", str(items / "mastered.jsonl"), "--injection",
         str(items / "injection.jsonl"), "--target-modules", "q_proj,v_proj,down_proj", "--density", "0.2",
         "--batch-size", "2", "--output", adapter],
        [*train, "--output", str(root / f"fused{suffix}")],
        [*train, "--no-fused", "--output", str(root / f"plain{suffix}")],
    ]
