"""CPL layers: a frozen base layer plus, per adapter, a sparse delta (support indices + trainable values)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import bnb
from . import functional as SF
from . import packed as P
from .config import CPLConfig
from .packed import PackedSupport
from .scoring import data_free_support
from .support import Support


class CPLLayer(BaseTunerLayer):
    """Per-adapter sparse deltas on one base layer.

    `cpl_values[name]` is the only trainable tensor (1-D, one value per support coordinate, in the weight's flat
    order). The support is kept compact (packed.py): `cpl_indices[name]` holds its codes (row ids, a bitmask, or the
    low 16 bits of each coordinate), `cpl_index_starts[name]` the block starts of the last form, and
    `cpl_index_form[name]` which form it is. A layer is "ready" for an adapter once its support exists: at creation
    for random / magnitude / dense supports, after `select_collaborative` (or loading) for collaborative ones.
    """

    adapter_layer_names = ("cpl_values",)
    other_param_names = (
        "cpl_indices", "cpl_index_starts", "cpl_index_form", "cpl_index_storage", "cpl_mastered_sign", "cpl_ready",
    )
    flat_support = False  # keep plain flat coordinates (embeddings look their delta up per token)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.cpl_values = nn.ParameterDict({})
        self.cpl_indices = BufferDict(persistent=True)  # saved, as the codec's record (model.py)
        self.cpl_index_starts = BufferDict(persistent=False)
        self.cpl_index_form: dict[str, str] = {}
        self.cpl_index_storage: dict[str, str] = {}  # CPLConfig.index_storage, per adapter
        self.cpl_mastered_sign = BufferDict(persistent=False)  # sign(g_M) on the support, int8, for the guard
        self.cpl_ready: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )

    # -- geometry ---------------------------------------------------------------------------------------------
    @property
    def delta_shape(self) -> tuple[int, int]:
        """Shape of the base weight as stored (the index space of the support)."""
        raise NotImplementedError

    @property
    def output_dim(self) -> int:
        """Dimension of `delta_shape` that indexes outputs (rows of the support at granularity 'row')."""
        return 0

    # -- support ------------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: CPLConfig, module_name: str = "", inference_mode: bool = False):
        values_dtype = config.torch_delta_dtype
        self.cpl_values[adapter_name] = nn.Parameter(torch.zeros(0, dtype=values_dtype))
        self.cpl_index_storage[adapter_name] = config.index_storage
        self._keep(adapter_name, P.pack(Support.empty(self.delta_shape), form=P.FLAT))
        self.cpl_ready[adapter_name] = False
        if config.support != "collaborative":
            weight = self.get_base_weight() if config.support == "magnitude" else None
            support = data_free_support(
                config.support, self.delta_shape, density=config.density, granularity=config.granularity,
                output_dim=self.output_dim, seed=config.seed, module_name=module_name, weight=weight,
            )
            self.set_support(adapter_name, support)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_support(self, adapter_name: str, support: Support, values: torch.Tensor | None = None) -> None:
        """Replace an adapter's support; its values restart at zero unless `values` are given."""
        if adapter_name not in self.cpl_values:
            raise KeyError(f"adapter '{adapter_name}' is not on this layer; available: {list(self.cpl_values)}")
        if not isinstance(support, Support):
            raise TypeError(f"set_support takes a peft_cpl Support, got {type(support).__name__}")
        rows_elsewhere = support.rows is not None and support.output_dim != self.output_dim
        if support.shape != tuple(self.delta_shape) or rows_elsewhere:
            raise ValueError(
                f"support for a weight of shape {support.shape} (output dim {support.output_dim}); this layer's "
                f"weight is {tuple(self.delta_shape)} (output dim {self.output_dim})"
            )
        old = self.cpl_values[adapter_name]
        device = self._base_device()
        if values is None:
            values = torch.zeros(support.size, dtype=old.dtype, device=device)
        elif values.numel() != support.size:
            raise ValueError(f"got {values.numel()} values for {support.size} support coordinates")
        flat = self.flat_support or self.cpl_index_storage[adapter_name] == "int32"
        self._keep(adapter_name, P.pack(support.to(device), form=P.FLAT if flat else None))
        self.cpl_values[adapter_name] = nn.Parameter(values.to(device=device, dtype=old.dtype).reshape(-1))
        self.cpl_values[adapter_name].requires_grad_(old.requires_grad)
        if adapter_name in self.cpl_mastered_sign:
            del self.cpl_mastered_sign[adapter_name]  # belonged to the previous support
        self.cpl_ready[adapter_name] = True

    def _keep(self, adapter_name: str, packed: PackedSupport) -> None:
        self.cpl_indices[adapter_name] = packed.codes
        self.cpl_index_starts[adapter_name] = packed.starts
        self.cpl_index_form[adapter_name] = packed.form

    def packed_support(self, adapter_name: str) -> PackedSupport:
        """The adapter's support in the compact form this layer keeps (what the delta math takes)."""
        return PackedSupport(
            self.cpl_index_form[adapter_name], self.cpl_indices[adapter_name], self.cpl_index_starts[adapter_name],
            tuple(self.delta_shape), self.output_dim,
        )

    def support(self, adapter_name: str) -> Support:
        """The adapter's support on this layer, as the value selection made and the adapter file stores."""
        return P.to_support(self.packed_support(adapter_name))

    def add_delta_into(self, dense: torch.Tensor, adapter_name: str, alpha: float = 1.0) -> torch.Tensor:
        """dense += alpha * this adapter's delta (dense shaped like the weight as stored)."""
        return P.add_into(dense, self.packed_support(adapter_name), self.cpl_values[adapter_name], alpha)

    def set_mastered_sign(self, adapter_name: str, mastered_gradient: torch.Tensor) -> None:
        """Keep sign(g_M) at the support coordinates (1 byte each): all the guard needs of g_M."""
        if mastered_gradient.numel() != self.cpl_values[adapter_name].numel():
            raise ValueError("one mastered-gradient entry per support coordinate is needed")
        sign = torch.sign(mastered_gradient.detach()).to(device=self._base_device(), dtype=torch.int8)
        self.cpl_mastered_sign[adapter_name] = sign

    def get_base_weight(self) -> torch.Tensor:
        """The base weight in float (dequantized for 8-bit / 4-bit bases, whatever layout bitsandbytes chose)."""
        bnb.ensure_canonical_layout(self.get_base_layer())
        return super().get_base_weight()

    def set_base_weight(self, weight_data: torch.Tensor) -> None:
        bnb.ensure_canonical_layout(self.get_base_layer())
        super().set_base_weight(weight_data)

    def _base_device(self) -> torch.device:
        weight = self.get_base_layer().weight
        return weight.device

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move to the base layer's device but keep the values' own dtype (`delta_dtype`), unlike PEFT's default."""
        device = device or self._base_device()
        if device.type == "meta":
            return
        for container in (self.cpl_values, self.cpl_indices, self.cpl_index_starts, self.cpl_mastered_sign):
            if adapter_name not in container:  # BufferDict has no .get()
                continue
            tensor = container[adapter_name]
            if tensor.device != device and tensor.device.type != "meta":
                if isinstance(tensor, nn.Parameter):
                    container[adapter_name] = nn.Parameter(tensor.data.to(device), requires_grad=tensor.requires_grad)
                else:
                    container[adapter_name] = tensor.to(device)

    # -- delta ------------------------------------------------------------------------------------------------
    def _delta_applies(self) -> bool:
        """False when the base layer alone gives the output: adapters disabled (unmerging first) or merged."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return False
        return not self.merged

    def _active_deltas(self) -> list[str]:
        """Active adapters that contribute a delta; refuses to train an adapter whose support was never chosen."""
        names = []
        for name in self.active_adapters:
            if name not in self.cpl_values:
                continue
            values = self.cpl_values[name]
            if not self.cpl_ready[name] and values.requires_grad and self.training and torch.is_grad_enabled():
                raise RuntimeError(
                    f"CPL adapter '{name}' has no support yet (support='collaborative'): run "
                    "peft_cpl.select_collaborative(model, mastered, injection) before training, or create the adapter "
                    "with support='random', 'magnitude' or 'dense'."
                )
            if values.numel():
                names.append(name)
        return names

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense delta of one adapter, shaped like the base weight as stored, in float32."""
        values = self.cpl_values[adapter_name].detach()
        return SF.scatter_delta([self.packed_support(adapter_name)], [values], dtype=torch.float32)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas into the base weight (dequantize, add, requantize for quantized bases)."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.cpl_values:
                self._apply_delta(name, sign=1.0, safe=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.cpl_values:
                self._apply_delta(name, sign=-1.0, safe=False)

    def _apply_delta(self, adapter_name: str, sign: float, safe: bool) -> None:
        values = self.cpl_values[adapter_name].detach()
        if not values.numel():
            return
        if safe and not torch.isfinite(values).all():
            raise ValueError(
                f"NaNs or infs in the values of CPL adapter '{adapter_name}'; refusing to merge it (safe_merge)."
            )
        weight = self.get_base_weight()
        in_place = self.quantization_backend is None
        target = weight if in_place else weight.clone()
        self.add_delta_into(target, adapter_name, alpha=sign)
        if not in_place:
            self.set_base_weight(target)


class Linear(nn.Module, CPLLayer):
    """CPL on `nn.Linear`, transformers `Conv1D` (weight stored transposed) and bitsandbytes 8/4-bit linears."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: CPLConfig, module_name: str = "", **kwargs):
        super().__init__()
        CPLLayer.__init__(self, base_layer, **kwargs)
        base = self.get_base_layer()
        self.transposed = isinstance(base, Conv1D)
        if self.transposed:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name, inference_mode=config.inference_mode)

    @property
    def delta_shape(self) -> tuple[int, int]:
        if self.transposed:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def output_dim(self) -> int:
        return 1 if self.transposed else 0

    def _apply(self, fn, recurse: bool = True):
        # bitsandbytes' `.to()` moves a CPU-repacked 4-bit weight as it is (only `.cuda()` undoes the repacking).
        bnb.ensure_canonical_layout(self.get_base_layer())
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        bnb.ensure_canonical_layout(self.get_base_layer())  # the CPU-packed 4-bit layout has no backward
        if not self._delta_applies():
            return self.base_layer(x, *args, **kwargs)
        names = self._active_deltas()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        supports = [self.packed_support(name) for name in names]
        values = [self.cpl_values[name] for name in names]
        if all(support.form == P.ROWS for support in supports):
            result = self.base_layer(x, *args, **kwargs)
            for support, delta_values in zip(supports, values):
                delta = SF.row_delta_linear(x, support.codes, delta_values, self.out_features, self.transposed)
                result = result + delta.to(result.dtype)
            return result
        # One GEMM in every precision: the delta is folded into the (dequantized) weight in the compute dtype.
        base = self.get_base_layer()
        weight = base.weight if self.quantization_backend is None else self._dequantized_base_weight
        return SF.sparse_delta_linear(x, weight, base.bias, supports, values, self.transposed)

    def _dequantized_base_weight(self) -> torch.Tensor:
        return bnb.dequantized_weight(self.get_base_layer())

    def __repr__(self) -> str:
        return "cpl." + super().__repr__()


class Embedding(nn.Module, CPLLayer):
    """CPL on `nn.Embedding`: the delta is looked up only for the rows present in the batch."""

    flat_support = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: CPLConfig, module_name: str = "", **kwargs):
        super().__init__()
        CPLLayer.__init__(self, base_layer, **kwargs)
        base = self.get_base_layer()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name, inference_mode=config.inference_mode)

    @property
    def delta_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._delta_applies():
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        embed_scale = self._get_embed_scale()  # scaled embeddings (e.g. Gemma) scale the merged weight too
        for name in self._active_deltas():
            delta = SF.sparse_delta_embedding(x, self.packed_support(name), self.cpl_values[name])
            if embed_scale is not None:
                delta = delta * embed_scale.to(delta.dtype)
            result = result + delta.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "cpl." + super().__repr__()
