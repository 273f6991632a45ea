"""Atomic writes: a reader (or a crash) never sees a half-written file or folder, and what was there survives a
failed write."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write; it becomes `path` by one rename when the block
    succeeds and is removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temp)
        os.chmod(temp, path.stat().st_mode if path.exists() else _new_file_mode())  # mkstemp makes it 0600
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _new_file_mode() -> int:
    return 0o666 & ~_umask()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """An empty folder next to `target` that replaces it (by renames) when the block succeeds; on failure it is
    removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700; the folder it becomes gets the user's umask
        yield staging
        for path in staging.rglob("*"):  # every file in it is new; some writers (safetensors) make theirs 0600
            if not path.is_symlink():
                os.chmod(path, 0o777 & ~_umask() if path.is_dir() else _new_file_mode())
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if target.exists():
            target.rename(old)
        try:
            staging.rename(target)
        except BaseException:
            if old.exists():
                old.rename(target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
