"""HF Trainer + CollaborativeGuardCallback on a tiny Llama: trains the support only, guards, resumes exactly."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_cpl import CollaborativeGuard, CollaborativeGuardCallback, CPLConfig, select_collaborative
from peft_cpl.toolkit.hf_trainer import GUARD_STATE_FILE
from peft_cpl.tuner.losses import summed_example_loss

from .conftest import cpl_layers, tiny_llama
from .test_guard import conflicting_data

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
MASTERED, INJECTION = conflicting_data(0)  # one batch of 6 each; the injection answers conflict with the mastered
ROWS = [{key: value[row] for key, value in INJECTION[0].items()} for row in range(6)] * 2  # 3 steps of 4 an epoch


def stack(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def cpl_model(select: bool = True):
    model = get_peft_model(tiny_llama(seed=0), CPLConfig(target_modules=TARGETS))
    if select:
        select_collaborative(model, MASTERED, INJECTION, progress=False)
    return model


def trainer_for(model, output, callbacks=(), **overrides) -> Trainer:
    settings = dict(
        num_train_epochs=3, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="steps", save_steps=2,
        report_to="none", logging_strategy="no", seed=0, use_cpu=True, disable_tqdm=True,
    )
    settings.update(overrides)
    args = TrainingArguments(str(output), **settings)
    return Trainer(model=model, args=args, train_dataset=ROWS, data_collator=stack, callbacks=list(callbacks))


def values(model) -> dict[str, torch.Tensor]:
    return {name: layer.cpl_values["default"].detach().clone() for name, layer in cpl_layers(model).items()}


def injection_loss(model) -> float:
    model.eval()
    with torch.no_grad():
        loss, count = summed_example_loss(model, INJECTION[0])
    return float(loss) / count


class StopAt(TrainerCallback):
    """Ends training after a given step, as a crash right after that step's checkpoint would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step
        return control


class CheckEveryStep(TrainerCallback):
    """Registered after the guard's callback: sees each step's update once the guard has masked it."""

    def __init__(self, guard: CollaborativeGuard) -> None:
        self.guard, self.before, self.checked = guard, None, 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before = {name: layer.cpl_values["default"].detach().clone() for name, layer in self.guard.layers.items()}

    def on_optimizer_step(self, args, state, control, **kwargs):
        for name, layer in self.guard.layers.items():
            change = layer.cpl_values["default"].detach() - self.before[name]
            assert bool((change * layer.cpl_mastered_sign["default"] <= 0).all()), name
        self.checked += 1


def test_trainer_trains_only_the_support_values(tmp_path):
    model = cpl_model()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if ".cpl_values." not in name}
    before, loss_before = values(model), injection_loss(model)
    trainer = trainer_for(model, tmp_path, num_train_epochs=1, save_strategy="no")
    trainer.train()
    assert {id(p) for group in trainer.optimizer.param_groups for p in group["params"]} == {
        id(layer.cpl_values["default"]) for layer in cpl_layers(model).values()
    }
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    after = values(model)
    assert all(after[name].shape == before[name].shape for name in before)
    assert any(after[name].any() for name in after)
    assert injection_loss(model) < loss_before


def test_guard_callback_reverts_exactly_the_harmful_coordinates(tmp_path):
    model = cpl_model()
    guard = CollaborativeGuard(model, refresh="never")  # sign(g_M) from the selection just made
    checker = CheckEveryStep(guard)
    trainer = trainer_for(
        model, tmp_path, callbacks=[CollaborativeGuardCallback(guard), checker], save_strategy="no", num_train_epochs=1
    )
    trainer.train()
    assert checker.checked == guard.steps == trainer.state.global_step == 3
    assert 0 < guard.reverted < guard.proposed  # the data conflicts: some updates had to go, not all


@pytest.mark.parametrize(
    ("refresh", "stop", "reselect"),
    [("epoch", 4, True), (2, 3, True), (None, 3, False)],
    ids=["guard-refreshed-each-epoch-stop-mid-epoch", "guard-refreshed-every-2-steps-stop-at-epoch-end",
         "no-guard-no-reselection-stop-at-epoch-end"],
)
def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, refresh, stop, reselect):
    def run(output, stop_at=None, resume=None, select=True):
        model = cpl_model(select)
        callbacks = [StopAt(stop_at)] if stop_at else []
        guard = None
        if refresh is not None:
            guard = CollaborativeGuard(model, mastered=MASTERED, refresh=refresh)
            callbacks.insert(0, CollaborativeGuardCallback(guard))
        saving = dict(save_strategy="steps", save_steps=stop_at) if stop_at else dict(save_strategy="no")
        trainer = trainer_for(model, output, callbacks=callbacks, num_train_epochs=2, **saving)
        trainer.train(resume_from_checkpoint=resume)
        return model, guard, trainer

    full_model, full_guard, full_trainer = run(tmp_path / "full")
    run(tmp_path / "cut", stop_at=stop)
    checkpoint = tmp_path / "cut" / f"checkpoint-{stop}"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert (checkpoint / GUARD_STATE_FILE).is_file() == (refresh is not None)
    # A fresh process rebuilds the model as before; without re-selection the support comes from the checkpoint.
    model, guard, trainer = run(tmp_path / "cut", resume=str(checkpoint), select=reselect)

    assert trainer.state.global_step == full_trainer.state.global_step == 6
    expected, got = values(full_model), values(model)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    expected_state, got_state = full_trainer.optimizer.state_dict()["state"], trainer.optimizer.state_dict()["state"]
    for key, state in expected_state.items():
        assert torch.equal(got_state[key]["exp_avg_sq"], state["exp_avg_sq"])
    if refresh is not None:
        full, resumed = full_guard.state_dict(), guard.state_dict()
        assert resumed["steps"] == full["steps"] == 6 and torch.equal(resumed["counts"], full["counts"])
        assert all(torch.equal(resumed["signs"][name], sign) for name, sign in full["signs"].items())


def test_resume_without_the_guard_state(tmp_path):
    model = cpl_model()
    guard = CollaborativeGuard(model, mastered=MASTERED)
    callbacks = [CollaborativeGuardCallback(guard), StopAt(2)]
    trainer_for(model, tmp_path, callbacks=callbacks, num_train_epochs=1).train()
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / GUARD_STATE_FILE).unlink()

    model = cpl_model()
    guard = CollaborativeGuard(model, mastered=MASTERED)
    with pytest.warns(UserWarning, match="recomputed at the restored weights"):
        trainer_for(model, tmp_path, callbacks=[CollaborativeGuardCallback(guard)], num_train_epochs=1).train(
            resume_from_checkpoint=str(checkpoint)
        )
    assert guard.steps == 1  # counted from the resume on: the saved counters were lost with the file

    model = cpl_model()
    guard = CollaborativeGuard(model)  # no mastered batches: nothing to recompute sign(g_M) from
    with pytest.raises(ValueError, match="Cannot resume the guard"):
        trainer_for(model, tmp_path, callbacks=[CollaborativeGuardCallback(guard)]).train(
            resume_from_checkpoint=str(checkpoint)
        )
