"""CPL adapter folders on disk: what one holds (per module: weight shape, support size, index bytes), and loading one
onto a base model. Reads the files through the tuner's public codec (`decode_support`), never its private layout.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
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
    modules: list[ModuleFile]
    weights_bytes: int  # size of adapter_model.safetensors

    def total(self, attribute: str) -> int:
        return sum(getattr(module, attribute) for module in self.modules)


def _require_adapter(folder: Path, files: tuple[str, ...]) -> None:
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no adapter in {folder}: {name} is missing")


def describe_adapter(folder: str | os.PathLike) -> AdapterFiles:
    """Read a CPL adapter folder (as `save_pretrained` writes it) without loading a model.

    Raises FileNotFoundError when a file is missing, ValueError when the folder holds another kind of adapter or a
    damaged support record (the codec's CorruptRecordError).
    """
    from safetensors import safe_open

    from ..tuner.codec import decode_support

    folder = Path(folder)
    _require_adapter(folder, (CONFIG_FILE, WEIGHTS_FILE))
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("peft_type") != "CPL":
        raise ValueError(f"{folder} holds a {config.get('peft_type')} adapter, not a CPL one")
    modules = []
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as handle:
        for key in sorted(handle.keys()):
            if key.endswith(INDEX_SUFFIX):
                support = decode_support(handle.get_tensor(key)).support
                name = key.removesuffix(INDEX_SUFFIX).removeprefix("base_model.model.")
                index_bytes = handle.get_slice(key).get_shape()[0]
                modules.append(ModuleFile(name, tuple(support.shape), support.size, index_bytes))
    return AdapterFiles(folder, config, modules, (folder / WEIGHTS_FILE).stat().st_size)


def load_adapter(base, folder: str | os.PathLike, trainable: bool = False):
    """`PeftModel.from_pretrained(base, folder)` (CPL or any other PEFT adapter), refusing a folder without one."""
    from peft import PeftModel

    from .. import tuner  # noqa: F401  (registers CPL with PEFT)

    folder = Path(folder)
    _require_adapter(folder, (CONFIG_FILE,))
    return PeftModel.from_pretrained(base, folder, is_trainable=trainable)
