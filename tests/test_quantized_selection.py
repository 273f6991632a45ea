"""Selection on a bitsandbytes 8-bit base matches selection on the same weights dequantized to float."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_cpl import CPLConfig, select_collaborative
from peft_cpl.gradients import mean_weight_gradients

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
    results = []
    for base in (quantized, dense):
        model = get_peft_model(base, CPLConfig(target_modules=TARGETS))
        layers = cpl_layers(model)
        g_m, _ = mean_weight_gradients(model, layers, mastered, progress=False)
        select_collaborative(model, mastered, injection, progress=False)
        results.append((g_m, {name: layer.cpl_indices["default"].long() for name, layer in layers.items()}))
        model.unload()
    (g_q, support_q), (g_d, support_d) = results
    for name in g_q:
        cosine = torch.nn.functional.cosine_similarity(g_q[name].reshape(-1), g_d[name].reshape(-1), dim=0)
        assert cosine > 0.999, (name, float(cosine))
        chosen_q = torch.zeros(g_q[name].numel(), dtype=torch.bool)
        chosen_d = torch.zeros_like(chosen_q)
        chosen_q[support_q[name]] = True
        chosen_d[support_d[name]] = True
        jaccard = (chosen_q & chosen_d).sum() / (chosen_q | chosen_d).sum()
        # coordinates with s near 0 flip with int8 activation rounding; the rest agree
        assert jaccard > 0.95, (name, float(jaccard))
