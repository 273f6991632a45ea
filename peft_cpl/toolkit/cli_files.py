"""The CLI's side of the user's files: CLIError, outputs checked to be writable before any compute, and written whole.

Nothing is written half-way: an output folder is built in a temporary folder next to its target and renamed into
place, a file is written beside its target and renamed, and an existing output is only replaced with --overwrite.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class CLIError(Exception):
    """A mistake in what the user asked for: printed as `error: ...`, exit status 2."""


def check_writable(path: Path) -> None:
    """Refuse, before any compute, an output that cannot be created: checked by writing a scratch file in the
    nearest existing folder above it (file permissions alone do not tell, e.g. for root or a read-only mount)."""
    import tempfile

    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"cannot write {path}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise CLIError(f"cannot write {path}: {parent} is not writable ({error.strerror or error})") from None


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless `overwrite`, and anything there that is not a folder."""
    if path.exists() and not overwrite:
        raise CLIError(f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise CLIError(f"{path} exists and is not a folder")
    check_writable(path)


def check_file(path: str | os.PathLike | None, overwrite: bool) -> None:
    if path and Path(path).exists() and not overwrite:
        raise CLIError(f"{path} already exists; pass --overwrite to replace it")
    if path:
        check_writable(Path(path))


@contextmanager
def staged_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """`atomic.staged_dir`, refusing an existing target unless `overwrite`."""
    from ..tuner import atomic

    check_output(target, overwrite)
    with atomic.staged_dir(target) as staging:
        yield staging
