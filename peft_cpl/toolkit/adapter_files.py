"""CPL adapter folders on disk: what one holds (per module: weight shape, support size, index bytes), and loading one
onto a base model. Reads the files through the tuner's public codec (`decode_support`), never its private layout.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
INDEX_SUFFIX = ".cpl_indices"


@dataclass(frozen=True)
class ModuleFile:
    """One targeted weight as the adapter file stores it."""

    name: str  # module name, without PEFT's "base_model.model." prefix
    shape: tuple[int, ...]  # of the weight
    support: int  # coordinates with a trained value
    index_bytes: int  # size of the compact support record

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class AdapterFiles:
    folder: Path
    config: dict  # adapter_config.json
    modules: list[ModuleFile]  # those whose index record decodes
    weights_bytes: int  # size of adapter_model.safetensors
    damaged: list[str] = field(default_factory=list)  # "module: what is wrong", the file's own checks failing
    non_finite: list[str] = field(default_factory=list)  # "module: ...", NaN / inf values saved as they were

    def total(self, attribute: str) -> int:
        return sum(getattr(module, attribute) for module in self.modules)


def _require_adapter(folder: Path, files: tuple[str, ...]) -> None:
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no adapter in {folder}: {name} is missing")


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is damaged: not JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is damaged: expected a JSON object")
    return config


def describe_adapter(folder: str | os.PathLike) -> AdapterFiles:
    """Read a CPL adapter folder (as `save_pretrained` writes it) without loading a model.

    Raises FileNotFoundError when a file is missing, ValueError when the folder holds another kind of adapter or a
    file that is not safetensors; modules whose records or values fail the file's own checksums are listed in
    `damaged` (the tuner's integrity checks), so a caller can show what is intact and say what is not.
    """
    from safetensors import SafetensorError, safe_open

    from ..tuner.integrity import VALUES_SUFFIX, non_finite_values, record_problem

    folder = Path(folder)
    _require_adapter(folder, (CONFIG_FILE, WEIGHTS_FILE))
    config = _read_config(folder)
    if config.get("peft_type") != "CPL":
        raise ValueError(f"{folder} holds a {config.get('peft_type')} adapter, not a CPL one")
    modules, damaged, non_finite = [], [], []
    try:
        with safe_open(folder / WEIGHTS_FILE, framework="pt") as handle:
            keys = set(handle.keys())
            for key in sorted(keys):
                module = key.removesuffix(INDEX_SUFFIX).removesuffix(VALUES_SUFFIX)
                name = module.removeprefix("base_model.model.")
                if key.endswith(VALUES_SUFFIX) and module + INDEX_SUFFIX not in keys:
                    damaged.append(f"{name}: values without an index record")
                if not key.endswith(INDEX_SUFFIX):
                    continue
                values = handle.get_tensor(module + VALUES_SUFFIX) if module + VALUES_SUFFIX in keys else None
                record, problem = record_problem(values, handle.get_tensor(key))
                if problem is not None:
                    damaged.append(f"{name}: {problem}")
                elif non_finite_values(values):
                    non_finite.append(f"{name}: {non_finite_values(values)} of {values.numel()} values are NaN or "
                                      "infinite (saved so: the training that made them diverged)")
                if record is not None:
                    index_bytes = handle.get_slice(key).get_shape()[0]
                    modules.append(ModuleFile(name, tuple(record.support.shape), record.support.size, index_bytes))
    except SafetensorError as error:
        raise ValueError(f"{folder / WEIGHTS_FILE} is truncated or corrupted ({error}): save the adapter again"
                         ) from None
    return AdapterFiles(folder, config, modules, (folder / WEIGHTS_FILE).stat().st_size, damaged, non_finite)


def load_adapter(base, folder: str | os.PathLike, trainable: bool = False):
    """`PeftModel.from_pretrained(base, folder)` (CPL or any other PEFT adapter), refusing a folder without one."""
    from peft import PeftModel
    from safetensors import SafetensorError

    from .. import tuner  # noqa: F401  (registers CPL with PEFT)

    folder = Path(folder)
    _require_adapter(folder, (CONFIG_FILE,))
    _read_config(folder)
    if not any((folder / name).is_file() for name in (WEIGHTS_FILE, "adapter_model.bin")):
        raise FileNotFoundError(f"no adapter weights in {folder}: {WEIGHTS_FILE} is missing (PEFT would look for "
                                "the folder's name on the Hub instead)")
    try:
        return PeftModel.from_pretrained(base, folder, is_trainable=trainable)
    except SafetensorError as error:
        raise ValueError(f"{folder / WEIGHTS_FILE} is truncated or corrupted ({error}): save the adapter again"
                         ) from None
