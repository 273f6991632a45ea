"""The per-step guard: first-order safety for the mastered loss, any optimizer, state save/restore."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_cpl import CollaborativeGuard, CPLConfig, select_collaborative
from peft_cpl.tuner.losses import summed_example_loss

from .conftest import CASES, cpl_layers
from .test_selection import batched

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def conflicting_data(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Same contexts, different answers: the injection gradient opposes the mastered one."""
    generator = torch.Generator().manual_seed(seed)
    mastered, injection = [], []
    for _ in range(6):
        ids = torch.randint(0, 1000, (6,), generator=generator)
        for target, bucket in ((7, mastered), (11, injection)):
            example = ids.clone()
            example[-1] = target
            labels = torch.full((6,), -100)
            labels[-1] = target
            bucket.append({"input_ids": example, "labels": labels})
    return batched(mastered, 6), batched(injection, 6)


def model_that_masters(mastered: list[dict]) -> torch.nn.Module:
    """A tiny Llama fitted to the mastered answers, so that learning other answers to the same contexts hurts them."""
    model = CASES["llama"].build(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(10):  # fitted enough that other answers to the same contexts conflict
        optimizer.zero_grad()
        loss, count = summed_example_loss(model, mastered[0])
        (loss / count).backward()
        optimizer.step()
    return model.eval()


def mastered_loss(model, mastered) -> float:
    with torch.no_grad():
        loss, count = summed_example_loss(model, mastered[0])
    return float(loss) / count


def one_sgd_step(lr: float, guarded: bool) -> float:
    mastered, injection = conflicting_data()
    model = get_peft_model(model_that_masters(mastered), CPLConfig(target_modules=TARGETS, support="dense"))
    model.eval()  # deterministic (no dropout) and comparable losses
    before = mastered_loss(model, mastered)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    if guarded:
        CollaborativeGuard(model, mastered=mastered).attach(optimizer)
    loss, count = summed_example_loss(model, injection[0])
    (loss / count).backward()
    optimizer.step()
    return mastered_loss(model, mastered) - before


def test_guarded_step_keeps_the_mastered_loss_down_to_first_order():
    for lr in (1e-2, 3e-3):
        unguarded = one_sgd_step(lr, guarded=False)
        guarded = one_sgd_step(lr, guarded=True)
        assert unguarded > 0, "the data is built to conflict: an unguarded step must raise L_M"
        # what is left is second order: far below the first-order rise, and shrinking like lr^2
        assert guarded < 0.02 * unguarded, (lr, guarded, unguarded)


def test_guard_with_adamw_reverts_only_harmful_coordinates_and_keeps_optimizer_state():
    mastered, injection = conflicting_data(1)
    model = get_peft_model(CASES["llama"].build(0), CPLConfig(target_modules=TARGETS, support="random", density=0.5))
    guard = CollaborativeGuard(model, mastered=mastered)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    guard.attach(optimizer)
    layers = cpl_layers(model)
    before = {name: layer.cpl_values["default"].detach().clone() for name, layer in layers.items()}
    model.train()
    loss, count = summed_example_loss(model, injection[0])
    (loss / count).backward()
    optimizer.step()
    for name, layer in layers.items():
        values = layer.cpl_values["default"]
        change = values.detach() - before[name]
        sign = layer.cpl_mastered_sign["default"].float()
        assert bool((change * sign <= 0).all()), name
        assert optimizer.state[values]["exp_avg"].abs().sum() > 0
    assert 0 < guard.reverted < guard.proposed
    assert guard.steps == 1


def test_refresh_every_n_steps_and_state_round_trip():
    mastered, injection = conflicting_data(2)
    model = get_peft_model(CASES["llama"].build(0), CPLConfig(target_modules=TARGETS))
    select_collaborative(model, mastered, injection, progress=False)
    guard = CollaborativeGuard(model, mastered=mastered, refresh=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    guard.attach(optimizer)
    first = {n: layer.cpl_mastered_sign["default"].clone() for n, layer in cpl_layers(model).items()}
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        summed_example_loss(model, injection[0])[0].backward()
        optimizer.step()
    refreshed = {n: layer.cpl_mastered_sign["default"] for n, layer in cpl_layers(model).items()}
    assert any(not torch.equal(first[n], refreshed[n]) for n in first), "g_M must have moved after 2 large steps"
    assert all(p.grad is None or p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)

    state = guard.state_dict()
    other = CollaborativeGuard(model, mastered=mastered)
    other.load_state_dict(state)
    assert other.steps == 2 and other.reverted == guard.reverted


def test_guard_needs_g_m_when_the_adapter_was_loaded(tmp_path):
    mastered, injection = conflicting_data(3)
    model = get_peft_model(CASES["llama"].build(0), CPLConfig(target_modules=TARGETS))
    select_collaborative(model, mastered, injection, progress=False)
    CollaborativeGuard(model)  # selected in this process: sign(g_M) is on the layers
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(CASES["llama"].build(0), tmp_path, is_trainable=True)
    with pytest.raises(ValueError, match="mastered="):
        CollaborativeGuard(loaded)
    guard = CollaborativeGuard(loaded, mastered=mastered)
    for name, layer in cpl_layers(loaded).items():
        assert torch.equal(layer.cpl_mastered_sign["default"], cpl_layers(model)[name].cpl_mastered_sign["default"])
    assert guard.layers


@pytest.mark.parametrize("refresh", ["sometimes", 0, -3, True])
def test_invalid_refresh_is_refused(refresh):
    model = get_peft_model(CASES["llama"].build(0), CPLConfig(target_modules=TARGETS, support="dense"))
    with pytest.raises(ValueError, match="refresh"):
        CollaborativeGuard(model, mastered=conflicting_data()[0], refresh=refresh)


def test_guard_refuses_an_adapter_without_support():
    mastered, _ = conflicting_data(4)
    model = get_peft_model(CASES["llama"].build(0), CPLConfig(target_modules=TARGETS))  # not selected yet
    with pytest.raises(ValueError, match="select_collaborative"):
        CollaborativeGuard(model, mastered=mastered)


def _guarded_step_reverts(optimizer_factory) -> tuple[int, int, CollaborativeGuard, dict]:
    mastered, injection = conflicting_data(3)
    model = get_peft_model(CASES["llama"].build(0), CPLConfig(target_modules=TARGETS, support="random", density=0.5))
    guard = CollaborativeGuard(model, mastered=mastered)
    optimizer = optimizer_factory([p for p in model.parameters() if p.requires_grad])
    handle = guard.attach(optimizer)
    before = {name: layer.cpl_values["default"].detach().clone() for name, layer in cpl_layers(model).items()}
    model.train()
    loss, count = summed_example_loss(model, injection[0])
    (loss / count).backward()
    optimizer.step()
    for name, layer in cpl_layers(model).items():
        change = layer.cpl_values["default"].detach() - before[name]
        assert bool((change * layer.cpl_mastered_sign["default"].float() <= 0).all()), name
    return guard.reverted, guard.proposed, guard, {"handle": handle, "optimizer": optimizer, "model": model,
                                                     "injection": injection}


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit", "accelerate"])
def test_guard_attaches_to_any_optimizer_through_its_step_hooks(kind):
    def factory(params):
        if kind == "adamw8bit":
            bnb = pytest.importorskip("bitsandbytes")
            return bnb.optim.AdamW8bit(params, lr=1e-3)
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        if kind == "accelerate":
            from accelerate import Accelerator

            return Accelerator(cpu=True).prepare_optimizer(optimizer)  # what a Trainer steps
        return optimizer

    reverted, proposed, guard, parts = _guarded_step_reverts(factory)
    assert 0 < reverted < proposed and guard.steps == 1
    parts["handle"].remove()  # detached: the next step is no longer guarded
    loss, count = summed_example_loss(parts["model"], parts["injection"][0])
    (loss / count).backward()
    parts["optimizer"].step()
    assert guard.steps == 1 and guard.reverted == reverted
