"""Collaborative selection against brute-force autograd on the dense weights."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_cpl import CPLConfig, select_collaborative
from peft_cpl.tuner.gradients import mean_weight_gradients
from peft_cpl.tuner.losses import token_losses

from .conftest import CASES, base_state, cpl_layers

TARGETS = {"llama": CASES["llama"].targets, "gpt2": CASES["gpt2"].targets, "mlp": CASES["mlp"].targets}


def examples(case, count: int, seed: int) -> list[dict]:
    """Variable-length causal-LM examples with the loss on the last 2 tokens only."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        length = 5 + index % 4
        ids = torch.randint(0, case.vocab, (length,), generator=generator)
        labels = torch.full((length,), -100)
        labels[-2:] = ids[-2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def batched(items: list[dict], size: int) -> list[dict]:
    batches = []
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        width = max(item["input_ids"].numel() for item in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, item in enumerate(chunk):
            n = item["input_ids"].numel()
            ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def mlp_loss(model, batch):
    out = model(input_ids=batch["input_ids"])
    return token_losses(out, batch["labels"])


def brute_force_gradients(case, original: dict, items: list[dict], module_names: list[str]) -> dict:
    """Mean over examples of d loss / d W, by plain autograd on a fresh dense copy, one example at a time."""
    model = case.build(0)
    model.load_state_dict(original)
    weights = {name: model.get_submodule(name).weight for name in module_names}
    for weight in weights.values():
        weight.requires_grad_(True)
    for item in items:
        batch = batched([item], 1)[0]
        if case.name == "mlp":
            loss = mlp_loss(model, batch).sum()
        else:
            loss = token_losses(model(input_ids=batch["input_ids"]).logits, batch["labels"]).sum()
        loss.backward()
    return {name: weight.grad / len(items) for name, weight in weights.items()}


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_hook_gradients_equal_brute_force_autograd(case, batch_size):
    base = case.build(0)
    original = base_state(base)
    model = get_peft_model(base, CPLConfig(target_modules=case.targets))
    layers = {name: layer for name, layer in cpl_layers(model).items()}
    items = examples(case, 7, seed=1)
    loss_fn = mlp_loss if case.name == "mlp" else None
    sums, count = mean_weight_gradients(model, layers, batched(items, batch_size), loss_fn=loss_fn, progress=False)
    assert count == 7
    names = [name.removeprefix("base_model.model.") for name in layers]
    expected = brute_force_gradients(case, original, items, names)
    for name in layers:
        short = name.removeprefix("base_model.model.")
        scale = float(expected[short].abs().max())
        torch.testing.assert_close(sums[name], expected[short], rtol=1e-5, atol=1e-5 * scale, msg=short)


@pytest.mark.parametrize("granularity", ["element", "row"])
def test_support_is_the_collaborative_set(case, granularity):
    base = case.build(0)
    original = base_state(base)
    model = get_peft_model(base, CPLConfig(target_modules=case.targets, granularity=granularity))
    mastered, injection = examples(case, 6, seed=2), examples(case, 5, seed=3)
    loss_fn = mlp_loss if case.name == "mlp" else None
    report = select_collaborative(
        model, batched(mastered, 4), batched(injection, 2), loss_fn=loss_fn, progress=False
    )
    layers = cpl_layers(model)
    names = [name.removeprefix("base_model.model.") for name in layers]
    g_m = brute_force_gradients(case, original, mastered, names)
    g_i = brute_force_gradients(case, original, injection, names)
    for module, (name, layer) in zip(report.modules, layers.items()):
        short = name.removeprefix("base_model.model.")
        s = g_m[short] * g_i[short]
        if granularity == "element":
            expected = (s >= 0) & (g_i[short] != 0)
        else:
            row_s = (s if layer.output_dim == 0 else s.T).sum(dim=1)
            nonzero = ((g_i[short] if layer.output_dim == 0 else g_i[short].T) != 0).any(dim=1)
            rows = (row_s >= 0) & nonzero
            expected = (rows[:, None] if layer.output_dim == 0 else rows[None, :]).expand_as(s)
        chosen = torch.zeros(s.numel(), dtype=torch.bool)
        chosen[layer.support("default").indices] = True
        disagree = chosen != expected.reshape(-1)
        # only coordinates whose score is float noise (|s| ~ 0) may land on the other side
        tiny = 1e-6 * s.abs().max()
        score = s.reshape(-1) if granularity == "element" else expected.reshape(-1) * 0 + tiny / 2
        assert bool((score[disagree].abs() <= tiny).all()), short
        assert module.support == int(chosen.sum())
        assert module.collaborative + module.conflicting + module.zero_gradient == module.numel
        assert abs(module.contribution - float(s.sum())) <= 1e-4 * max(1e-12, float(s.abs().sum()))
        assert layer.cpl_values["default"].abs().sum() == 0


def test_density_cap_ranks_by_injection_gradient():
    case = CASES["llama"]
    model = get_peft_model(case.build(0), CPLConfig(target_modules=["q_proj", "down_proj"]))
    mastered, injection = batched(examples(case, 4, 4), 4), batched(examples(case, 4, 5), 4)
    layers = cpl_layers(model)
    g_m, _ = mean_weight_gradients(model, layers, mastered, progress=False)
    g_i, _ = mean_weight_gradients(model, layers, injection, progress=False)
    select_collaborative(model, mastered, injection, density=0.05, ranking="injection", progress=False)
    for name, layer in layers.items():
        chosen = layer.support("default").indices
        assert chosen.numel() == round(0.05 * g_m[name].numel())
        s, magnitude = (g_m[name] * g_i[name]).reshape(-1), g_i[name].abs().reshape(-1)
        assert bool((s[chosen] >= 0).all())
        eligible = (s >= 0) & (magnitude > 0)
        unchosen = eligible.clone()
        unchosen[chosen] = False
        assert magnitude[chosen].min() >= magnitude[unchosen].max() - 1e-12
    assert model.peft_config["default"].density == 0.05


def test_selection_is_deterministic_and_replaces_support_with_a_warning():
    case = CASES["gpt2"]
    mastered, injection = batched(examples(case, 5, 6), 2), batched(examples(case, 5, 7), 5)
    supports = []
    for _ in range(2):
        model = get_peft_model(case.build(0), CPLConfig(target_modules=case.targets))
        select_collaborative(model, mastered, injection, density=0.3, progress=False)
        supports.append([layer.cpl_indices["default"].clone() for layer in cpl_layers(model).values()])
    assert all(torch.equal(a, b) for a, b in zip(*supports))
    with torch.no_grad():
        next(iter(cpl_layers(model).values())).cpl_values["default"][0] = 1.0
    with pytest.warns(UserWarning, match="values were non-zero"):
        select_collaborative(model, mastered, injection, density=0.1, progress=False)


def test_empty_data_is_refused_before_anything_changes():
    case = CASES["llama"]
    model = get_peft_model(case.build(0), CPLConfig(target_modules=["q_proj"], support="random", density=0.1))
    before = [layer.cpl_indices["default"].clone() for layer in cpl_layers(model).values()]
    some = batched(examples(case, 2, 8), 2)
    with pytest.raises(ValueError, match="mastered data is empty"):
        select_collaborative(model, [], some, progress=False)
    with pytest.raises(ValueError, match="injection data is empty"):
        select_collaborative(model, some, iter([]), progress=False)
    assert all(torch.equal(a, layer.cpl_indices["default"]) for a, layer in zip(before, cpl_layers(model).values()))
    with pytest.raises(ValueError, match=r"CPLConfig\.granularity"):
        select_collaborative(model, some, some, granularity="column", progress=False)


def test_selection_leaves_gradients_and_mode_alone():
    case = CASES["llama"]
    model = get_peft_model(case.build(0), CPLConfig(target_modules=["q_proj"], support="random", density=0.1))
    model.train()
    data = batched(examples(case, 2, 9), 2)
    select_collaborative(model, data, data, progress=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(layer.cpl_values["default"].requires_grad for layer in cpl_layers(model).values())


def test_report_table_dict_plot_and_saved_next_to_the_adapter(tmp_path):
    from peft import PeftModel

    from peft_cpl import SelectionReport

    case = CASES["llama"]
    model = get_peft_model(case.build(0), CPLConfig(target_modules=["q_proj", "down_proj"]))
    data = batched(examples(case, 4, 10), 2)
    report = select_collaborative(model, data[:1], data[1:], density=0.2, progress=False)
    summary = report.to_dict()["summary"]
    fractions = ("collaborative_fraction", "conflicting_fraction", "zero_gradient_fraction")
    assert abs(sum(summary[key] for key in fractions) - 1) < 1e-9
    assert summary["support"] == sum(layer.cpl_values["default"].numel() for layer in cpl_layers(model).values())
    table = report.table()
    assert "q_proj" in table and "cos(g_M, g_I)" in table
    image = report.plot(tmp_path / "selection.png")
    assert image.stat().st_size > 1000 and image.read_bytes()[:4] == b"\x89PNG"
    model.save_pretrained(tmp_path / "adapter")
    saved = SelectionReport.load(tmp_path / "adapter")
    assert saved.to_dict() == report.to_dict()
    loaded = PeftModel.from_pretrained(case.build(0), tmp_path / "adapter")
    assert loaded.peft_config["default"].selection_report.to_dict() == report.to_dict()
    assert not list((tmp_path / "adapter").glob(".selection-*"))  # no temp file left behind


def test_report_plot_groups_many_modules_by_layer(tmp_path):
    from peft_cpl import ModuleSelection, SelectionReport

    modules = [
        ModuleSelection(f"model.layers.{layer}.mlp.{kind}", 100, 60 - layer, 40 + layer, 0, 60 - layer, 1.0, 2.0, 3.0)
        for layer in range(12)
        for kind in ("up_proj", "down_proj")
    ]
    report = SelectionReport("default", "element", None, "injection", 4, 4, modules)
    image = report.plot(tmp_path / "layers.png")
    assert image.read_bytes()[:4] == b"\x89PNG"
    assert report.summary()["collaborative_fraction"] == sum(60 - layer for layer in range(12)) * 2 / 2400


@pytest.mark.parametrize("granularity", ["element", "row"])
def test_specific_ranking_keeps_injection_gradient_per_mastered_gradient(granularity):
    """ranking="specific" (the default): the cap keeps the eligible units with the largest |g_I| / (|g_M| + mean
    |g_M|)."""
    case = CASES["llama"]
    model = get_peft_model(case.build(0), CPLConfig(target_modules=["q_proj", "down_proj"], granularity=granularity))
    mastered, injection = batched(examples(case, 4, 4), 4), batched(examples(case, 4, 5), 4)
    layers = cpl_layers(model)
    g_m, _ = mean_weight_gradients(model, layers, mastered, progress=False)
    g_i, _ = mean_weight_gradients(model, layers, injection, progress=False)
    report = select_collaborative(model, mastered, injection, density=0.1, progress=False)  # the default ranking
    assert report.ranking == "specific"
    for name, layer in layers.items():
        m, i = g_m[name], g_i[name]
        if granularity == "row":  # rows of the weight as stored: output_dim 0 for these Linear layers
            m2, i2 = m.square().sum(dim=1), i.square().sum(dim=1)
            score, eligible = i2 / (m2 + m2.mean()), ((m * i).sum(dim=1) >= 0) & (i != 0).any(dim=1)
            chosen_rows = torch.zeros(m.shape[0], dtype=torch.bool)
            chosen_rows[torch.unique(layer.support("default").indices // m.shape[1])] = True
            chosen = chosen_rows
        else:
            score = (i.abs() / (m.abs() + m.abs().mean())).reshape(-1)
            eligible = ((m * i >= 0) & (i != 0)).reshape(-1)
            chosen = torch.zeros(m.numel(), dtype=torch.bool)
            chosen[layer.support("default").indices] = True
        assert bool(eligible[chosen].all()) and 0 < int(chosen.sum()) < int(eligible.sum())
        assert score[chosen].min() >= score[eligible & ~chosen].max() * (1 - 1e-6)
    injection_only = get_peft_model(case.build(0), CPLConfig(target_modules=["q_proj", "down_proj"],
                                                             granularity=granularity))
    select_collaborative(injection_only, mastered, injection, density=0.1, ranking="injection", progress=False)
    differ = [not torch.equal(layer.support("default").indices, other.support("default").indices)
              for layer, other in zip(layers.values(), cpl_layers(injection_only).values())]
    assert any(differ)  # a ranking of its own, not |g_I| again
