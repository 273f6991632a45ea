"""The fused step: the same values as a plain optimizer, with no gradient buffers left, guard included."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from peft_cpl import CollaborativeGuard, CPLConfig
from peft_cpl.tuner.fused import FusedStep, check_trainer_arguments
from peft_cpl.tuner.losses import summed_example_loss

from .conftest import CASES, cpl_layers
from .test_guard import TARGETS, conflicting_data


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def run(model, batches, optimizer, steps: int = 4, on_backward=None) -> None:
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        loss, count = summed_example_loss(model, batches[step % len(batches)])
        (loss / count).backward()
        if on_backward is not None:
            on_backward()
        optimizer.step()


def pair(guarded: bool):
    mastered, injection = conflicting_data(5)
    model = get_peft_model(CASES["llama"].build(0), CPLConfig(target_modules=TARGETS, support="random", density=0.4))
    twin = copy.deepcopy(model)
    guards = [CollaborativeGuard(m, mastered=mastered, refresh=2) if guarded else None for m in (model, twin)]
    return (model, twin), guards, injection


def values(model) -> dict[str, torch.Tensor]:
    return {name: layer.cpl_values["default"].detach().clone() for name, layer in cpl_layers(model).items()}


@pytest.mark.parametrize("guarded", [False, True])
@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd", "adamw8bit", "paged_adamw8bit"])
def test_fused_step_gives_the_values_of_the_plain_optimizer(optimizer_name, guarded):
    if optimizer_name in ("adamw8bit", "paged_adamw8bit"):  # paged: plain on CPU (bitsandbytes falls back)
        optim = pytest.importorskip("bitsandbytes").optim
        optimizer_cls = optim.AdamW8bit if optimizer_name == "adamw8bit" else optim.PagedAdamW8bit
        kwargs = {"lr": 1e-3}
    else:
        optimizer_cls = torch.optim.AdamW if optimizer_name == "adamw" else torch.optim.SGD
        kwargs = {"lr": 1e-3 if optimizer_name == "adamw" else 0.5}
    (plain_model, fused_model), (plain_guard, fused_guard), batches = pair(guarded)
    plain = optimizer_cls(trainable(plain_model), **kwargs)
    if plain_guard is not None:
        plain_guard.attach(plain)
    fused = FusedStep(trainable(fused_model), optimizer_cls, guard=fused_guard, **kwargs)
    no_grads_left = []
    run(plain_model, batches, plain)
    run(fused_model, batches, fused, on_backward=lambda: no_grads_left.append(
        all(p.grad is None for p in trainable(fused_model))))
    assert all(no_grads_left)  # each gradient was freed right after its tensor's step
    expected, got = values(plain_model), values(fused_model)
    assert any(v.abs().sum() > 0 for v in got.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    if guarded:
        assert fused_guard.steps == plain_guard.steps == 4
        assert fused_guard.reverted == plain_guard.reverted > 0
        for name, layer in cpl_layers(fused_model).items():  # refreshed at steps 2 and 4, from the same weights
            assert torch.equal(layer.cpl_mastered_sign["default"],
                               cpl_layers(plain_model)[name].cpl_mastered_sign["default"])


def test_fused_state_round_trips_and_lr_schedulers_drive_it():
    (model, _), _, batches = pair(False)
    fused = FusedStep(trainable(model), torch.optim.AdamW, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(fused, lambda step: 0.5**step)
    run(model, batches, fused, steps=2)
    scheduler.step()
    assert all(group["lr"] == pytest.approx(5e-4) for group in fused.param_groups)
    assert all(opt.param_groups[0]["lr"] == pytest.approx(5e-4) for opt in fused.inner.values())
    state = copy.deepcopy(fused.state_dict())
    again = FusedStep(trainable(model), torch.optim.AdamW, lr=1e-3)
    fused.remove()
    again.load_state_dict(state)
    first = next(iter(again.inner.values()))
    assert first.state[first.param_groups[0]["params"][0]]["step"] == 2


def test_gradient_accumulation_and_global_clipping_are_refused():
    (model, _), _, batches = pair(False)
    fused = FusedStep(trainable(model), torch.optim.SGD, lr=0.1)
    model.train()
    for batch in batches[:1] * 2:  # two micro-batches before one step
        loss, count = summed_example_loss(model, batch)
        if fused._stepped_since_step:
            with pytest.raises(RuntimeError, match="gradient accumulation"):
                (loss / count).backward()
        else:
            (loss / count).backward()
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        check_trainer_arguments(TrainingArguments("out", gradient_accumulation_steps=4, max_grad_norm=0.0))
    with pytest.raises(ValueError, match=r"max_grad_norm=1\.0"):
        check_trainer_arguments(TrainingArguments("out"))
    check_trainer_arguments(TrainingArguments("out", max_grad_norm=0.0))


def test_fused_step_under_the_hf_trainer_equals_the_plain_loop(tmp_path):
    from transformers import Trainer, TrainingArguments

    (plain_model, fused_model), _, batches = pair(False)
    examples = [{key: value[row] for key, value in batch.items()} for batch in batches for row in range(6)][:6]
    plain = torch.optim.SGD(trainable(plain_model), lr=0.5)
    run(plain_model, [{key: torch.stack([e[key] for e in examples]) for key in examples[0]}], plain, steps=2)
    args = TrainingArguments(
        tmp_path, per_device_train_batch_size=6, max_steps=2, max_grad_norm=0.0, learning_rate=0.5,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, dataloader_drop_last=False,
    )
    check_trainer_arguments(args)
    fused = FusedStep(trainable(fused_model), torch.optim.SGD, lr=0.5)

    class SummedLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, count = summed_example_loss(model, inputs)
            return loss / count

    SummedLoss(model=fused_model, args=args, train_dataset=examples, optimizers=(fused, None)).train()
    assert all(v.abs().sum() > 0 for v in values(fused_model).values())
    for name, expected in values(plain_model).items():
        torch.testing.assert_close(values(fused_model)[name], expected, rtol=1e-5, atol=1e-7, msg=name)


def test_an_8bit_optimizer_without_bitsandbytes_is_refused_before_any_step(monkeypatch):
    from peft_cpl.toolkit.loop import make_optimizer

    (model, _), _, _ = pair(False)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # as if it were not installed
    before = {name: v.clone() for name, v in values(model).items()}
    for fused in (False, True):
        with pytest.raises(ValueError, match=r"need bitsandbytes.*--optimizer adamw"):
            make_optimizer(model, "adamw8bit", 1e-3, fused=fused)
    assert all(torch.equal(before[name], v) for name, v in values(model).items())
    assert all(p.grad is None for p in trainable(model))


def test_the_guard_refresh_writes_no_gradient_and_never_steps_a_fused_optimizer():
    (model, _), (guard, _), batches = pair(True)
    fused = FusedStep(trainable(model), torch.optim.SGD, guard=guard, lr=0.5)
    before = values(model)
    guard.refresh()  # backward passes over M: read through autograd.grad, no .grad written, no hook fired
    assert all(torch.equal(before[name], v) for name, v in values(model).items())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="give it the guard"):
        guard.attach(fused)
    run(model, batches, fused, steps=3)  # refresh every 2 steps inside; no "stepped twice" error
    assert guard.steps == 3 and guard.reverted > 0


def test_a_new_fused_optimizer_takes_over_from_the_last_one():
    (model, twin), _, batches = pair(False)
    first = FusedStep(trainable(model), torch.optim.AdamW, lr=1e-3)
    second = FusedStep(trainable(model), torch.optim.AdamW, lr=1e-3)
    assert first._hooks == []  # the first one let go
    run(model, batches, second, steps=2)
    plain = torch.optim.AdamW(trainable(twin), lr=1e-3)
    run(twin, batches, plain, steps=2)
    for name, expected in values(twin).items():
        torch.testing.assert_close(values(model)[name], expected, rtol=1e-5, atol=1e-7)


def test_fp16_loss_scaling_is_refused_with_the_fused_step():
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="fp16=True"):
        check_trainer_arguments(TrainingArguments("out", max_grad_norm=0.0, fp16=True, use_cpu=True))
