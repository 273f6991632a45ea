"""One GEMM in every precision: the folded layer against a dense reference and against the additive path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_cpl import CPLConfig, cpl_layers
from peft_cpl.toolkit.tiny import tiny_llama
from peft_cpl.tuner import functional as SF
from peft_cpl.tuner.bnb import dequantized_weight

from .conftest import randomize_values

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def layer_of(model, suffix: str = "layers.0.mlp.down_proj"):
    return next(layer for name, layer in cpl_layers(model).items() if name.endswith(suffix))


def check_against_references(layer, dtype: torch.dtype, base_weight: torch.Tensor, device: str = "cpu") -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 5, layer.in_features, dtype=dtype, device=device, requires_grad=True)
    values = layer.cpl_values["default"]
    out = layer(x)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    # dense reference: W + delta summed in fp32 and rounded once to the compute dtype, as a leaf of plain autograd
    effective = (base_weight.float() + layer.get_delta_weight("default")).to(dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias = layer.get_base_layer().bias
    ref = F.linear(x_ref, effective, None if bias is None else bias.to(dtype))
    (ref * grad_out).sum().backward()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    support = layer.support("default").indices
    expected = effective.grad.float().reshape(-1)[support]
    torch.testing.assert_close(values.grad, expected, rtol=tol, atol=tol * float(expected.abs().max()))
    # the additive path of 0.1.0 (base output + the delta's own GEMM) agrees up to the compute dtype's rounding
    with torch.no_grad():
        additive = F.linear(x, base_weight.to(dtype), None if bias is None else bias.to(dtype))
        additive = additive + SF.sparse_delta_linear(x, None, None, [layer.packed_support("default")], [values])
    scale = float(additive.abs().max())
    torch.testing.assert_close(out.detach(), additive.to(dtype), rtol=0, atol=4 * tol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("storage", ["compact", "int32"])
def test_float_bases_fold_the_delta_into_one_gemm(dtype, storage):
    model = get_peft_model(tiny_llama(0).to(dtype), CPLConfig(target_modules=["down_proj"], support="random",
                                                              density=0.3, index_storage=storage))
    randomize_values(model, scale=0.05)
    layer = layer_of(model)
    check_against_references(layer, dtype, layer.get_base_layer().weight.detach())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_bases_fold_the_dequantized_weight(bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(0).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    model = get_peft_model(base, CPLConfig(target_modules=["down_proj"], support="random", density=0.3))
    randomize_values(model, scale=0.05)
    layer = layer_of(model)
    check_against_references(layer, torch.float32, dequantized_weight(layer.get_base_layer()).detach())
