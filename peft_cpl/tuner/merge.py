"""bitsandbytes bases: merge CPL deltas into 8-bit / 4-bit weights and report what survived, or merge losslessly.

Requantizing rounds: an 8-bit row has a step of absmax/127, so a change smaller than half a step vanishes. A sparse
delta trained for a few epochs is often that small, so `merge_and_report` says per module how much of the delta
made it into the requantized weight, and `merge_into_float` gives the lossless alternative: a float model holding
dequantized(W) + delta, whose outputs match the unmerged adapter.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import cpl_layers
from .bnb import dequantized_weight


@dataclass
class ModuleMerge:
    name: str
    support: int
    intended_norm: float  # ||delta||
    error_norm: float  # ||(merged - before) - delta|| at every coordinate
    vanished: int  # support coordinates whose non-zero change did not move the stored weight at all

    @property
    def retained(self) -> float:
        """1 - relative error of the applied delta (1 = exact; 0 = nothing of it survived, or as much noise)."""
        return 1.0 - self.error_norm / self.intended_norm if self.intended_norm else 1.0


@dataclass
class MergeReport:
    modules: list[ModuleMerge] = field(default_factory=list)

    @property
    def retained(self) -> float:
        intended = sum(m.intended_norm**2 for m in self.modules) ** 0.5
        error = sum(m.error_norm**2 for m in self.modules) ** 0.5
        return 1.0 - error / intended if intended else 1.0

    @property
    def vanished_fraction(self) -> float:
        support = sum(m.support for m in self.modules)
        return sum(m.vanished for m in self.modules) / support if support else 0.0

    def table(self) -> str:
        lines = [f"{'module':<56} {'support':>10} {'retained':>9} {'vanished':>9}"]
        for m in self.modules:
            vanished = m.vanished / max(m.support, 1)
            lines.append(f"{m.name[-56:]:<56} {m.support:>10,} {m.retained:>9.1%} {vanished:>9.1%}")
        lines.append(f"{'all':<56} {sum(m.support for m in self.modules):>10,} {self.retained:>9.1%} "
                     f"{self.vanished_fraction:>9.1%}")
        return "\n".join(lines)


def merge_and_report(model: nn.Module, adapter_names: list[str] | None = None, warn_below: float = 0.9):
    """`merge_and_unload` that also measures, per module, how much of the delta survived requantization.

    Returns (merged base model, MergeReport). Warns when less than `warn_below` of the delta survived overall; use
    `merge_into_float` for a lossless merge then.
    """
    report = MergeReport()
    for name, layer in cpl_layers(model).items():
        names = [n for n in (adapter_names or layer.active_adapters) if n in layer.cpl_values]
        before = layer.get_base_weight().detach().float().clone()  # on the layer's device, like everything here
        intended = torch.zeros_like(before)
        support = torch.zeros(before.numel(), dtype=torch.bool, device=before.device)
        for n in names:
            layer.add_delta_into(intended, n)
            support[layer.support(n).indices] = True
        layer.merge(adapter_names=names)
        applied = layer.get_base_weight().detach().float() - before
        moved = applied.reshape(-1)[support] != 0
        report.modules.append(
            ModuleMerge(
                name=name,
                support=int(support.sum()),
                intended_norm=float(intended.norm()),
                error_norm=float((applied - intended).norm()),
                vanished=int((~moved & (intended.reshape(-1)[support] != 0)).sum()),
            )
        )
    merged = model.unload()
    if report.retained < warn_below:
        warnings.warn(
            f"Only {report.retained:.1%} of the CPL delta survived requantization ({report.vanished_fraction:.1%} of "
            "support coordinates did not move): the updates are smaller than half a quantization step. Use "
            "peft_cpl.tuner.merge.merge_into_float(model) for a lossless merge into a float copy.",
            stacklevel=2,
        )
    return merged, report


def merge_into_float(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Lossless merge: every quantized linear becomes a float `nn.Linear` holding dequantized(W) (+ its CPL deltas).

    The result is a plain float transformers model (quantization config removed) that `save_pretrained` can write
    and whose outputs match the unmerged adapter up to the quantized kernels' own activation rounding.
    """
    import bitsandbytes as bnb

    for name, layer in cpl_layers(model).items():
        weight = layer.get_base_weight().detach().to(torch.float32).clone()
        for adapter in layer.active_adapters:
            if adapter in layer.cpl_values:
                layer.add_delta_into(weight, adapter)
        _replace(model, name, _float_module(layer.get_base_layer(), weight, dtype))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, module in list(base.named_modules()):
        if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            _replace(base, name, _float_module(module, dequantized_weight(module), dtype))
    _strip_quantization(base)
    return base.to(dtype)


def _strip_quantization(model: nn.Module) -> None:
    """Make transformers treat the model as the plain float model it now is (saveable, castable)."""
    for attribute in ("hf_quantizer", "quantization_method", "is_loaded_in_8bit", "is_loaded_in_4bit"):
        if attribute in model.__dict__:
            delattr(model, attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _float_module(original: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    bias = getattr(original, "bias", None)
    if isinstance(original, nn.Embedding):
        module = nn.Embedding(*weight.shape, padding_idx=original.padding_idx, dtype=dtype, device=weight.device)
    elif isinstance(original, Conv1D):
        module = Conv1D(weight.shape[1], weight.shape[0]).to(dtype=dtype, device=weight.device)
    else:
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=weight.device)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None and module.bias is not None:
            module.bias.copy_(bias.detach())
    return module


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
