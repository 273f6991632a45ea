"""Selection on a bitsandbytes 8-bit base matches selection on the same weights dequantized to float."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_cpl import CPLConfig, select_collaborative
from peft_cpl.tuner.gradients import mean_weight_gradients

from .conftest import CASES, cpl_layers, tiny_llama
from .test_selection import batched, examples

bnb = pytest.importorskip("bitsandbytes")
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(8-bit model, float model holding exactly the dequantized int8 weights)."""
    from peft.utils.integrations import dequantize_bnb_weight
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(seed=0).save_pretrained(path)
    quantized = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    dense = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear8bitLt):
                dequantized = dequantize_bnb_weight(module.weight, state=module.state)
                dense.get_submodule(name).weight.copy_(dequantized.float())
    return quantized.eval(), dense.eval()


def test_gradients_and_support_match_the_dequantized_twin(twins):
    quantized, dense = twins
    case = CASES["llama"]
    mastered, injection = batched(examples(case, 8, 11), 4), batched(examples(case, 8, 12), 4)
    # coordinates with s near 0 flip with int8 activation rounding; the rest agree
    assert_same_selection(*(gradients_and_supports(base, mastered, injection) for base in (quantized, dense)))


def gradients_and_supports(base, mastered, injection) -> tuple[dict, dict]:
    model = get_peft_model(base, CPLConfig(target_modules=TARGETS))
    layers = cpl_layers(model)
    g_m, _ = mean_weight_gradients(model, layers, mastered, progress=False)
    select_collaborative(model, mastered, injection, progress=False)
    supports = {name: layer.support("default").indices for name, layer in layers.items()}
    model.unload()
    return g_m, supports


def assert_same_selection(first: tuple[dict, dict], second: tuple[dict, dict]) -> None:
    """g_M nearly parallel and supports overlapping by > 95% (Jaccard), module by module."""
    (g_a, support_a), (g_b, support_b) = first, second
    for name in g_a:
        cosine = torch.nn.functional.cosine_similarity(g_a[name].reshape(-1), g_b[name].reshape(-1), dim=0)
        assert cosine > 0.999, (name, float(cosine))
        chosen_a = torch.zeros(g_a[name].numel(), dtype=torch.bool)
        chosen_b = torch.zeros_like(chosen_a)
        chosen_a[support_a[name]] = True
        chosen_b[support_b[name]] = True
        jaccard = (chosen_a & chosen_b).sum() / (chosen_a | chosen_b).sum()
        assert jaccard > 0.95, (name, float(jaccard))


def test_selection_on_a_4bit_base_that_bitsandbytes_repacked_for_its_cpu_kernel(tmp_path):
    """An eval forward on an AVX512-BF16 CPU repacks 4-bit weights; selection must see the weights they mean."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(seed=0).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    case = CASES["llama"]
    mastered, injection = batched(examples(case, 8, 11), 4), batched(examples(case, 8, 12), 4)
    results = []
    for packed in (False, True):
        base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config).eval()
        if packed:  # what bitsandbytes does by itself on such a CPU, forced here on any machine
            for module in base.modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(
                        module.weight.data, module.weight.quant_state
                    )
        results.append(gradients_and_supports(base, mastered, injection))
    assert_same_selection(*results)  # equal up to bitsandbytes' bf16 rounding of absmax in its round trip
