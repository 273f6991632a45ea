"""How much memory CPL training needs, before buying or renting the GPU: `estimate_memory`.

Train-state bytes (trained values, their gradients, optimizer state, support indices, guard signs) are counted
exactly the way torch and bitsandbytes allocate them: `measure_train_state` sums the real tensors, and the tests
hold the two equal. Base weights follow the storage's layout (bitsandbytes int8 row scales, nf4 block absmax).
Activations are an estimate: the tensors autograd saves in a Llama-style block (SDPA attention, gated MLP), the
logits and their fp32 loss, or one layer's worth plus each layer's input under gradient checkpointing.
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from ..tuner import packed as P
from ..tuner.adapters import cpl_layers
from ..tuner.support import index_dtype

BASE_STORAGES = ("fp32", "bf16", "int8", "nf4")
ESTIMATED_OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
_COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "int8": 2, "nf4": 2}  # quantized bases keep the rest and compute in bf16
_NF4_BLOCK = 64
_BNB_STATE_BLOCK, _BNB_MIN_8BIT_SIZE, _BNB_QMAP_BYTES = 256, 4096, 2 * 256 * 4


@dataclass
class MemoryEstimate:
    """Bytes of each part of a CPL training run."""

    base_weights: int
    trained_values: int
    gradients: int
    optimizer_state: int
    index: int
    guard: int
    temporaries: int  # effective weight and dense weight gradient of one layer, the guard's copy (DDP: its buckets)
    step_temporaries: int  # the optimizer's at its step: torch's foreach AdamW, one tensor per trained value
    activations: int
    selection_peak: int  # selection on the accelerator, g_M kept on the CPU meanwhile (a separate phase)
    trained: int  # number of trained values
    targeted: int  # number of coordinates of the targeted weights

    @property
    def train_state(self) -> int:
        return self.trained_values + self.gradients + self.optimizer_state + self.index + self.guard

    @property
    def peak(self) -> int:
        """Activations and gradients are not all alive at once: backward frees the one as it builds the other, so
        their sum peaks at one end of it (activations when it starts, gradients and the step's temporaries when
        it ends)."""
        resident = self.base_weights + self.train_state - self.gradients + self.temporaries
        return resident + max(self.activations, self.gradients + self.step_temporaries)

    @property
    def bytes_per_trained_value(self) -> float:
        return self.train_state / self.trained if self.trained else 0.0

    def fits(self, gib: float, selection: bool = True) -> bool:
        """Training fits in `gib`; with `selection`, selection (with its accumulators on the GPU) does too.

        `select_collaborative(..., accumulate_on="cpu")` keeps the accumulators in host memory instead, leaving
        one module's temporaries on the GPU.
        """
        needed = max(self.peak, self.base_weights + self.selection_peak) if selection else self.peak
        return needed <= gib * 2**30

    def table(self) -> str:
        rows = [(f.name, getattr(self, f.name)) for f in fields(self) if f.name not in ("trained", "targeted")]
        lines = [f"{'part':<16} {'GiB':>9}"] + [f"{name:<16} {value / 2**30:>9.3f}" for name, value in rows]
        lines.append(f"{'training peak':<16} {self.peak / 2**30:>9.3f}")
        lines.append(f"{self.trained:,} trained values of {self.targeted:,} targeted coordinates: "
                     f"{self.bytes_per_trained_value:.2f} B of train state per trained value")
        return "\n".join(lines)


def estimate_memory(
    model_or_config: nn.Module | Any,
    *,
    density: float = 0.6,
    optimizer: str = "adamw",
    base: str = "bf16",
    fused: bool = False,
    guard: bool = False,
    batch_size: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = False,
    target_modules: str | list[str] = "all-linear",
    granularity: str = "element",
) -> MemoryEstimate:
    """Memory of CPL training at `density` of every targeted weight.

    `model_or_config` is a model with CPL adapters (the real sizes of the supports it has are used, and `density`
    for the rest), a plain model, or a transformers config (built on the meta device, so any size costs nothing).
    """
    if base not in BASE_STORAGES:
        raise ValueError(f"base must be one of {BASE_STORAGES}, got {base!r}")
    if optimizer not in ESTIMATED_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {ESTIMATED_OPTIMIZERS}, got {optimizer!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    model = _cpl_model(model_or_config, target_modules)
    layers = list(cpl_layers(model).values())
    shapes = [tuple(layer.delta_shape) for layer in layers]
    sizes = [_support_size(layer, density, granularity) for layer in layers]
    trained = sum(sizes)
    value_bytes = _value_bytes(layers)
    compute = _COMPUTE_BYTES[base]
    largest = max(sizes, default=0)
    gradients = (largest if fused else trained) * value_bytes
    state = _optimizer_bytes(sizes, value_bytes, optimizer, fused)
    index = sum(_index_bytes(layer, size, granularity) for layer, size in zip(layers, sizes))
    biggest_weight = max((math.prod(shape) for shape in shapes), default=0)
    # one layer at a time: its effective weight (compute dtype) and dense weight gradient (fp32), its support
    # expanded to int64 positions (compact forms) with the unpacked bits, and with the guard a copy of the values
    expanded = 8 * max((size for size, layer in zip(sizes, layers) if not layer.flat_support), default=0)
    temporaries = biggest_weight * (compute + 4 + 2) + expanded
    temporaries += ((largest if fused else trained) * value_bytes) if guard else 0
    signs = trained if guard or any(layer.cpl_mastered_sign for layer in layers) else 0  # selection leaves them
    return MemoryEstimate(
        base_weights=_base_bytes(model, base),
        trained_values=trained * value_bytes,
        gradients=gradients,
        optimizer_state=state,
        index=index,
        guard=signs,
        temporaries=temporaries,
        step_temporaries=(largest if fused else trained) * value_bytes if optimizer == "adamw" else 0,
        activations=_activation_bytes(model.config, batch_size, seq_len, compute, gradient_checkpointing),
        # g_I's accumulators, plus one module's g_M (brought back from the CPU), s, eligibility and scores
        selection_peak=4 * sum(math.prod(shape) for shape in shapes) + 13 * biggest_weight,
        trained=trained,
        targeted=sum(math.prod(shape) for shape in shapes),
    )


def measure_train_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the tensors training keeps for CPL, summed from the tensors themselves (shared storages once)."""
    seen: set[int] = set()

    def size(tensors) -> int:
        return _storage_bytes(tensors, seen)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizers = list(getattr(optimizer, "inner", {None: optimizer}).values())
    layers = list(cpl_layers(model).values())
    return {
        "trained_values": size(trainable),
        "gradients": size(p.grad for p in trainable),
        "optimizer_state": size(t for opt in optimizers for state in opt.state.values() for t in state.values()),
        "index": size(t for layer in layers for kept in (layer.cpl_indices, layer.cpl_index_starts)
                      for t in kept.values()),
        "guard": size(t for layer in layers for t in layer.cpl_mastered_sign.values()),
    }


def live_tensor_bytes() -> int:
    """Bytes of every tensor Python can reach, shared storages once: what stays alive between training steps."""
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    return _storage_bytes((tensor for tensor in tensors if not tensor.is_meta), set())


def _storage_bytes(tensors, seen: set[int]) -> int:
    """Bytes of the storages of `tensors` (non-tensors skipped) not in `seen`, each once; adds them to `seen`."""
    total = 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and (pointer := tensor.untyped_storage().data_ptr()) not in seen:
            seen.add(pointer)
            total += tensor.untyped_storage().nbytes()
    return total


def measure_step_peak(step: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak bytes of the process's live tensors while `step()` runs: what `estimate_memory(...).peak` predicts, plus
    whatever else the process keeps alive (subtract `live_tensor_bytes()` taken before the model was built).

    On CUDA, torch.cuda.max_memory_allocated. On the CPU, where peak RSS also counts what the C heap keeps after a
    free, the tensors alive before the step plus the running sum of the allocations and frees torch's profiler
    records during it. Memory allocated outside torch (numpy, which expands compact supports on the CPU one layer
    at a time) is not seen.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile

    before = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = top = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        top = max(top, running)
    return before + top


def cpl_model_on_meta(config: Any, target_modules: str | list[str] = "all-linear") -> nn.Module:
    """The model of `config` on the meta device with an (empty) CPL adapter: what PEFT would target, for free."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ..tuner.config import CPLConfig

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    return get_peft_model(base, CPLConfig(target_modules=target_modules))  # the real targeting rule


def _cpl_model(model_or_config: Any, target_modules: str | list[str]) -> nn.Module:
    if isinstance(model_or_config, nn.Module) and cpl_layers(model_or_config):
        return model_or_config
    config = getattr(model_or_config, "config", model_or_config)  # a plain model is never modified: its config is
    if not hasattr(config, "hidden_size"):
        raise ValueError(
            f"estimate_memory needs a model with CPL adapters, a transformers model or its config; got "
            f"{type(model_or_config).__name__}"
        )
    return cpl_model_on_meta(config, target_modules)


def _adapter(layer: nn.Module) -> str | None:
    """The layer's adapter whose support exists (selected, loaded or data-free), if any."""
    return next((name for name, ready in layer.cpl_ready.items() if ready), None)


def _support_size(layer: nn.Module, density: float, granularity: str) -> int:
    chosen = _adapter(layer)
    if chosen is not None:
        return layer.cpl_values[chosen].numel()  # the real size, 0 included
    rows, row_length = layer.delta_shape[layer.output_dim], layer.delta_shape[1 - layer.output_dim]
    if granularity == "row":
        return max(1, round(density * rows)) * row_length
    return max(1, round(density * rows * row_length))


def _index_bytes(layer: nn.Module, size: int, granularity: str) -> int:
    """Bytes of the support in the form the layer keeps (packed.py), or would choose for `size` coordinates."""
    chosen = _adapter(layer)
    if chosen is not None:
        form = layer.cpl_index_form[chosen]
    elif granularity == "row":
        form = P.ROWS
    else:  # not chosen yet: the form the layer's storage setting will give
        storages = list(layer.cpl_index_storage.values())
        form = P.FLAT if layer.flat_support or (storages and storages[0] == "int32") else None
    numel = math.prod(layer.delta_shape)
    if form == P.ROWS:
        return 8 * size // layer.delta_shape[1 - layer.output_dim]
    if form == P.FLAT:
        return size * index_dtype(numel).itemsize
    return P.packed_bytes(size, numel)[P.default_form(size, numel)]


def _value_bytes(layers: list[nn.Module]) -> int:
    for layer in layers:
        for values in layer.cpl_values.values():
            return values.element_size()
    return 4


def _optimizer_bytes(sizes: list[int], value_bytes: int, optimizer: str, fused: bool) -> int:
    if optimizer == "sgd":
        return 0
    sizes = [size for size in sizes if size]  # an empty values tensor gets no gradient, so no state
    if optimizer == "adamw":
        return sum(2 * size * value_bytes + 4 for size in sizes)  # exp_avg, exp_avg_sq and a float32 step per tensor
    total, shared_qmaps = 0, False
    for size in sizes:  # bitsandbytes keeps tensors under min_8bit_size in 32 bits
        if size < _BNB_MIN_8BIT_SIZE:
            total += 2 * size * 4
        else:
            total += 2 * size + 2 * 4 * math.ceil(size / _BNB_STATE_BLOCK)
            if fused or not shared_qmaps:
                total += _BNB_QMAP_BYTES  # one pair of quantization maps per optimizer instance
                shared_qmaps = True
    return total


def _base_bytes(model: nn.Module, base: str) -> int:
    """Every base parameter once (tied ones too); quantized bases store every linear but the output head quantized,
    as transformers' bitsandbytes integration does."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantized = {
        id(module.weight) for module in model.modules()
        if isinstance(module, nn.Linear) and module is not head
    }
    total, seen = 0, set()
    for name, param in model.named_parameters():
        if id(param) in seen or ".cpl_values." in name:
            continue
        seen.add(id(param))
        if id(param) in quantized and base == "int8":
            total += param.numel() + 4 * param.shape[0]  # int8 codes and an fp32 scale per row
        elif id(param) in quantized and base == "nf4":
            total += param.numel() // 2 + 4 * math.ceil(param.numel() / _NF4_BLOCK)  # 4-bit codes, fp32 absmax
        else:
            total += param.numel() * _COMPUTE_BYTES[base]
    return total


def _activation_bytes(config: Any, batch: int, seq: int, compute: int, checkpointing: bool) -> int:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv = hidden * getattr(config, "num_key_value_heads", heads) // heads
    ffn = getattr(config, "intermediate_size", 4 * hidden)
    tokens = batch * seq
    # saved per token and layer: norm inputs and outputs (plus their fp32 copies), q, k, v, attention output and its
    # projection input, gate, up, activation and product of the gated MLP
    per_layer = tokens * ((7 * hidden + 2 * kv + 4 * ffn) * compute + 2 * hidden * 4)
    layers = config.num_hidden_layers
    blocks = tokens * hidden * compute * layers + per_layer if checkpointing else per_layer * layers
    logits = tokens * config.vocab_size * (compute + 4 + 4)  # logits, their fp32 upcast for the loss, its gradient
    return blocks + logits


SHARDINGS = ("ddp", "fsdp2")


def per_rank(estimate: MemoryEstimate, processes: int, sharding: str = "ddp", *, units: int = 1,
             fused: bool = False) -> MemoryEstimate:
    """The memory of one of `processes` ranks, from one process's `estimate` (README, "More than one process").

    "ddp": each rank holds what one process holds, plus DDP's gradient buckets, a second fp32 copy of the trained
    values' gradients kept for the whole run (none with `fused`: the fused step all-reduces each gradient itself,
    without DDP).
    "fsdp2": `fully_shard` splits base weights, values, gradients and optimizer state over the ranks; the support
    indices and sign(g_M) are buffers, kept whole on every rank; and the parameters of two of the `units` sharded
    modules (e.g. decoder layers: the one computed and the one prefetched) are gathered whole at a time. Selection
    runs before sharding, so its peak is that of one process on every rank, in both cases.
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    if processes < 1 or units < 1:
        raise ValueError("processes and units must be at least 1")
    if sharding == "ddp":
        extra = 0 if fused else estimate.trained_values  # fp32 buckets: one gradient per trained value
        return replace(estimate, temporaries=estimate.temporaries + extra)
    gathered = 2 * (estimate.base_weights + estimate.trained_values) // units if processes > 1 else 0
    return replace(
        estimate,
        base_weights=math.ceil(estimate.base_weights / processes),
        trained_values=math.ceil(estimate.trained_values / processes),
        gradients=math.ceil(estimate.gradients / processes),
        optimizer_state=math.ceil(estimate.optimizer_state / processes),
        step_temporaries=math.ceil(estimate.step_temporaries / processes),
        temporaries=estimate.temporaries + gathered,
    )
