"""What several modules need of a model's CPL adapters: its layers, which adapter is meant, its supports.

`export_support` / `restore_support` move the supports (and sign(g_M) where selection left it) of one adapter to
another model of the same architecture: e.g. select once, then train several methods or learning rates from the same
support without selecting again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .layer import CPLLayer
from .support import Support


def cpl_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, CPLLayer]:
    """{module name: CPL layer} of the layers that carry `adapter_name` (every CPL layer when None)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, CPLLayer) and (adapter_name is None or adapter_name in module.cpl_values)
    }


def resolve_adapter(model: nn.Module, adapter_name: str | None = None) -> str:
    """The adapter meant: `adapter_name` when the model has it, else the one active adapter. Errors say why not."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if not isinstance(model, nn.Module):
        raise ValueError(
            f"expected the PeftModel holding a CPL adapter, got a {type(model).__name__}: pass the model that "
            "peft.get_peft_model(model, peft_cpl.CPLConfig(...)) or PeftModel.from_pretrained returned"
        )
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not cpl_layers(model):
        kinds = {name: str(getattr(config, "peft_type", "?")) for name, config in (configs or {}).items()}
        has = f" (its adapters: {kinds})" if kinds else ""
        raise ValueError(
            f"this {type(model).__name__} has no CPL adapter{has}: wrap it first with "
            "peft.get_peft_model(model, peft_cpl.CPLConfig(...)), or load one with PeftModel.from_pretrained"
        )
    if not isinstance(model, (PeftModel, BaseTuner)):  # e.g. get_base_model(), or inject_adapter_in_model
        raise ValueError(
            f"this {type(model).__name__} has CPL layers but is not a PeftModel, so which adapter is active is not "
            "known: pass the PeftModel itself (what peft.get_peft_model(model, peft_cpl.CPLConfig(...)) or "
            "PeftModel.from_pretrained returned), not its get_base_model() or a model from inject_adapter_in_model"
        )
    if adapter_name is not None:
        if adapter_name not in configs or not cpl_layers(model, adapter_name):
            raise ValueError(f"the model has no CPL adapter '{adapter_name}'; it has {sorted(configs)}")
        return adapter_name
    active = model.active_adapters if hasattr(model, "active_adapters") else list(configs)
    active = [active] if isinstance(active, str) else list(active)
    if len(active) != 1:
        raise ValueError(f"several adapters are active ({active}); pass adapter_name=")
    return active[0]


def relative_name(name: str, model: nn.Module | None = None) -> str:
    """A module's name inside the base model, whatever wraps it (PeftModel, or its tuner when `model` is one)."""
    from peft.tuners.tuners_utils import BaseTuner

    if name.startswith("base_model."):
        return name.removeprefix("base_model.").removeprefix("model.")
    return name.removeprefix("model.") if isinstance(model, BaseTuner) else name


@dataclass
class AdapterSupport:
    """The supports of one adapter, by module name inside the base model, and sign(g_M) on them where known."""

    supports: dict[str, Support] = field(default_factory=dict)
    mastered_signs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(support.size for support in self.supports.values())


def export_support(model: nn.Module, adapter_name: str | None = None) -> AdapterSupport:
    """A copy (on the CPU) of every support of the adapter, with sign(g_M) where selection or the guard left it."""
    adapter_name = resolve_adapter(model, adapter_name)
    exported = AdapterSupport()
    for name, layer in cpl_layers(model, adapter_name).items():
        key = relative_name(name, model)
        exported.supports[key] = layer.support(adapter_name).to("cpu")
        if adapter_name in layer.cpl_mastered_sign:
            exported.mastered_signs[key] = layer.cpl_mastered_sign[adapter_name].detach().cpu().clone()
    return exported


def restore_support(model: nn.Module, exported: AdapterSupport, adapter_name: str | None = None) -> None:
    """Give the adapter the exported supports (values restart at zero), checked module by module first."""
    adapter_name = resolve_adapter(model, adapter_name)
    layers = {relative_name(name, model): layer for name, layer in cpl_layers(model, adapter_name).items()}
    problems = sorted(set(layers) ^ set(exported.supports))
    problems += [
        f"{name}: support for shape {exported.supports[name].shape}, weight has {layer.delta_shape}"
        for name, layer in layers.items()
        if name in exported.supports and exported.supports[name].shape != tuple(layer.delta_shape)
    ]
    if problems:
        raise ValueError("the exported support does not fit this model's adapter: " + "; ".join(problems[:10]))
    for name, layer in layers.items():
        layer.set_support(adapter_name, exported.supports[name])
        if name in exported.mastered_signs:
            layer.set_mastered_sign(adapter_name, exported.mastered_signs[name])
