"""Hugging Face Trainer integration: the guard as a TrainerCallback, with its state in every checkpoint."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .guard import CollaborativeGuard

GUARD_STATE_FILE = "cpl_guard.safetensors"


class CollaborativeGuardCallback(TrainerCallback):
    """Apply a CollaborativeGuard around every optimizer step of a `transformers.Trainer`.

    Saves the guard's sign(g_M) and counters as `cpl_guard.safetensors` in each checkpoint folder and restores them
    when training resumes from a checkpoint (`trainer.train(resume_from_checkpoint=...)`).
    """

    def __init__(self, guard: CollaborativeGuard) -> None:
        self.guard = guard

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: the Trainer restored state from checkpoint-<global_step>
            path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", GUARD_STATE_FILE)
            if os.path.isfile(path):
                self.guard.load_state_dict(_unflatten(load_file(path)))
        return control

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.guard.on_epoch_start()
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.guard.before_step()
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.guard.after_step()
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            temp = os.path.join(folder, f".{GUARD_STATE_FILE}.tmp")
            save_file(_flatten(self.guard.state_dict()), temp)
            os.replace(temp, os.path.join(folder, GUARD_STATE_FILE))
        return control


def _flatten(state: dict) -> dict[str, torch.Tensor]:
    flat = {f"signs.{name}": sign for name, sign in state["signs"].items()}
    flat["steps"] = torch.tensor([state["steps"]])
    flat["counts"] = state["counts"]
    return flat


def _unflatten(flat: dict[str, torch.Tensor]) -> dict:
    signs = {key.removeprefix("signs."): value for key, value in flat.items() if key.startswith("signs.")}
    return {"signs": signs, "steps": int(flat["steps"][0]), "counts": flat["counts"]}
