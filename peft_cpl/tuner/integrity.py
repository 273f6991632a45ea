"""Is a saved CPL adapter intact? Damage to the file (a flipped byte, a truncation) told apart from a base mismatch.

Every index record carries a CRC32 of its own payload and of its module's values (see codec.py), so a change of any
byte of either is found here, module by module, before any model is touched. What this module says is "the file is
damaged"; whether an intact file fits a base model is `CPLModel`'s check at load time.
"""

from __future__ import annotations

import os

import torch

from .codec import CorruptRecordError, SupportRecord, decode_support, tensor_crc32

WEIGHTS_FILE = "adapter_model.safetensors"
VALUES_SUFFIX, INDEX_SUFFIX = ".cpl_values", ".cpl_indices"


def non_finite_values(values: torch.Tensor) -> int:
    """How many values are NaN or infinite (saved so: the training that made them diverged)."""
    return int((~torch.isfinite(values.float())).sum()) if values.is_floating_point() else 0


def record_problem(
    values: torch.Tensor | None, record: torch.Tensor | None
) -> tuple[SupportRecord | None, str | None]:
    """Decode one module's record and check its values against it: (record, None) or (record or None, damage)."""
    if record is None:
        return None, "values without an index record"
    try:
        decoded = decode_support(record)
    except CorruptRecordError as error:
        return None, f"corrupted index record (it does not decode: {error})"
    if values is None:
        return decoded, "index record without values"
    if values.dim() != 1 or values.numel() != decoded.support.size:
        return decoded, f"{values.numel()} values for the {decoded.support.size} coordinates its index record declares"
    if tensor_crc32(values) != decoded.values_crc:
        bad = non_finite_values(values)
        detail = f", {bad} of them not finite" if bad else ""
        return decoded, f"values checksum mismatch: the {values.numel()} values are not those that were saved{detail}"
    return decoded, None


def file_problems(path: str | os.PathLike) -> list[str]:
    """'module: what is wrong' for every damaged module of a CPL adapter file (empty when intact).

    Raises the SafetensorError / OSError of a file that is not readable safetensors at all (truncated header).
    """
    from safetensors import safe_open

    modules: dict[str, dict[str, str]] = {}
    with safe_open(os.fspath(path), framework="pt") as handle:
        keys = list(handle.keys())
        for key in keys:
            for suffix in (VALUES_SUFFIX, INDEX_SUFFIX):
                if key.endswith(suffix):
                    modules.setdefault(key.removesuffix(suffix), {})[suffix] = key
        problems = []
        for module, found in sorted(modules.items()):
            values = handle.get_tensor(found[VALUES_SUFFIX]) if VALUES_SUFFIX in found else None
            record = handle.get_tensor(found[INDEX_SUFFIX]) if INDEX_SUFFIX in found else None
            _, problem = record_problem(values, record)
            if problem is not None:
                problems.append(f"{module.removeprefix('base_model.model.')}: {problem}")
    return problems


def damage_message(path: str | os.PathLike, problems: list[str]) -> str:
    """One line: which file, which modules, what to do."""
    listed = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else "")
    return (
        f"the CPL adapter file {os.fspath(path)} is damaged (changed after it was saved, e.g. a disk or copy error; "
        f"the base model is not the cause): {listed}. Nothing was loaded; save the adapter again or restore the "
        "file from a copy."
    )


def check_adapter_file(directory: str | os.PathLike) -> None:
    """Fail early, before any model is touched, when a local adapter file is truncated, altered or not safetensors."""
    from safetensors import SafetensorError

    path = os.path.join(os.fspath(directory), WEIGHTS_FILE)
    if not os.path.isfile(path):
        return
    try:
        problems = file_problems(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"The CPL adapter file {path} is truncated or corrupted ({error}). Nothing was loaded; save the adapter "
            "again or restore the file from a copy."
        ) from error
    if problems:
        raise ValueError(damage_message(path, problems))
