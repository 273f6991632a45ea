"""CUDA checks: skipped without a GPU (CI has none); `make gpu-check` runs them where one is lent."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_cpl import CPLConfig, cpl_layers, select_collaborative
from peft_cpl.toolkit.tiny import tiny_llama

from .conftest import CASES
from .test_selection import batched, examples

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_selection_holds_at_most_4_25_bytes_per_targeted_coordinate_on_the_gpu():
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
    # what stays: values (4 B), indices (4 B) and sign(g_M) (1 B) per support coordinate; the rest is transient
    transient = extra - 9 * support
    assert transient <= 4.25 * targeted + 64 * 2**20, (transient / targeted)


@pytest.mark.parametrize("form", ["bitmask", "blocked", "flat"])
def test_packed_supports_on_cuda_match_the_cpu(form):
    from peft_cpl.tuner import functional as SF
    from peft_cpl.tuner import packed as P
    from peft_cpl.tuner.support import Support

    torch.manual_seed(0)
    weight, x = torch.randn(96, 80), torch.randn(4, 7, 80)
    indices = torch.sort(torch.randperm(96 * 80)[:900]).values
    results = []
    for device in ("cpu", "cuda"):
        support = P.pack(Support.of_indices(indices, (96, 80)).to(device), form=form)
        values = torch.linspace(-1, 1, indices.numel(), device=device, requires_grad=True)
        inputs = x.to(device).requires_grad_(True)
        out = SF.sparse_delta_linear(inputs, weight.to(device), None, [support], [values])
        out.square().sum().backward()
        results.append([t.detach().cpu() for t in (out, inputs.grad, values.grad)])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4)
