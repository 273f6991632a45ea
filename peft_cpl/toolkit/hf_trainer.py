"""Hugging Face Trainer integration: the guard as a TrainerCallback, with its state in every checkpoint.

Resuming (`trainer.train(resume_from_checkpoint=...)`) continues exactly: the Trainer reloads the adapter through
`load_adapter` (which restores each module's support from the file) before it builds the optimizer, and this callback
restores the guard's sign(g_M), step count and counters from the same checkpoint folder.
"""

from __future__ import annotations

import os
import warnings

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..tuner.atomic import atomic_path
from ..tuner.fused import FusedStep, check_trainer_arguments
from ..tuner.guard import CollaborativeGuard, innermost_optimizer

GUARD_STATE_FILE = "cpl_guard.safetensors"


def save_guard_state(guard: CollaborativeGuard, path: str | os.PathLike) -> None:
    """Write the guard's state as safetensors (atomically)."""
    state = guard.state_dict()
    flat = {f"signs.{name}": sign.contiguous() for name, sign in state["signs"].items()}
    flat["steps"] = torch.tensor([state["steps"]])
    flat["refreshed_at"] = torch.tensor([state["refreshed_at"]])
    flat["counts"] = state["counts"]
    with atomic_path(path) as temp:
        save_file(flat, os.fspath(temp))


def load_guard_state(guard: CollaborativeGuard, path: str | os.PathLike) -> None:
    """Restore what `save_guard_state` wrote (the adapter's support must already be the saved one)."""
    flat = load_file(os.fspath(path))
    signs = {key.removeprefix("signs."): value for key, value in flat.items() if key.startswith("signs.")}
    guard.load_state_dict({
        "signs": signs, "steps": int(flat["steps"][0]), "refreshed_at": int(flat["refreshed_at"][0]),
        "counts": flat["counts"],
    })


class CollaborativeGuardCallback(TrainerCallback):
    """Apply a CollaborativeGuard around every optimizer step of a `transformers.Trainer`.

    Saves the guard's sign(g_M) and counters as `cpl_guard.safetensors` in each checkpoint folder and restores them
    when training resumes from a checkpoint under `args.output_dir` (`trainer.train(resume_from_checkpoint=...)`).
    With several processes (DDP) every rank builds its guard and callback, and the main process writes the state.
    """

    def __init__(self, guard: CollaborativeGuard) -> None:
        self.guard = guard
        self._handle = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            raise ValueError("CollaborativeGuardCallback needs the Trainer's optimizer at on_train_begin")
        inner = innermost_optimizer(optimizer)
        if isinstance(inner, FusedStep):  # it reverts inside backward itself, with its own guard
            if inner.guard is not self.guard:
                raise ValueError("the fused optimizer was built without this guard: FusedStep(..., guard=guard)")
            check_trainer_arguments(args)
        else:
            self._handle = self.guard.attach(optimizer)  # the torch optimizer's own step hooks
        if state.global_step > 0:  # resumed: the Trainer restored state from checkpoint-<global_step>
            path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", GUARD_STATE_FILE)
            if os.path.isfile(path):
                load_guard_state(self.guard, path)
            elif self.guard.mastered is not None:
                warnings.warn(
                    f"Resuming without the guard state ({path} is missing): sign(g_M) is recomputed at the restored "
                    "weights, so the run will not continue exactly as an uninterrupted one.",
                    stacklevel=2,
                )
                self.guard.refresh()
            else:
                raise ValueError(
                    f"Cannot resume the guard: {path} is missing (resume from a checkpoint under args.output_dir), "
                    "and the guard has no mastered=... batches to recompute sign(g_M) from."
                )
        return control

    def on_epoch_begin(self, args, state, control, **kwargs):
        # A run resumed inside an epoch starts with a fractional state.epoch: that epoch's refresh already happened
        # (its sign(g_M) came back with the checkpoint), and redoing it at later weights would change the run.
        if state.epoch is None or float(state.epoch).is_integer():
            self.guard.on_epoch_start()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):  # every rank holds the same state (DDP)
            save_guard_state(self.guard, os.path.join(folder, GUARD_STATE_FILE))
        return control
