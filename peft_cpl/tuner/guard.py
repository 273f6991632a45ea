"""The paper's per-step rule as an optimizer-agnostic guard.

After each optimizer step, a support coordinate whose change Δ raises the mastered loss to first order
(Δ · g_M > 0, i.e. the paper's u · g_M < 0 for the descent direction u = -Δ / lr) is put back to its value before
the step. The optimizer's own state is left as the step made it, as the authors do with Adam. Only sign(g_M) on the
support is kept (int8, one byte per coordinate); it is refreshed never, every N steps, or at each epoch.

`attach(optimizer)` hooks the guard onto any torch optimizer through its own step hooks (`register_step_pre_hook` /
`register_step_post_hook`), so it works with an optimizer a Trainer or accelerate builds, without a wrapper.

Under torch.distributed (DDP) every rank builds the guard, which checks that all guard the same support; a refresh
sums each rank's g_M over all ranks before taking its sign, so every rank reverts the same coordinates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import distributed
from .adapters import cpl_layers, resolve_adapter
from .layer import CPLLayer
from .losses import LossFn, summed_example_loss

REFRESH_CHOICES = ("never", "epoch")


class CollaborativeGuard:
    """Masks every optimizer step of one CPL adapter to updates that do not raise the mastered loss to first order.

    Args:
        model: the PeftModel holding the CPL adapter.
        adapter_name: the adapter to guard (default: the active one).
        mastered: batches of mastered examples; needed to refresh sign(g_M), or when the adapter was loaded rather
            than selected in this process (selection leaves sign(g_M) on the layers).
        loss_fn: as in `select_collaborative`.
        refresh: "never" (sign(g_M) from selection), "epoch" (call `on_epoch_start()` each epoch; the Trainer
            callback does), or an int N (every N optimizer steps).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        adapter_name: str | None = None,
        mastered: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        refresh: str | int = "never",
    ) -> None:
        every_n_steps = isinstance(refresh, int) and not isinstance(refresh, bool) and refresh > 0
        if not (refresh in REFRESH_CHOICES or every_n_steps):
            raise ValueError(f"refresh must be one of {REFRESH_CHOICES} or a positive int of steps, got {refresh!r}")
        if refresh != "never" and mastered is None:
            raise ValueError(f"refresh={refresh!r} recomputes g_M, so the guard needs mastered=... batches")
        model = distributed.unwrap(model)  # a refresh runs the model itself, not DDP's forward
        self.model, self.mastered, self.loss_fn, self.refresh_policy = model, mastered, loss_fn, refresh
        self.adapter_name = resolve_adapter(model, adapter_name)
        self.layers = cpl_layers(model, self.adapter_name)
        if not all(layer.cpl_ready[self.adapter_name] for layer in self.layers.values()):
            raise ValueError(
                f"CPL adapter '{self.adapter_name}' has no support yet: run select_collaborative(...) before creating "
                "the guard (it guards the support's updates)."
            )
        self._check_ranks_agree()
        self.steps = 0
        self._refreshed_at = 0  # step count at the last refresh: sign(g_M) from selection is fresh at step 0
        self._counts = torch.zeros(2, dtype=torch.int64)  # reverted, proposed coordinate updates (on the device)
        self._before: dict[str, torch.Tensor] | None = None
        if any(self.adapter_name not in layer.cpl_mastered_sign for layer in self.layers.values()):
            if mastered is None:
                raise ValueError(
                    "sign(g_M) is unknown for this adapter (it was loaded, not selected in this process): pass "
                    "mastered=... so the guard can compute it"
                )
            self.refresh()

    def _values(self, layer: CPLLayer) -> torch.Tensor:
        return layer.cpl_values[self.adapter_name]

    def before_step(self) -> None:
        self._before = {name: self._values(layer).detach().clone() for name, layer in self.layers.items()}

    @torch.no_grad()
    def after_step(self) -> None:
        if self._before is None:
            raise RuntimeError("CollaborativeGuard.after_step() without before_step(): call both around step()")
        for name, before in self._before.items():
            self.revert_harmful(name, before)
        self._before = None
        self.end_step()

    @torch.no_grad()
    def revert_harmful(self, name: str, before: torch.Tensor) -> None:
        """Put back the coordinates of one layer's values whose change since `before` raises L_M to first order."""
        layer = self.layers[name]
        values = self._values(layer)
        sign = layer.cpl_mastered_sign[self.adapter_name]
        if distributed.is_sharded(values):  # FSDP2: this rank's shard of the values, and its slice of sign(g_M)
            start = distributed.shard_start(values)
            values, before = values.to_local(), before.to_local()
            sign = sign[start: start + values.numel()]
        sign = sign.to(values.dtype)
        change = values - before
        harmful = change * sign > 0
        values.copy_(torch.where(harmful, before, values))
        self._counts = self._counts.to(values.device)
        self._counts[0] += harmful.sum()
        self._counts[1] += (change != 0).sum()

    def end_step(self) -> None:
        """Count a finished optimizer step (the refresh policy counts these)."""
        self.steps += 1
        if isinstance(self.refresh_policy, int) and self.steps % self.refresh_policy == 0:
            self.refresh()

    def values_by_name(self) -> dict[torch.nn.Parameter, str]:
        """{values tensor: layer name} of the guarded adapter, for code that steps tensors one at a time."""
        return {self._values(layer): name for name, layer in self.layers.items()}

    def on_epoch_start(self) -> None:
        if self.refresh_policy == "epoch" and self.steps > self._refreshed_at:  # nothing moved since: still exact
            self.refresh()

    def refresh(self) -> None:
        """Recompute sign(g_M) on the support at the current weights: one forward+backward per mastered batch.

        The gradients come from `torch.autograd.grad`, so no parameter's `.grad` is written: a training step's
        gradients stay as they were, and no gradient hook (the fused step's) fires. Under torch.distributed they are
        summed over the ranks. Values sharded by FSDP2 cannot be reached by `torch.autograd.grad` (it returns None for
        them): there `backward()` reduce-scatters g_M into their `.grad`, which is gathered whole, then put back.
        """
        self._refreshed_at = self.steps
        names = list(self.layers)
        values = [self._values(self.layers[name]) for name in names]
        flags = [value.requires_grad for value in values]
        was_training = self.model.training
        device = values[0].device
        sharded = distributed.is_sharded(values[0])
        sums = [torch.zeros(value.shape, dtype=value.dtype, device=device) for value in values]
        stashed = [value.grad for value in values]  # the step's gradients (FSDP2's backward writes .grad)
        self.model.eval()
        try:
            for value in values:
                value.requires_grad_(True)
                if sharded:
                    value.grad = None
            with torch.enable_grad():  # may be called from after_step, which runs under no_grad
                for batch in self.mastered:
                    loss, _ = summed_example_loss(self.model, send_to_device(batch, device), self.loss_fn)
                    if sharded:
                        loss.backward()  # reduce-scattered (averaged) over the ranks into each shard's .grad
                        continue
                    grads = torch.autograd.grad(loss, values, allow_unused=True)  # None: M does not reach a layer
                    for total, grad in zip(sums, grads):
                        if grad is not None:
                            total.add_(grad)
            if sharded:
                sums = [total if value.grad is None else value.grad.full_tensor()
                        for total, value in zip(sums, values)]
            else:
                distributed.sum_over_ranks_(sums)  # sign of g_M over every rank's mastered examples, the same on each
            for name, total in zip(names, sums):
                self.layers[name].set_mastered_sign(self.adapter_name, total)
        finally:
            for value, flag, grad in zip(values, flags, stashed):
                value.requires_grad_(flag)
                if sharded:
                    value.grad = grad
            self.model.train(was_training)

    def _check_ranks_agree(self) -> None:
        """Under torch.distributed: every rank builds a guard, for the same adapter, support and refresh policy."""
        distributed.check_joined("CollaborativeGuard(...)")
        if distributed.world_size() == 1:
            return
        supports = [(name, self._values(layer).numel(), distributed.coordinate_digest(layer.support(self.adapter_name)
                     .indices)) for name, layer in self.layers.items()]
        signs = all(self.adapter_name in layer.cpl_mastered_sign for layer in self.layers.values())
        distributed.check_same("CollaborativeGuard", {
            "adapter": self.adapter_name, "refresh": str(self.refresh_policy),
            "support": distributed.fingerprint(supports), "sign(g_M) from selection": signs,
        })

    def attach(self, optimizer: torch.optim.Optimizer) -> GuardHandle:
        """Guard every `step()` of `optimizer` from now on; `.remove()` the returned handle to stop.

        Wrappers (accelerate's AcceleratedOptimizer, a Trainer's) are looked through to the torch optimizer that
        steps, so a step that a wrapper skips (gradient accumulation, an overflowing fp16 scaler) is not counted.
        """
        optimizer = innermost_optimizer(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"the guard attaches to a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if hasattr(optimizer, "inner"):  # a FusedStep steps inside backward, before any step hook could run
            raise ValueError(
                "a fused optimizer steps inside backward: give it the guard instead of attaching it, "
                "FusedStep(params, ..., guard=guard) or make_optimizer(..., fused=True, guard=guard)"
            )
        stepped = {id(param) for group in optimizer.param_groups for param in group["params"]}
        if not any(id(self._values(layer)) in stepped for layer in self.layers.values()):
            raise ValueError(
                f"this {type(optimizer).__name__} does not step the adapter's values tensors, so the guard cannot "
                "revert its updates: build it over the model's parameters. (DeepSpeed ZeRO steps flat copies and "
                "writes them back after the step hooks: use the guard with DDP or FSDP2.)"
            )
        before = optimizer.register_step_pre_hook(lambda *_: self.before_step())
        after = optimizer.register_step_post_hook(lambda *_: self.after_step())
        return GuardHandle(before, after)

    @property
    def reverted(self) -> int:
        """Coordinate updates put back so far."""
        return int(self._counts[0])

    @property
    def proposed(self) -> int:
        """Coordinate updates the optimizer made so far (before the guard)."""
        return int(self._counts[1])

    @property
    def revert_fraction(self) -> float:
        return self.reverted / self.proposed if self.proposed else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "refreshed_at": self._refreshed_at,
            "counts": self._counts.cpu(),
            "signs": {name: layer.cpl_mastered_sign[self.adapter_name].cpu() for name, layer in self.layers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        signs = state["signs"]
        if set(signs) != set(self.layers):
            raise ValueError("guard state was saved for other modules than this adapter's")
        for name, layer in self.layers.items():
            if signs[name].numel() != self._values(layer).numel():
                raise ValueError(f"{name}: guard state has {signs[name].numel()} signs for a different support")
        for name, layer in self.layers.items():
            layer.cpl_mastered_sign[self.adapter_name] = signs[name].to(layer._base_device(), torch.int8)
        self.steps, self._counts = state["steps"], state["counts"].clone()
        self._refreshed_at = state.get("refreshed_at", self.steps)


def innermost_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that steps, under wrappers such as accelerate's AcceleratedOptimizer (`.optimizer`)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class GuardHandle:
    """Both step hooks of one `attach`, removed together (also as a context manager)."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self) -> GuardHandle:
        return self

    def __exit__(self, *_) -> None:
        self.remove()
