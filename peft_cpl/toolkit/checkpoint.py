"""The resumable checkpoint of `peft-cpl train`, kept in the run's output folder.

    OUTPUT/                          the adapter, as `save_pretrained` writes it (usable as is after every epoch)
    OUTPUT/checkpoint/state.json     the run's settings (SETTINGS), the epochs done ("epoch") and asked for ("epochs")
    OUTPUT/checkpoint/optimizer.pt   the optimizer's state_dict
    OUTPUT/checkpoint/cpl_guard.safetensors   the guard's state, for runs with the guard (hf_trainer.save_guard_state)

The whole folder is rewritten after every epoch in a staging folder and renamed into place, so an interrupted run
leaves its last complete epoch. A resumed run keeps the saved settings: the same data, model and optimizer
hyper-parameters continue the same run, and only the number of epochs may grow.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from .models import DEFAULT_MODEL

CHECKPOINT_DIR, STATE_FILE, OPTIMIZER_FILE = "checkpoint", "state.json", "optimizer.pt"

SETTINGS = {  # setting: default for a new run
    "model": DEFAULT_MODEL, "adapter": None, "injection": None, "mastered": None, "optimizer": "adamw", "lr": 3e-4,
    "weight_decay": 0.0, "batch_size": 8, "seed": 0, "guard": False, "guard_refresh": "epoch", "quantize": None,
    "fused": True,
}
SAVED_BEFORE = {"fused": False}  # settings added since 0.1.0, as runs checkpointed before them had them
READ_AT_START = ("adapter",)  # read by a new run only: a resumed run loads the adapter from its checkpoint


class SettingChanged(ValueError):
    """A resumed run was given a setting that differs from its checkpoint's."""

    def __init__(self, key: str, given: object, saved: object) -> None:
        super().__init__(f"{key} {given} differs from the checkpoint's {saved}: a resumed run keeps its settings")
        self.key, self.given, self.saved = key, given, saved


def state_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / CHECKPOINT_DIR / STATE_FILE


def read_state(folder: str | os.PathLike) -> dict | None:
    """The checkpoint's state.json (settings, "epoch", "epochs"), or None when `folder` holds no checkpoint."""
    path = state_path(folder)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is damaged: not JSON ({error}); train again with --overwrite") from None
    missing = [key for key in ("epoch", "epochs", *SETTINGS) if key not in SAVED_BEFORE and key not in state] if (
        isinstance(state, dict)) else ["all"]
    if missing:
        raise ValueError(f"{path} is damaged: it lacks {', '.join(missing)}; train again with --overwrite")
    return state


def run_settings(given: dict, saved: dict | None) -> dict:
    """The settings of a run: `given` (None: not given) over the defaults for a new run; the saved ones for a resumed
    run, which `given` may repeat but not change (SettingChanged)."""
    if saved is None:
        return {key: default if given.get(key) is None else given[key] for key, default in SETTINGS.items()}
    saved = {**SAVED_BEFORE, **saved}
    for key, value in given.items():
        if value is not None and key not in READ_AT_START and value != saved[key]:
            raise SettingChanged(key, value, saved[key])
    return dict(saved)


def input_hashes(settings: dict, saved: dict | None) -> dict:
    """{"<input>_sha256": content hash} of the run's item files, refusing a resumed run whose files changed since its
    checkpoint (the same ids in an edited file would silently continue another run)."""
    from .predictions import file_sha256

    hashes = {}
    for key in ("injection", "mastered") if settings.get("guard") else ("injection",):
        if not settings.get(key):
            continue
        digest = file_sha256(settings[key])
        if saved is not None and saved.get(f"{key}_sha256") not in (None, digest):
            raise ValueError(f"--resume: {settings[key]} has changed since the checkpoint was written (its content "
                             "hash differs): resume with the same items, or start over with --overwrite")
        hashes[f"{key}_sha256"] = digest
    return hashes


def save(folder: str | os.PathLike, *, model, optimizer, guard, state: dict) -> None:
    """Write the adapter and the checkpoint (optimizer, guard, `state`) to `folder`, replacing it atomically."""
    import torch

    from ..tuner.atomic import staged_dir, write_text
    from .hf_trainer import GUARD_STATE_FILE, save_guard_state

    with staged_dir(folder) as staging:
        model.save_pretrained(staging, save_embedding_layers=False)
        checkpoint = staging / CHECKPOINT_DIR
        checkpoint.mkdir()
        try:
            torch.save(optimizer.state_dict(), checkpoint / OPTIMIZER_FILE)
        except RuntimeError as error:  # torch reports a short write, in practice a full disk, as "unexpected pos"
            raise OSError(errno.ENOSPC, f"short write ({str(error).splitlines()[0]})",
                          str(checkpoint / OPTIMIZER_FILE)) from None
        if guard is not None:
            save_guard_state(guard, checkpoint / GUARD_STATE_FILE)
        write_text(checkpoint / STATE_FILE, json.dumps(state, indent=1))


def restore(folder: str | os.PathLike, *, optimizer, guard) -> None:
    """Load the optimizer's (and the guard's) state saved by `save`; the adapter is loaded from `folder` itself."""
    import pickle

    import torch
    from safetensors import SafetensorError

    from .hf_trainer import GUARD_STATE_FILE, load_guard_state

    checkpoint = Path(folder) / CHECKPOINT_DIR
    try:
        state = torch.load(checkpoint / OPTIMIZER_FILE, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:  # a truncated or damaged file
        raise ValueError(f"{checkpoint / OPTIMIZER_FILE} is damaged ({str(error).splitlines()[0]}); train again "
                         "with --overwrite") from None
    optimizer.load_state_dict(state)
    if guard is not None:
        try:
            load_guard_state(guard, checkpoint / GUARD_STATE_FILE)
        except SafetensorError as error:
            raise ValueError(f"{checkpoint / GUARD_STATE_FILE} is damaged ({error}); train again with --overwrite"
                             ) from None
