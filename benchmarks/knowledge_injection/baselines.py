"""Forgetting baselines that are not part of peft_cpl, so that the benchmark compares CPL with them on equal terms.

Each one plugs into `peft_cpl.toolkit.loop.train` through what it already takes (a `loss_fn`, an optimizer with a
step hook, a sequence of batches), so the training loop itself is the library's.

- N-LoRA: "Is Parameter Collision Hindering Continual Learning in LLMs?" (COLING 2025). LoRA plus
  lambda * ||Delta W||_1 on the new task's update, Delta W = scaling * B @ A (d_out x d_in), as the paper writes it.
  The released code penalises torch.mm(A, B) instead, an r x r product that exists only for square layers; it is kept
  as the named variant "released" (non-square layers get no penalty there, as that code cannot form the product).
  The paper's parameter collision rate (positions where two tasks' updates are both non-zero, over all positions) is
  `collision_rate` below; for float updates "non-zero" needs a threshold, which the caller chooses and reports.
- A-GEM: Chaudhry, Ranzato, Rohrbach, Elhoseiny, "Efficient Lifelong Learning with A-GEM" (ICLR 2019). Before each
  step, the gradient g is compared with a reference gradient g_ref from one batch of episodic memory (here: the
  mastered reference set); if g . g_ref < 0 it is projected to g - (g . g_ref / g_ref . g_ref) g_ref, so that to
  first order the step does not raise the reference loss.
- Experience replay: mixing stored examples of earlier knowledge into each batch (e.g. Chaudhry et al., "On Tiny
  Episodic Memories in Continual Learning", 2019); here a few mastered-reference items are added to every injection
  batch, drawn in a seeded cycle so that successive steps replay different items.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import torch
from accelerate.utils import send_to_device
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.hooks import RemovableHandle

from peft_cpl.toolkit.batches import make_batches
from peft_cpl.tuner.losses import LossFn, summed_example_loss, token_losses

NLORA_FORMS = ("paper", "released")


def nlora_penalty(model: nn.Module, form: str = "paper") -> torch.Tensor:
    """Sum over active LoRA pairs of ||scaling * B @ A||_1 ("paper") or ||A @ B||_1 of square layers ("released")."""
    if form not in NLORA_FORMS:
        raise ValueError(f"form must be one of {NLORA_FORMS}, got {form!r}")
    total = None
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            a, b = module.lora_A[name].weight, module.lora_B[name].weight  # (r, d_in), (d_out, r)
            if form == "paper":
                term = (module.scaling[name] * (b @ a)).abs().sum()
            elif a.shape[1] == b.shape[0]:
                term = torch.mm(a, b).abs().sum()  # r x r, as in the released code
            else:
                continue
            total = term if total is None else total + term
    if total is None:
        raise ValueError("the model has no active LoRA layer to penalise (wrap it with peft LoraConfig first)")
    return total


def nlora_loss(lam: float, form: str = "paper") -> LossFn:
    """`loss_fn` for `train`: mean causal-LM loss on the target tokens plus lam * the N-LoRA penalty (a scalar)."""

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        task = token_losses(model(**inputs).logits, batch["labels"]).mean()
        return task + lam * nlora_penalty(model, form)

    return loss_fn


class AGEM:
    """A-GEM on any torch optimizer: `attach` projects the gradient against one reference batch before each step.

    Attaches like `peft_cpl.CollaborativeGuard.attach`, through torch's step pre-hook (wrappers with an `.optimizer`
    are looked through); the returned handle's `.remove()`, or leaving it as a context manager, detaches it.
    Reference batches are visited in a seeded random order, one per step, at the current weights.
    """

    def __init__(
        self, model: nn.Module, reference_batches: Sequence[dict], loss_fn: LossFn | None = None, seed: int = 0
    ) -> None:
        if not reference_batches:
            raise ValueError("A-GEM needs at least one reference batch")
        self.model, self.loss_fn = model, loss_fn
        order = list(range(len(reference_batches)))
        random.Random(seed).shuffle(order)
        self._reference = itertools.cycle([reference_batches[index] for index in order])
        self.steps = 0
        self.projected = 0  # steps whose gradient conflicted with the reference and was projected

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        while hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"A-GEM attaches to a torch.optim.Optimizer, got {type(optimizer).__name__}")
        return optimizer.register_step_pre_hook(lambda stepping, *_: self.project(stepping))

    def project(self, optimizer: torch.optim.Optimizer) -> None:
        """Where g . g_ref < 0, set the parameters' gradient g to g - (g . g_ref / g_ref . g_ref) g_ref."""
        params = [param for group in optimizer.param_groups for param in group["params"]]
        grads = [None if param.grad is None else param.grad.detach().clone() for param in params]
        for param in params:
            param.grad = None
        device = params[0].device
        with torch.enable_grad():
            loss, count = summed_example_loss(self.model, send_to_device(next(self._reference), device), self.loss_fn)
            (loss / count).backward()
        reference = [param.grad for param in params]
        dot = sum((g * r).sum() for g, r in zip(grads, reference) if g is not None and r is not None)
        norm_sq = sum(r.square().sum() for r in reference if r is not None)
        if isinstance(dot, torch.Tensor) and bool(dot < 0) and bool(norm_sq > 0):
            coefficient = dot / norm_sq
            grads = [
                g if g is None or r is None else g - coefficient * r for g, r in zip(grads, reference)
            ]
            self.projected += 1
        for param, grad in zip(params, grads):
            param.grad = grad
        self.steps += 1


class ReplayBatches(Sequence):
    """Injection batches with `per_batch` replayed items appended; every access draws the next replayed items.

    `train` indexes each batch once per step, so the replayed items cycle through `replay_items` over training while
    the injection part (and the number of steps) stays exactly that of the other methods.
    """

    def __init__(
        self, tokenizer, injection_chunks: Sequence[Sequence[dict]], replay_items: Sequence[dict], per_batch: int,
        seed: int = 0,
    ) -> None:
        if per_batch < 1 or not replay_items:
            raise ValueError("replay needs per_batch >= 1 and at least one item to replay")
        order = list(replay_items)
        random.Random(seed).shuffle(order)
        self.tokenizer, self.chunks, self.per_batch = tokenizer, [list(chunk) for chunk in injection_chunks], per_batch
        self._replay = itertools.cycle(order)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict:
        items = self.chunks[index] + [next(self._replay) for _ in range(self.per_batch)]
        return make_batches(self.tokenizer, items, len(items))[0]


def collision_rate(
    deltas_a: dict[str, torch.Tensor], deltas_b: dict[str, torch.Tensor], thresholds: dict[str, float]
) -> float:
    """N-LoRA's parameter collision rate: positions where both updates exceed the threshold, over all positions."""
    both = total = 0
    for name, delta_a in deltas_a.items():
        limit = thresholds[name]
        both += int(((delta_a.abs() > limit) & (deltas_b[name].abs() > limit)).sum())
        total += delta_a.numel()
    return both / total if total else 0.0
