"""The fused step: each values tensor is stepped the moment its gradient is accumulated, and the gradient is freed.

A sparse delta's gradient is as large as its values; keeping every gradient until `optimizer.step()` costs 4 bytes
per trained value at the peak of the backward pass. torch's `register_post_accumulate_grad_hook` with one optimizer
per tensor (the pattern of torch's "fuse the optimizer step into the backward pass" tutorial) removes that: at most
one values tensor's gradient exists at a time. The guard's revert runs per tensor, right after that tensor's step.

What cannot work, and is refused: gradient accumulation (a tensor would be stepped on every micro-batch), clipping
by the global gradient norm (no moment has all gradients at once) and fp16 loss scaling (the hooks would step on
scaled gradients, and an overflowing step could not be skipped).

Under torch.distributed each gradient is averaged over the ranks (all_reduce) in its hook, before its step, as DDP
would average it: DDP itself cannot be used, since its bucketed all-reduce runs after these hooks have stepped on the
local gradient, so the model must not be wrapped in DDP. Values sharded by FSDP2 are refused: FSDP2 writes their
gradients without the hook firing, so they would never be stepped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from . import distributed
from .guard import CollaborativeGuard


class FusedStep(torch.optim.Optimizer):
    """An optimizer that steps each parameter inside the backward pass, through one `optimizer_cls` per parameter.

    Use it where an optimizer goes: in a plain loop, `loss.backward()` does the stepping and `step()` only closes
    the step (counting it for the guard's refresh); `zero_grad()` has nothing to clear. LR schedulers work: the
    param groups are the per-parameter optimizers' own. With a `guard`, every CPL values tensor of the guarded
    adapter is reverted where its change would raise the mastered loss, right after its own step.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        optimizer_cls: Callable[..., torch.optim.Optimizer],
        *,
        guard: CollaborativeGuard | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        params = [param for param in params if param.requires_grad]
        if not params:
            raise ValueError("FusedStep got no trainable parameters (was the CPL support selected?)")
        if any(distributed.is_sharded(param) for param in params):
            raise ValueError("FusedStep cannot step parameters sharded by FSDP2's fully_shard (their gradients are "
                             "written without the hook that steps them): use a plain optimizer, fused=False")
        self.inner = {param: optimizer_cls([param], **optimizer_kwargs) for param in params}
        super().__init__(params, defaults={})
        self.param_groups = [group for optimizer in self.inner.values() for group in optimizer.param_groups]
        self.guard = guard
        self._guarded = {} if guard is None else guard.values_by_name()
        self._stepped_since_step: set[nn.Parameter] = set()
        for param in params:  # a parameter is stepped by one fused optimizer: a new one takes over from the last
            previous = getattr(param, "_cpl_fused_step", None)
            if previous is not None and previous is not self:
                previous.remove()
            param._cpl_fused_step = self
        self._hooks = [param.register_post_accumulate_grad_hook(self._step_one) for param in params]

    @torch.no_grad()
    def _step_one(self, param: nn.Parameter) -> None:
        if param in self._stepped_since_step:
            raise RuntimeError(
                "FusedStep stepped a tensor twice before optimizer.step(): gradient accumulation is not possible with "
                "the fused step (each backward pass steps at once). Use gradient_accumulation_steps=1 and a larger "
                "batch, or a plain optimizer (fused=False)."
            )
        if distributed.world_size() > 1:  # every rank steps on the same, averaged gradient (as DDP's would be)
            distributed.sum_over_ranks_([param.grad])
            param.grad.div_(distributed.world_size())
        name = self._guarded.get(param)
        before = param.detach().clone() if name is not None else None
        self.inner[param].step()
        param.grad = None
        self._stepped_since_step.add(param)
        if name is not None:
            self.guard.revert_harmful(name, before)

    def step(self, closure: Callable[[], float] | None = None) -> None:
        """Close the step: every tensor was stepped during the backward pass."""
        if closure is not None:
            raise ValueError("FusedStep steps during backward(): a closure cannot be re-evaluated")
        self._stepped_since_step.clear()
        if self.guard is not None:
            self.guard.end_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Each gradient was freed right after its tensor's step; clear any that other code left."""
        for param in self.inner:
            param.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"per_parameter": [optimizer.state_dict() for optimizer in self.inner.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["per_parameter"]
        if len(states) != len(self.inner):
            raise ValueError(f"fused optimizer state for {len(states)} tensors; this one trains {len(self.inner)}")
        for optimizer, state in zip(self.inner.values(), states):
            optimizer.load_state_dict(state)
        self.param_groups = [group for optimizer in self.inner.values() for group in optimizer.param_groups]

    def remove(self) -> None:
        """Detach from the parameters (the hooks stay otherwise, for as long as the parameters live)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for param in self.inner:
            if getattr(param, "_cpl_fused_step", None) is self:
                del param._cpl_fused_step


def check_trainer_arguments(args: Any) -> None:
    """Refuse, before the first step, HF Trainer settings the fused step cannot honour."""
    problems = []
    if getattr(args, "gradient_accumulation_steps", 1) > 1:
        problems.append(f"gradient_accumulation_steps={args.gradient_accumulation_steps} (use 1 and a larger batch)")
    if (getattr(args, "max_grad_norm", 0) or 0) > 0:
        problems.append(f"max_grad_norm={args.max_grad_norm} (set max_grad_norm=0: no global norm exists)")
    if getattr(args, "fp16", False):
        problems.append("fp16=True (its loss scaling needs every gradient before the step; use bf16=True)")
    if (getattr(args, "world_size", 1) or 1) > 1:
        problems.append(f"{args.world_size} processes (the Trainer wraps the model in DDP, whose all-reduce comes "
                        "after the fused step's in-backward steps)")
    if problems:
        raise ValueError("The fused step cannot run with " + " and ".join(problems) + ", or use fused=False.")
