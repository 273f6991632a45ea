"""The CLI's side of the user's files: CLIError, the predictions files it reads, and outputs written whole.

Nothing is written half-way: an output folder is built in a temporary folder next to its target and renamed into
place, a file is written beside its target and renamed, and an existing output is only replaced with --overwrite.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class CLIError(Exception):
    """A mistake in what the user asked for: printed as `error: ...`, exit status 2."""


def read_predictions(path: str | os.PathLike) -> dict[str, bool]:
    """{item id: correct}, as `--save-predictions` writes it."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"no such predictions file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CLIError(f"{path}: not JSON ({error})") from None
    if not isinstance(data, dict) or not all(isinstance(value, bool) for value in data.values()):
        raise CLIError(f"{path}: expected {{item id: true/false}}, as written by --save-predictions")
    return data


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless `overwrite`, and anything there that is not a folder."""
    if path.exists() and not overwrite:
        raise CLIError(f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise CLIError(f"{path} exists and is not a folder")


def check_file(path: str | os.PathLike | None, overwrite: bool) -> None:
    if path and Path(path).exists() and not overwrite:
        raise CLIError(f"{path} already exists; pass --overwrite to replace it")


@contextmanager
def staged_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """`atomic.staged_dir`, refusing an existing target unless `overwrite`."""
    from ..tuner import atomic

    check_output(target, overwrite)
    with atomic.staged_dir(target) as staging:
        yield staging


def write_json(path: str | os.PathLike, data: object) -> None:
    from ..tuner import atomic

    atomic.write_text(path, json.dumps(data, indent=1))
