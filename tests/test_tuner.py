"""PEFT's own bar for a tuner (tests/test_custom_models.py), applied to CPL on a tiny Llama, GPT-2 and a plain MLP."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from peft_cpl import CPLConfig
from peft_cpl.tuner.support import Support

from .conftest import Case, base_state, cpl_layers, randomize_values

SUPPORTS = {
    "random": dict(support="random", density=0.2),
    "magnitude": dict(support="magnitude", density=0.1),
    "random-rows": dict(support="random", density=0.25, granularity="row"),
    "dense": dict(support="dense"),
}


@pytest.fixture(params=list(SUPPORTS))
def support(request) -> dict:
    return SUPPORTS[request.param]


def make(case: Case, seed: int = 0, **kwargs):
    base = case.build(seed)
    original = base_state(base)
    model = get_peft_model(base, CPLConfig(target_modules=case.targets, **kwargs))
    return model, original


def fresh_base(case: Case, original: dict) -> torch.nn.Module:
    base = case.build(123)
    base.load_state_dict(original)
    return base


def train_steps(model, case: Case, steps: int = 3, lr: float = 0.05, optimizer_cls=torch.optim.SGD):
    model.train()
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        case.loss(model, case.inputs(seed=step)).backward()
        optimizer.step()
    model.eval()
    return optimizer


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_load_round_trip(case, support, tmp_path, safe_serialization):
    model, original = make(case, **support)
    randomize_values(model)
    ids = case.inputs()
    with torch.no_grad():
        expected = case.output(model, ids)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    assert (tmp_path / ("adapter_model.safetensors" if safe_serialization else "adapter_model.bin")).exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(fresh_base(case, original), tmp_path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    with torch.no_grad():
        torch.testing.assert_close(case.output(loaded, ids), expected, rtol=0, atol=0)


def test_parameters_equal_after_training_and_reload(case, support, tmp_path):
    model, original = make(case, **support)
    train_steps(model, case)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_base(case, original), tmp_path, is_trainable=True)
    trained, reloaded = cpl_layers(model), cpl_layers(loaded)
    assert trained.keys() == reloaded.keys()
    for name, layer in trained.items():
        assert torch.equal(layer.cpl_values["default"], reloaded[name].cpl_values["default"]), name
        assert torch.equal(layer.cpl_indices["default"], reloaded[name].cpl_indices["default"]), name
        assert reloaded[name].cpl_values["default"].requires_grad


def test_only_support_coordinates_change(case, support):
    model, original = make(case, **support)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, case, optimizer_cls=torch.optim.AdamW, lr=0.01)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(".cpl_values." in n for n in changed)
    supports = {name: layer.support("default").indices for name, layer in cpl_layers(model).items()}
    merged = model.merge_and_unload()
    moved = []
    for key, weight in merged.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if key.endswith("weight") and module in {n.removeprefix("base_model.model.") for n in supports}:
            indices = supports["base_model.model." + module]
            outside = torch.ones(weight.numel(), dtype=torch.bool)
            outside[indices] = False
            assert torch.equal(weight.reshape(-1)[outside], original[key].reshape(-1)[outside]), key
            moved.append(not torch.equal(weight.reshape(-1)[indices], original[key].reshape(-1)[indices]))
        else:
            assert torch.equal(weight, original[key]), key
    assert sum(moved) >= len(moved) - 1  # a support can miss every position the data touches (GPT-2 wpe rows)


def test_frozen_coordinates_get_no_gradient_or_optimizer_state(case):
    model, _ = make(case, support="random", density=0.1)
    optimizer = train_steps(model, case, steps=1, optimizer_cls=torch.optim.AdamW, lr=1e-3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dim() == 1 for p in trainable)
    for layer in cpl_layers(model).values():
        values = layer.cpl_values["default"]
        assert values.grad.shape == values.shape == layer.support("default").indices.shape
        assert optimizer.state[values]["exp_avg"].shape == values.shape
    for name, param in model.named_parameters():
        if ".cpl_values." not in name:
            assert param.grad is None, name


def test_merge_equals_unmerged_and_unmerge_restores(case, support):
    model, original = make(case, **support)
    randomize_values(model)
    ids = case.inputs()
    with torch.no_grad():
        base_out = case.output(fresh_base(case, original), ids)
        unmerged = case.output(model, ids)
        assert not torch.allclose(unmerged, base_out)
        model.merge_adapter()
        torch.testing.assert_close(case.output(model, ids), unmerged, rtol=1e-5, atol=1e-5)
        with pytest.warns(UserWarning, match="[Aa]lready merged"):
            model.merge_adapter()  # idempotent: warns, changes nothing
        torch.testing.assert_close(case.output(model, ids), unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(case.output(model, ids), unmerged, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(case.output(model, ids), base_out, rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        torch.testing.assert_close(case.output(merged, ids), unmerged, rtol=1e-5, atol=1e-5)


def test_unload_returns_the_base_model(case):
    model, original = make(case, support="random", density=0.3)
    randomize_values(model)
    base = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    for key, value in base.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_safe_merge(case):
    model, _ = make(case, support="random", density=0.2)
    randomize_values(model)
    ids = case.inputs()
    with torch.no_grad():
        expected = case.output(model, ids)
        model.merge_adapter(safe_merge=True)
        torch.testing.assert_close(case.output(model, ids), expected, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        layer = next(iter(cpl_layers(model).values()))
        layer.cpl_values["default"][0] = float("nan")
        weights_before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match="refusing to merge"):
            model.merge_and_unload(safe_merge=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights_before[key]) or torch.isnan(value).any(), key


def test_disable_adapter_gives_base_outputs(case):
    model, original = make(case, support="magnitude", density=0.2)
    randomize_values(model)
    ids = case.inputs()
    with torch.no_grad():
        base_out = case.output(fresh_base(case, original), ids)
        with model.disable_adapter():
            torch.testing.assert_close(case.output(model, ids), base_out, rtol=0, atol=0)
        assert not torch.allclose(case.output(model, ids), base_out)


def test_multiple_adapters_and_deletion(case):
    model, original = make(case, support="random", density=0.2, seed=1)
    model.add_adapter("other", CPLConfig(target_modules=case.targets, support="magnitude", density=0.1))
    randomize_values(model, seed=1, adapter="default")
    randomize_values(model, seed=2, adapter="other")
    ids = case.inputs()
    with torch.no_grad():
        first = case.output(model, ids)
        model.set_adapter("other")
        second = case.output(model, ids)
        assert not torch.allclose(first, second)
        for layer in cpl_layers(model).values():
            assert not layer.cpl_values["default"].requires_grad and layer.cpl_values["other"].requires_grad
        model.base_model.set_adapter(["default", "other"])
        both = case.output(model, ids)
        base_out = case.output(fresh_base(case, original), ids)
        # deltas add: (W + d1 + d2) x = W x + d1 x + d2 x for the linear parts; check against a merged copy
        merged = copy.deepcopy(model).merge_and_unload(adapter_names=["default", "other"])
        torch.testing.assert_close(case.output(merged, ids), both, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(both, base_out)

    model.base_model.set_adapter("other")
    model.delete_adapter("default")  # inactive adapter
    assert list(model.peft_config) == ["other"]
    with torch.no_grad():
        torch.testing.assert_close(case.output(model, ids), second)
    model.add_adapter("third", CPLConfig(target_modules=case.targets, support="random", density=0.1))
    model.delete_adapter("other")  # active adapter
    for layer in cpl_layers(model).values():
        for container in ("cpl_values", "cpl_indices", "cpl_index_starts", "cpl_index_form", "cpl_ready"):
            assert set(getattr(layer, container)) <= {"third"}, container
    assert not any("other" in key or "default" in key for key in model.state_dict())


def test_load_second_adapter(case, tmp_path):
    model, original = make(case, support="random", density=0.2)
    randomize_values(model, seed=5)
    model.save_pretrained(tmp_path / "a")
    ids = case.inputs()
    with torch.no_grad():
        expected = case.output(model, ids)
    other, _ = make(case, support="magnitude", density=0.05)
    randomize_values(other, seed=6)
    other.save_pretrained(tmp_path / "b")
    loaded = PeftModel.from_pretrained(fresh_base(case, original), tmp_path / "b")
    loaded.load_adapter(tmp_path / "a", adapter_name="a")
    loaded.set_adapter("a")
    with torch.no_grad():
        torch.testing.assert_close(case.output(loaded, ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_keeps_small_deltas(case, dtype):
    base = case.build(0).to(dtype)
    model = get_peft_model(base, CPLConfig(target_modules=case.targets, support="random", density=0.2))
    assert all(v.dtype == torch.float32 for layer in cpl_layers(model).values() for v in layer.cpl_values.values())
    ids = case.inputs()
    with torch.no_grad():
        before = case.output(model, ids)
        randomize_values(model, scale=0.05)
        after = case.output(model, ids)
    assert after.dtype == dtype and torch.isfinite(after).all()
    assert not torch.equal(before, after)
    model.train()
    case.loss(model, ids).backward()
    grads = [layer.cpl_values["default"].grad for layer in cpl_layers(model).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_delta_dtype_is_respected():
    from .conftest import CASES

    case = CASES["llama"]
    base = case.build(0).to(torch.bfloat16)
    model = get_peft_model(
        base, CPLConfig(target_modules=["q_proj"], support="random", density=0.1, delta_dtype="bfloat16")
    )
    assert {v.dtype for layer in cpl_layers(model).values() for v in layer.cpl_values.values()} == {torch.bfloat16}


def test_collaborative_adapter_is_identity_and_refuses_training_before_selection(case):
    model, original = make(case)  # support="collaborative" (the default), nothing selected yet
    assert model.get_nb_trainable_parameters()[0] == 0
    ids = case.inputs()
    with torch.no_grad():
        torch.testing.assert_close(case.output(model, ids), case.output(fresh_base(case, original), ids))
    model.train()
    with pytest.raises(RuntimeError, match="select_collaborative"):
        case.loss(model, ids)


def test_supports_of_different_sizes_decided_after_config(case, tmp_path):
    """Per-module support sizes set after get_peft_model (as selection does) are restored on load."""
    model, original = make(case)
    generator = torch.Generator().manual_seed(0)
    for index, layer in enumerate(cpl_layers(model).values()):
        numel = layer.delta_shape[0] * layer.delta_shape[1]
        count = [0, 1, numel // 7, numel][index % 4]
        chosen = torch.sort(torch.randperm(numel, generator=generator)[:count]).values
        layer.set_support("default", Support.of_indices(chosen, layer.delta_shape))
    randomize_values(model, seed=9)
    ids = case.inputs()
    with torch.no_grad():
        expected = case.output(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_base(case, original), tmp_path)
    for name, layer in cpl_layers(loaded).items():
        assert torch.equal(layer.cpl_indices["default"], cpl_layers(model)[name].cpl_indices["default"])
    with torch.no_grad():
        torch.testing.assert_close(case.output(loaded, ids), expected, rtol=0, atol=0)


def test_layer_selection_fields_and_modules_to_save(tmp_path):
    from .conftest import CASES

    case = CASES["llama"]
    config = CPLConfig(
        target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"], layers_to_transform=[1],
        layers_pattern="layers", modules_to_save=["lm_head"], support="random", density=0.5,
    )
    base = case.build(0)
    original = base_state(base)
    model = get_peft_model(base, config)
    targeted = [name.removeprefix("base_model.model.") for name in cpl_layers(model)]
    assert targeted == ["model.layers.1.self_attn.q_proj"]
    train_steps(model, case, optimizer_cls=torch.optim.AdamW, lr=1e-2)
    ids = case.inputs()
    with torch.no_grad():
        expected = case.output(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_base(case, original), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(case.output(loaded, ids), expected, rtol=0, atol=0)
        with loaded.disable_adapter():
            assert not torch.allclose(case.output(loaded, ids), expected)


def test_low_cpu_mem_usage_loading(case, tmp_path):
    model, original = make(case, support="random", density=0.2)
    randomize_values(model, seed=3)
    ids = case.inputs()
    with torch.no_grad():
        expected = case.output(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_base(case, original), tmp_path, low_cpu_mem_usage=True)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(case.output(loaded, ids), expected, rtol=0, atol=0)
