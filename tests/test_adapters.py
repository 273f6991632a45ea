"""Supports as one value (rows kept, never re-detected), and the adapter helpers every module shares."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_cpl import (
    CPLConfig,
    Support,
    cpl_layers,
    export_support,
    resolve_adapter,
    restore_support,
    select_collaborative,
)
from peft_cpl.tuner import functional as SF

from .conftest import CASES, randomize_values
from .test_selection import batched, examples


@pytest.mark.parametrize("case_name", ["llama", "gpt2"])
def test_row_supports_take_the_row_path_on_linear_and_conv1d_and_match_the_dense_delta(case_name, tmp_path):
    case = CASES[case_name]
    model = get_peft_model(case.build(0), CPLConfig(target_modules=case.targets, support="random", density=0.25,
                                                     granularity="row"))
    randomize_values(model, scale=0.05)
    linears = {name: layer for name, layer in cpl_layers(model).items() if hasattr(layer, "transposed")}
    assert any(layer.transposed for layer in linears.values()) == (case_name == "gpt2")
    inputs = case.inputs(seed=1)
    for layer in linears.values():
        support = layer.support("default")
        assert support.granularity == "row" and support.output_dim == layer.output_dim
        assert layer.cpl_index_form["default"] == "rows"  # the row path, Conv1D included
        x = torch.randn(3, 5, layer.in_features, requires_grad=True)
        dense = layer.get_delta_weight("default")
        expected = x @ dense if layer.transposed else x @ dense.T
        got = SF.row_delta_linear(x, support.rows, layer.cpl_values["default"], layer.out_features, layer.transposed)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    expected_logits = case.loss(model, inputs).detach()
    model.save_pretrained(tmp_path / "rows")
    loaded = PeftModel.from_pretrained(case.build(0), tmp_path / "rows")
    for name, layer in cpl_layers(loaded).items():
        original = cpl_layers(model)[name].support("default")
        assert torch.equal(layer.support("default").indices, original.indices)
        if original.rows is not None:
            assert torch.equal(layer.support("default").rows, original.rows)  # read from the file, not guessed
    torch.testing.assert_close(case.loss(loaded, inputs), expected_logits)


def test_an_element_support_that_happens_to_be_whole_rows_stays_an_element_support():
    model = get_peft_model(CASES["llama"].build(0), CPLConfig(target_modules=["q_proj"], support="dense"))
    layer = next(iter(cpl_layers(model).values()))
    rows = Support.of_rows(torch.tensor([1, 5]), layer.delta_shape)
    layer.set_support("default", Support.of_indices(rows.indices, layer.delta_shape))
    assert layer.support("default").rows is None and layer.cpl_index_form["default"] != "rows"
    layer.set_support("default", rows)
    assert torch.equal(layer.support("default").rows, torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="shape"):
        layer.set_support("default", Support.dense((3, 3)))
    with pytest.raises(TypeError, match="Support"):
        layer.set_support("default", torch.arange(4))


def test_export_and_restore_support_between_models_with_the_guard_signs():
    case = CASES["llama"]
    mastered, injection = batched(examples(case, 6, 3), 3), batched(examples(case, 6, 4), 3)
    model = get_peft_model(case.build(0), CPLConfig(target_modules=case.targets))
    select_collaborative(model, mastered, injection, progress=False)
    exported = export_support(model)
    assert exported.size == sum(layer.cpl_values["default"].numel() for layer in cpl_layers(model).values())
    assert set(exported.supports) == set(exported.mastered_signs)
    assert all(not name.startswith("base_model") for name in exported.supports)
    other = get_peft_model(case.build(0), CPLConfig(target_modules=case.targets))
    restore_support(other, exported)
    for name, layer in cpl_layers(other).items():
        source = cpl_layers(model)[name]
        assert torch.equal(layer.cpl_indices["default"], source.cpl_indices["default"])
        assert torch.equal(layer.cpl_mastered_sign["default"], source.cpl_mastered_sign["default"])
        assert not layer.cpl_values["default"].abs().sum()  # values restart at zero
    fewer = get_peft_model(case.build(0), CPLConfig(target_modules=case.targets[:1]))
    with pytest.raises(ValueError, match="does not fit"):
        restore_support(fewer, exported)


def test_resolve_adapter_has_one_rule_with_clear_errors():
    case = CASES["llama"]
    with pytest.raises(ValueError, match=r"no CPL adapter.*get_peft_model"):
        resolve_adapter(case.build(0))
    model = get_peft_model(case.build(0), CPLConfig(target_modules=case.targets, support="dense"))
    assert resolve_adapter(model) == "default"
    with pytest.raises(ValueError, match="no CPL adapter 'other'"):
        resolve_adapter(model, "other")
    model.add_adapter("second", CPLConfig(target_modules=case.targets, support="dense"))
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="several adapters are active"):
        resolve_adapter(model)
    assert resolve_adapter(model, "second") == "second"
    with pytest.raises(ValueError, match="no CPL adapter"):  # the helpers everywhere use the same rule
        select_collaborative(case.build(0), [], [], progress=False)


@pytest.mark.parametrize("storage", ["compact", "int32"])
def test_index_storage_changes_memory_not_results(storage, tmp_path):
    case = CASES["llama"]
    config = CPLConfig(target_modules=["q_proj", "down_proj"], support="random", density=0.4, index_storage=storage)
    model = get_peft_model(case.build(0), config)
    randomize_values(model)
    reference = get_peft_model(case.build(0), CPLConfig(target_modules=["q_proj", "down_proj"], support="random",
                                                        density=0.4, index_storage="int32"))
    randomize_values(reference)
    for name, layer in cpl_layers(model).items():
        assert layer.cpl_index_form["default"] == ("bitmask" if storage == "compact" else "flat")
        per_value = layer.cpl_indices["default"].nbytes / layer.cpl_values["default"].numel()
        assert per_value == pytest.approx(1 / (8 * 0.4), rel=0.01) if storage == "compact" else per_value == 4
        assert torch.equal(layer.support("default").indices, cpl_layers(reference)[name].support("default").indices)
    inputs = case.inputs(seed=0)
    torch.testing.assert_close(case.loss(model, inputs), case.loss(reference, inputs), rtol=1e-6, atol=1e-6)
    model.save_pretrained(tmp_path / storage)
    loaded = PeftModel.from_pretrained(case.build(0), tmp_path / storage)
    assert all(layer.cpl_index_form["default"] == cpl_layers(model)[name].cpl_index_form["default"]
               for name, layer in cpl_layers(loaded).items())
    with pytest.raises(ValueError, match="index_storage"):
        CPLConfig(index_storage="int16")
