"""bitsandbytes weights as CPL reads them, whatever layout bitsandbytes chose on this machine.

bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a `Linear4bit` weight in place on its first eval-mode forward
without grad: [N*K/2, 1] becomes [N, K/2], absmax becomes bf16, `quant_state.packing_format_for_cpu = True`. That
layout serves one inference kernel only. Every reader of the weight (`dequantize_4bit`, PEFT's quantization backend,
requantization) reads garbage from it, `bnb.matmul_4bit` takes a path without a backward through it, and it computes
in bf16 whatever the compute dtype. bitsandbytes undoes it itself only before `state_dict`, `.cuda()` and `.xpu()`.

CPL therefore keeps every 4-bit weight of a model it trains in the canonical layout: undone through bitsandbytes' own
inverse wherever it is found, and not redone, because the modules' own switch for it is turned off. Outputs, merges,
selection and training are then the same on every CPU. Nothing here imports bitsandbytes unless a 4-bit weight is
actually present.
"""

from __future__ import annotations

import torch
from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type
from torch import nn


def is_4bit(module: nn.Module) -> bool:
    return get_bnb_param_type(getattr(module, "weight", None)) == "4bit"


def is_packed_for_cpu(module: nn.Module) -> bool:
    """True when bitsandbytes repacked this 4-bit weight for its AVX512-BF16 CPU kernel."""
    quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def ensure_canonical_layout(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight in place (a no-op for any other module)."""
    if not is_packed_for_cpu(module):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # what bnb's own state_dict uses

    weight = module.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    state = weight.quant_state
    if not state.nested and state.absmax.dim() == 2:
        # bitsandbytes 0.50.2 restores absmax only for double-quantized states; without double quantization (the
        # transformers default) it stays transposed as [K / blocksize, N] in bf16, and every weight with more than
        # one block per row dequantizes wrong. Undo the transpose here; the bf16 rounding of absmax is bnb's own.
        state.absmax = state.absmax.T.reshape(-1).to(torch.float32).contiguous()
    if getattr(module, "quant_state", None) is not None:
        module.quant_state = weight.quant_state


def keep_canonical_layout(model: nn.Module) -> int:
    """Put every 4-bit weight of `model` in the canonical layout and stop bitsandbytes from repacking it.

    Returns the number of 4-bit modules seen. Costs bitsandbytes' bf16 CPU inference kernel on AVX512-BF16 machines;
    buys gradients through every 4-bit layer and the same numbers on every CPU.
    """
    count = 0
    for module in model.modules():
        if is_4bit(module):
            ensure_canonical_layout(module)
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """Float weight of a bitsandbytes 8-bit or 4-bit linear, in either layout."""
    ensure_canonical_layout(module)
    state = getattr(module, "state", None)  # 8-bit: row scales live in weight.SCB or state.SCB
    if state is not None and state.SCB is None:
        state.SCB = module.weight.SCB
    return dequantize_bnb_weight(module.weight, state=state if state is not None else module.weight.quant_state)
