"""Exact mean weight gradients of CPL-targeted layers, from hooks: grad_W = grad_out^T x.

The base weights never need `requires_grad` or `.grad`, so this works on frozen and on quantized (int8 / 4-bit)
bases alike; each layer accumulates one fp32 tensor of its weight's shape, optionally on the CPU. Under
torch.distributed the sums and the example count are summed over all ranks before dividing, so every rank gets the
same exact means, those of one process that saw every rank's batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from .distributed import count_over_ranks, sum_over_ranks_
from .functional import weight_grad_factors
from .layer import CPLLayer, Embedding
from .losses import LossFn, summed_example_loss


def mean_weight_gradients(
    model: nn.Module,
    layers: dict[str, CPLLayer],
    batches: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    accumulate_on: str | torch.device | None = None,
    description: str = "gradients",
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    """({layer name: mean gradient of the loss w.r.t. its base weight}, number of examples seen), over all ranks."""
    device = next(model.parameters()).device
    sums = {
        name: torch.zeros(layer.delta_shape, dtype=torch.float32, device=accumulate_on or layer._base_device())
        for name, layer in layers.items()
    }
    examples = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    with _gradient_mode(model), _capture(layers, sums):
        for batch in tqdm(batches, total=total, desc=description, disable=not progress, leave=False):
            loss, count = summed_example_loss(model, send_to_device(batch, device), loss_fn)
            loss.backward()
            examples += count
    if sums:
        sum_over_ranks_(sums.values())  # before any division or move, so every rank divides the same sums
        examples = count_over_ranks(examples, next(iter(sums.values())))
    if examples:
        for tensor in sums.values():
            tensor.div_(examples)
    return sums, examples


@contextlib.contextmanager
def _gradient_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) with every parameter frozen, so no `.grad` of the model is touched."""
    was_training = model.training
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)


@contextlib.contextmanager
def _capture(layers: dict[str, CPLLayer], sums: dict[str, torch.Tensor]) -> Iterator[None]:
    handles = [
        layer.register_forward_hook(_hook(layer, sums[name]), with_kwargs=True) for name, layer in layers.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook(layer: CPLLayer, accumulator: torch.Tensor):
    def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        if not torch.is_grad_enabled():
            return None  # e.g. the first, no-grad pass of gradient checkpointing
        x = (args[0] if args else next(iter(kwargs.values()))).detach()
        if not output.requires_grad:
            # nothing upstream requires grad (frozen model): make this output the start of the graph
            output = output.detach().requires_grad_(True)
        output.register_hook(lambda grad: _accumulate(layer, accumulator, x, grad))
        return output

    return forward_hook


def _accumulate(layer: CPLLayer, accumulator: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> None:
    """Add this batch's weight gradient, computed on the activations' device, into the (maybe offloaded) sum."""
    if isinstance(layer, Embedding):
        grad_2d = grad.reshape(-1, grad.shape[-1]).float()
        accumulator.index_add_(0, x.reshape(-1).to(accumulator.device), grad_2d.to(accumulator.device))
        return
    left, right = weight_grad_factors(grad, x, layer.transposed, dtype=torch.float32)
    if accumulator.device == grad.device:
        accumulator.addmm_(left.T, right)
    else:
        accumulator.add_((left.T @ right).to(accumulator.device))
