"""A small training loop shared by the demo, the CLI and the benchmarks (or use the HF Trainer: hf_trainer.py).

Under torch.distributed (`accelerate launch`) every rank runs the same loop over the same batches and takes its
share of each batch's examples: a step then equals one process's step on the whole batch (tests/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence

import torch
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from ..tuner import distributed
from ..tuner.fused import FusedStep
from ..tuner.guard import CollaborativeGuard
from ..tuner.losses import LossFn, batch_size, summed_example_loss


def _bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ValueError("optimizers 'adamw8bit' and 'paged_adamw8bit' need bitsandbytes: pip install "
                         "'peft-cpl[bnb]', or use --optimizer adamw") from error
    return bnb


def _adamw_8bit(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with 8-bit moments: 2 bytes of optimizer state per trained value instead of 8."""
    return _bitsandbytes().optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def _paged_adamw_8bit(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The same, with its state in CUDA unified memory that pages out under pressure (plain on CPU)."""
    return _bitsandbytes().optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "adamw8bit": _adamw_8bit,
    "paged_adamw8bit": _paged_adamw_8bit,
}


def make_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    *,
    fused: bool = False,
    guard: CollaborativeGuard | None = None,
) -> torch.optim.Optimizer:
    """The optimizer `name` over the trainable parameters; `fused=True` steps each tensor inside backward
    (tuner/fused.py: no gradient buffers), with the `guard` reverting per tensor."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}")
    params = [param for param in model.parameters() if param.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (was the CPL support selected?)")
    if fused:
        return FusedStep(params, OPTIMIZERS[name], guard=guard, lr=lr, weight_decay=weight_decay)
    if guard is not None:
        raise ValueError("make_optimizer(guard=...) is for fused=True; otherwise pass the guard to train()")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


def train(
    model: nn.Module,
    batches: Sequence[dict],
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    guard: CollaborativeGuard | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    on_epoch_end: Callable[[int], None] | None = None,
    on_step_end: Callable[[int], None] | None = None,
    progress: bool = True,
) -> list[float]:
    """Train for `epochs` over `batches` (reshuffled each epoch with `seed`); returns the mean loss of each epoch.

    The loss of a batch is the mean over its examples of each example's loss, as in selection. `on_step_end(step)`
    (steps counted from 1 over all epochs) and `on_epoch_end(epoch)` are called with the model in eval mode, so that
    they can measure it mid-training. Under torch.distributed the model is wrapped in DDP for the steps (the fused
    step averages each gradient itself).
    """
    if isinstance(optimizer, FusedStep):
        if guard is not optimizer.guard:
            raise ValueError("a fused optimizer reverts inside backward: build it with the same guard, "
                             "make_optimizer(..., fused=True, guard=guard)")
        attached = contextlib.nullcontext()
    else:
        attached = guard.attach(optimizer) if guard is not None else contextlib.nullcontext()
    device = next(model.parameters()).device
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1 and isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("train() wraps the model in DDP itself under torch.distributed (and the fused step reduces "
                         "its gradients without DDP): pass the unwrapped model")
    forward = model
    if world > 1 and not isinstance(optimizer, FusedStep):
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    progress = progress and rank == 0
    order = list(range(len(batches)))
    history = []
    step = 0
    with attached:
        for epoch in range(epochs):
            model.train()
            if guard is not None:
                guard.on_epoch_start()
            random.Random(seed + epoch).shuffle(order)
            total = 0.0
            for index in tqdm(order, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False):
                optimizer.zero_grad(set_to_none=True)
                count = batch_size(batches[index])
                part, weight = _rank_part(batches[index], rank, world)
                loss, _ = summed_example_loss(forward, send_to_device(part, device), loss_fn)
                (loss * (weight * world / count)).backward()  # averaged over ranks: the whole batch's mean loss
                optimizer.step()
                total += loss.item() * weight / count
                step += 1
                if on_step_end is not None:
                    model.eval()
                    on_step_end(step)
                    model.train()
            history.append(_summed_over_ranks(total) / max(len(order), 1))
            model.eval()
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    return history


def _rank_part(batch: dict, rank: int, world: int) -> tuple[dict, float]:
    """This rank's share of a batch's examples, in order, with weight 1. A rank left without examples gets the
    first one with weight 0: every rank must run the forward and backward that DDP's reduction waits for."""
    if world == 1:
        return batch, 1.0
    count = batch_size(batch)
    chosen = torch.tensor_split(torch.arange(count), world)[rank]
    weight = 1.0
    if not chosen.numel():
        chosen, weight = torch.arange(1), 0.0
    part = {key: value[chosen] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == count
            else value for key, value in batch.items()}
    return part, weight


def _summed_over_ranks(value: float) -> float:
    if distributed.world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    distributed.sum_over_ranks_([total])
    return float(total)
