"""CUDA checks: skipped without a GPU (CI has none); `make gpu-check` runs them where one is lent.

PEFT_CPL_CUDA_TESTS_ON_CPU=1 runs the same tests on the CPU, to check the tests themselves on a machine without one.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_cpl import CPLConfig, cpl_layers, select_collaborative
from peft_cpl.toolkit.tiny import tiny_llama
from peft_cpl.tuner import functional as SF
from peft_cpl.tuner import packed as P
from peft_cpl.tuner.support import Support

from .conftest import CASES, randomize_values
from .test_precision import check_against_references
from .test_selection import batched, examples

ON_CPU = os.environ.get("PEFT_CPL_CUDA_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (ON_CPU or torch.cuda.is_available()), reason="needs a CUDA GPU"),
]


def test_selection_holds_at_most_4_25_bytes_per_targeted_coordinate_on_the_gpu():
    if ON_CPU:
        pytest.skip("measures the CUDA allocator")
    model = tiny_llama(0, hidden_size=512, intermediate_size=1536, num_hidden_layers=4).cuda()
    peft_model = get_peft_model(model, CPLConfig(target_modules="all-linear"))
    targeted = sum(layer.get_base_layer().weight.numel() for layer in cpl_layers(peft_model).values())
    case = CASES["llama"]
    mastered, injection = batched(examples(case, 8, 1), 4), batched(examples(case, 8, 2), 4)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    select_collaborative(peft_model, mastered, injection, progress=False)
    extra = torch.cuda.max_memory_allocated() - baseline
    support = sum(layer.cpl_values["default"].numel() for layer in cpl_layers(peft_model).values())
    # what stays: values (4 B), the compact index (< 1 B) and sign(g_M) (1 B) per support coordinate
    transient = extra - 6 * support
    assert transient <= 4.25 * targeted + 64 * 2**20, (transient / targeted)


@pytest.mark.parametrize("form", ["bitmask", "blocked", "flat"])
def test_packed_supports_match_the_cpu(form):
    torch.manual_seed(0)
    weight, x = torch.randn(96, 80), torch.randn(4, 7, 80)
    indices = torch.sort(torch.randperm(96 * 80)[:900]).values
    results = []
    for device in ("cpu", DEVICE):
        support = P.pack(Support.of_indices(indices, (96, 80)).to(device), form=form)
        values = torch.linspace(-1, 1, indices.numel(), device=device, requires_grad=True)
        inputs = x.to(device).requires_grad_(True)
        out = SF.sparse_delta_linear(inputs, weight.to(device), None, [support], [values])
        out.square().sum().backward()
        results.append([t.detach().cpu() for t in (out, inputs.grad, values.grad)])
    for cpu, other in zip(*results):
        torch.testing.assert_close(other, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["element", "row"])
def test_layer_math_against_the_dense_reference(dtype, granularity):
    config = CPLConfig(target_modules=["down_proj"], support="random", density=0.3, granularity=granularity)
    model = get_peft_model(tiny_llama(0).to(dtype).to(DEVICE), config)
    randomize_values(model, scale=0.05)
    layer = next(layer for name, layer in cpl_layers(model).items() if name.endswith("layers.0.mlp.down_proj"))
    if granularity == "element":
        check_against_references(layer, dtype, layer.get_base_layer().weight.detach(), device=DEVICE)
    else:  # rows: their own path, against the dense delta
        x = torch.randn(2, 3, layer.in_features, dtype=dtype, device=DEVICE)
        dense = (layer.get_base_layer().weight.float() + layer.get_delta_weight("default")).to(dtype)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, dense), rtol=tol, atol=tol)


def test_merge_unmerge_and_save_load_across_cpu_and_gpu(tmp_path):
    case = CASES["llama"]
    model = get_peft_model(case.build(0).to(DEVICE), CPLConfig(target_modules=case.targets, support="random",
                                                                density=0.2))
    randomize_values(model, scale=0.05)
    ids = case.inputs().to(DEVICE)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "adapter")
    on_cpu = PeftModel.from_pretrained(case.build(0), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(on_cpu(input_ids=ids.cpu()).logits, unmerged.cpu(), rtol=1e-4, atol=1e-4)
    back = on_cpu.to(DEVICE)
    assert all(t.device.type == DEVICE for layer in cpl_layers(back).values()
               for t in (layer.cpl_values["default"], layer.cpl_indices["default"]))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-4)


def test_selection_on_the_gpu_equals_selection_on_the_cpu():
    case = CASES["llama"]
    mastered, injection = batched(examples(case, 8, 3), 4), batched(examples(case, 8, 4), 4)
    supports = []
    for device in ("cpu", DEVICE):
        model = get_peft_model(case.build(0).to(device), CPLConfig(target_modules=case.targets))
        select_collaborative(model, mastered, injection, progress=False)
        supports.append({name: layer.support("default").indices.cpu() for name, layer in cpl_layers(model).items()})
    for name, indices in supports[0].items():
        chosen = torch.zeros(int(max(indices.max(), supports[1][name].max())) + 1, dtype=torch.bool)
        other = torch.zeros_like(chosen)
        chosen[indices], other[supports[1][name]] = True, True
        assert (chosen & other).sum() / (chosen | other).sum() > 0.99, name  # s near 0 may flip with summation order
