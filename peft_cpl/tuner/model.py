"""CPLModel: the PEFT tuner. Dispatches modules to CPL layers and stores supports compactly on save."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_quantization_kwargs
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import cpl_layers
from .bnb import keep_canonical_layout
from .codec import encode_support
from .config import CPLConfig
from .integrity import record_problem
from .layer import CPLLayer, Embedding, Linear

_QUANTIZED_BACKENDS = ("bnb 8bit", "bnb 4bit")


class CPLModel(BaseTuner):
    """Collaborative Parameter Learning tuner: a sparse delta on every targeted weight.

    Example:
        ```py
        >>> import peft_cpl
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_cpl.CPLConfig(target_modules="all-linear"))
        >>> peft_cpl.select_collaborative(model, mastered_batches, injection_batches)
        ```
    """

    prefix: str = "cpl_"
    tuner_layer_cls = CPLLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: CPLConfig, adapter_name: str) -> None:
        # 4-bit weights that bitsandbytes repacked for its CPU kernel (any eval forward on an AVX512-BF16 CPU) would
        # block gradients and be misread by merges; keep the whole model in the canonical layout (tuner/bnb.py).
        keep_canonical_layout(model)
        # Weights shared by several modules (tied embeddings) would get the delta in one place unmerged and in
        # every place once merged; remember them to refuse targeting them.
        owners: dict[int, list[str]] = {}
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and not isinstance(module, BaseTunerLayer):
                owners.setdefault(id(weight), []).append(name)
        self._tied_owners = {key: names for key, names in owners.items() if len(names) > 1}

    def _create_and_replace(
        self, config: CPLConfig, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module,
        current_key: str, **optional_kwargs,
    ) -> None:
        if isinstance(target, CPLLayer):
            target.update_layer(adapter_name, config, module_name=current_key, inference_mode=config.inference_mode)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        tied = getattr(self, "_tied_owners", {}).get(id(getattr(base, "weight", None)))
        if tied:
            raise ValueError(
                f"CPL cannot target '{current_key}': its weight is shared with {tied} (tied embeddings), so the "
                "unmerged and merged models would differ. Exclude it (exclude_modules) or untie the weights first."
            )
        layer_cls = _layer_class(base, current_key)
        new_module = layer_cls(
            target, adapter_name, config, module_name=current_key, **get_quantization_kwargs(self.model)
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT upcasts half-precision adapter weights to fp32; CPL values keep the dtype the config asks for.
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        dtype = self.peft_config[adapter_name].torch_delta_dtype
        for module in cpl_layers(self.model, adapter_name).values():
            values = module.cpl_values[adapter_name]
            if values.dtype != dtype:
                module.cpl_values[adapter_name] = nn.Parameter(values.data.to(dtype), values.requires_grad)

    # -- saving and loading --------------------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Replace each module's flat index buffer by its compact, checksummed record (see codec.py)."""
        to_save = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, layer in cpl_layers(model, adapter_name).items():
            key = f"{name}.cpl_indices.{adapter_name}"
            if key in to_save:
                values = to_save[f"{name}.cpl_values.{adapter_name}"]
                to_save[key] = encode_support(layer.support(adapter_name), values)
        return to_save

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Decode every record, check it against the model, then size the supports: all or nothing."""
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        plans, problems, damaged = [], [], []
        for name, layer in cpl_layers(model, adapter_name).items():
            values_key, index_key = f"{name}.cpl_values.{adapter_name}", f"{name}.cpl_indices.{adapter_name}"
            if values_key not in state_dict or index_key not in state_dict:
                problems.append(f"{name}: no entry in the adapter file")
                continue
            record, damage = record_problem(state_dict[values_key], state_dict[index_key])
            if record is not None and record.support.shape != tuple(layer.delta_shape):
                problems.append(
                    f"{name}: adapter was made for a weight of shape {record.support.shape}, base has "
                    f"{layer.delta_shape}"
                )
            elif damage is not None:  # the file's own records disagree: damage, whatever the base
                damaged.append(f"{name}: {damage}")
            elif record.support.rows is not None and record.support.output_dim != layer.output_dim:
                problems.append(f"{name}: the adapter's row support runs along the other dimension of the weight")
            else:
                plans.append((layer, record.support, values_key, index_key))
        known = {key for _, _, *keys in plans for key in keys}
        for key in state_dict:
            if (".cpl_values" in key or ".cpl_indices" in key) and key not in known and not _claimed(
                key, problems + damaged
            ):
                problems.append(f"{key.rsplit('.cpl_', 1)[0]}: in the adapter file but not a CPL module of the model")
        if problems or damaged:
            if len(getattr(model, "peft_config", {})) > 1 and hasattr(model, "delete_adapter"):
                model.delete_adapter(adapter_name)  # load_adapter added it; leave the model as it was
            raise ValueError(_load_error(adapter_name, damaged, problems))
        for layer, support, _, index_key in plans:
            layer.set_support(adapter_name, support)
            state_dict[index_key] = layer.cpl_indices[adapter_name]
        return state_dict


def _load_error(adapter_name: str, damaged: list[str], problems: list[str]) -> str:
    """Damage first (it is the file's fault whatever the base), then what does not fit the base."""
    parts = [f"Cannot load CPL adapter '{adapter_name}' (nothing was loaded):"]
    for heading, found, advice in (
        ("its file is damaged (changed after it was saved; the base model is not the cause)", damaged,
         "Save the adapter again or restore the file from a copy."),
        ("it does not match this base model", problems,
         "Load it onto the base model it was trained on (same architecture and target_modules)."),
    ):
        if found:
            listed = "\n    ".join(found[:20]) + (f"\n    ... and {len(found) - 20} more" if len(found) > 20 else "")
            parts.append(f"  {heading}:\n    {listed}\n  {advice}")
    return "\n".join(parts)


def _claimed(key: str, problems: list[str]) -> bool:
    return any(problem.startswith(key.rsplit(".cpl_", 1)[0] + ":") for problem in problems)


def _layer_class(base: nn.Module, key: str) -> type[CPLLayer]:
    if isinstance(base, nn.Embedding):
        return Embedding
    backend = resolve_quantization_backend(base)
    if backend is not None:
        if backend.backend_name not in _QUANTIZED_BACKENDS:
            raise TypeError(
                f"CPL cannot target '{key}': {backend.backend_name} layers are not supported; supported quantized "
                "bases are bitsandbytes 8-bit and 4-bit."
            )
        return Linear
    if isinstance(base, (nn.Linear, Conv1D)):
        return Linear
    raise TypeError(
        f"CPL cannot target '{key}' of type {type(base).__name__}: supported are torch.nn.Linear, torch.nn.Embedding, "
        "transformers Conv1D and bitsandbytes Linear8bitLt / Linear4bit. Adjust target_modules."
    )
