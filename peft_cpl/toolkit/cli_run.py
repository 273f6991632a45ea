"""`peft-cpl run`'s options: flags, or a YAML file of the same names, resolved into the settings of one run.

Light on purpose (no torch): the parser is built, and --help printed, before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from .data import MATCHES

# setting: default. A YAML config holds any of these (dashes or underscores); a flag given on the command line wins.
RUN_SETTINGS = {
    "model": "smollm2", "load_in_8bit": False, "load_in_4bit": False, "question_field": None, "answer_field": None,
    "match": "auto", "max_new_tokens": 16, "truncate": False, "show": 3, "target_modules": "all-linear",
    "density": None, "granularity": "element", "epochs": 3, "lr": 3e-4, "batch_size": 8, "seed": 0, "guard": True,
    "merge": False,
}
KINDS = {key: type(default) for key, default in RUN_SETTINGS.items() if default is not None} | {
    "density": float, "question_field": str, "answer_field": str}
PATH_SETTINGS = ("model",)  # resolved against the config file's folder when given there


def add_run_command(command: Callable, add_items: Callable, add_model: Callable, add_judge: Callable) -> None:
    run = command("run", "one command from a fact file to a report: split -> select -> train -> eval -> merge",
                  "Reads ITEMS and the model and does the whole workflow in OUTPUT: split/ (mastered and injection "
                  "by the model's answers), adapter/ (the selected support), trained/ (the adapter after each "
                  "epoch, with its checkpoint), optionally merged/, and report/: report.md, learning.png (learned "
                  "and forgotten after every epoch), selection.png, the predictions before and after, "
                  "settings.yaml (the exact settings, to rerun with --config) and log.txt (every step's output). "
                  "Settings come from flags or a YAML --config file with the same names. An interrupted run keeps "
                  "its finished steps: rerun with --resume to continue from the last complete epoch.")
    add_items(run)
    run.add_argument("--config", metavar="YAML", help="settings file (keys as the flags: model, epochs, lr, ...)")
    add_model(run, default=None, note=" (default: smollm2)")
    add_judge(run)
    for action in run._actions:  # None: not given, so that the config file or the default applies
        if action.dest in RUN_SETTINGS:
            action.default = None
    run.add_argument("--output", required=True, help="folder of the run (must not exist, unless --resume)")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the interrupted run in OUTPUT")
    mode.add_argument("--overwrite", action="store_true", help="delete an existing OUTPUT and start over")
    run.add_argument("--show", type=int, metavar="N",
                     help="replies to N wrongly answered facts in the log (default: 3)")
    run.add_argument("--target-modules", help="modules to train (default: all-linear)")
    run.add_argument("--density", type=float, help="cap on the support per weight, in (0, 1] (default: no cap)")
    run.add_argument("--granularity", choices=("element", "row"), help="(default: element)")
    run.add_argument("--epochs", type=_count, help="(default: 3)")
    run.add_argument("--lr", type=float, help="learning rate (default: 3e-4)")
    run.add_argument("--batch-size", type=_count, help="items per step (default: 8)")
    run.add_argument("--seed", type=int, help="order of the batches (default: 0)")
    run.add_argument("--guard", action=argparse.BooleanOptionalAction, default=None,
                     help="train with the collaborative guard (default: on: on 5 seeds of the benchmark it made CPL "
                     "forget fewer known facts than full fine-tuning; --no-guard trains in ~0.55x the time)")
    run.add_argument("--merge", action="store_true", default=None, help="also write the merged model to OUTPUT/merged")


def _count(value: str) -> int:
    if not value.lstrip("-").isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


def _read_config(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a YAML file ({str(error).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings (model: ..., epochs: ...), got "
                         f"{type(data).__name__}")
    config = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in RUN_SETTINGS:
            raise ValueError(f"{path}: unknown setting {key!r}; the settings are {', '.join(RUN_SETTINGS)}")
        kind = KINDS[name]
        if kind is float and isinstance(value, str):  # YAML reads 1e-2 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if value is not None and not _same_kind(value, kind):
            raise ValueError(f"{path}: {key} must be {'a number' if kind is float else kind.__name__}, got {value!r}")
        if name in PATH_SETTINGS and isinstance(value, str) and value != "smollm2":
            value = str((path.parent / value).resolve()) if not os.path.isabs(value) else value
        config[name] = value
    return config


def _same_kind(value: object, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)


def given_settings(args: argparse.Namespace) -> dict:
    """The settings given for this run: the config file's, and over them the flags given on the command line."""
    given = _read_config(Path(args.config)) if args.config else {}
    for key in RUN_SETTINGS:
        value = getattr(args, key, None)
        if value is not None:  # store_true flags are None when absent; --no-guard is a given False
            given[key] = str(Path(value).resolve()) if key in PATH_SETTINGS and value != "smollm2" else value
    return given


def resolve_settings(given: dict) -> dict:
    """All the settings of a run: `given` over RUN_SETTINGS, checked as the flags are."""
    settings = {key: given.get(key, default) for key, default in RUN_SETTINGS.items()}
    if settings["load_in_8bit"] and settings["load_in_4bit"]:
        raise ValueError("load_in_8bit and load_in_4bit exclude each other")
    for key in ("epochs", "batch_size", "max_new_tokens"):
        if settings[key] < 1:
            raise ValueError(f"{key} must be at least 1, got {settings[key]}")
    if settings["match"] not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(MATCHES)}, got {settings['match']!r}")
    if settings["granularity"] not in ("element", "row"):
        raise ValueError(f"granularity must be element or row, got {settings['granularity']!r}")
    if settings["density"] is not None and not 0 < settings["density"] <= 1:
        raise ValueError(f"density must be in (0, 1], got {settings['density']}")
    return settings
