"""CPLConfig: which weights get a sparse delta, and how its support is chosen."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft.config import PeftConfig
from peft.utils import PeftType

SUPPORTS = ("collaborative", "random", "magnitude", "dense")
GRANULARITIES = ("element", "row")
INDEX_STORAGES = ("compact", "int32")
DELTA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CPLConfig(PeftConfig):
    """Configuration of a Collaborative Parameter Learning (CPL) adapter.

    CPL trains a sparse delta on each targeted weight: values live only at "support" coordinates; all other
    coordinates stay frozen and cost no gradient or optimizer memory. With the default `support="collaborative"` the
    support is empty until `peft_cpl.select_collaborative` fills it with the coordinates whose gradient contributions
    on mastered and injection data agree (s = g_M * g_I >= 0), which is the paper's setting; `density=None` keeps
    every collaborative coordinate, as the paper does.

    Args:
        target_modules (`Union[list[str], str]`):
            Module names (suffix match), a regex, or "all-linear" (every Linear / Conv1D except the output head).
            `nn.Linear`, transformers `Conv1D`, `nn.Embedding` and bitsandbytes 8-bit / 4-bit linears are supported.
        exclude_modules (`Optional[Union[list[str], str]]`):
            Module names or regex to leave untouched.
        layers_to_transform (`Optional[Union[list[int], int]]`):
            Only adapt these layer indices.
        layers_pattern (`Optional[Union[list[str], str]]`):
            Name of the layer list (e.g. "layers"), used with `layers_to_transform`.
        modules_to_save (`Optional[list[str]]`):
            Modules trained in full and saved with the adapter (e.g. a new classification head).
        support (`str`):
            How the trainable coordinates are chosen: "collaborative" (from gradients, by `select_collaborative`),
            "random" (uniform, seeded; SHiRA-like), "magnitude" (largest |W|; Super-Tuning-like) or "dense" (every
            coordinate, for comparison with full fine-tuning).
        density (`Optional[float]`):
            Fraction of each targeted weight's coordinates that may be trained, in (0, 1]. Required for "random" and
            "magnitude"; an optional cap for "collaborative" (None keeps every collaborative coordinate); must be
            None or 1 for "dense".
        granularity (`str`):
            "element" chooses single coordinates; "row" chooses whole output rows (neurons), which trains through a
            fast row path and stores almost no index data.
        seed (`int`):
            Seed of the "random" support.
        delta_dtype (`str`):
            dtype of the trained values ("float32", "bfloat16", "float16"). float32 keeps small updates exact on
            half-precision bases; the base weight keeps its own dtype.
        index_storage (`str`):
            How a layer keeps an element support in memory: "compact" (a bitmask from density 1/4 up, 16-bit block
            offsets below: 0.21 bytes per trained value at density 0.6, 0.42 at 0.3, about 2 below 0.25) or "int32"
            (4 bytes per value, as 0.1.0 did; a few percent faster per layer on CPU at the bitmask's densities,
            where expanding it reads the whole weight's bits). Row supports always keep their row ids only; the
            file format is the same.
    """

    target_modules: list[str] | str | None = field(
        default="all-linear",
        metadata={"help": "Module names, a regex, or 'all-linear'. None uses PEFT's per-architecture default."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex to exclude from targeting."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter."}
    )
    support: Literal["collaborative", "random", "magnitude", "dense"] = field(
        default="collaborative",
        metadata={"help": f"How trainable coordinates are chosen, one of {SUPPORTS}."},
    )
    density: float | None = field(
        default=None,
        metadata={"help": "Fraction of each weight's coordinates that may be trained, in (0, 1]."},
    )
    granularity: Literal["element", "row"] = field(
        default="element", metadata={"help": f"Unit of the support, one of {GRANULARITIES}."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the 'random' support."})
    delta_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": f"dtype of the trained values, one of {tuple(DELTA_DTYPES)}."}
    )
    index_storage: Literal["compact", "int32"] = field(
        default="compact", metadata={"help": f"In-memory form of element supports, one of {INDEX_STORAGES}."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.CPL
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        _check_choice("support", self.support, SUPPORTS)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("delta_dtype", self.delta_dtype, tuple(DELTA_DTYPES))
        _check_choice("index_storage", self.index_storage, INDEX_STORAGES)
        if self.density is not None:
            if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
                raise ValueError(f"CPLConfig.density must be a number in (0, 1] or None, got {self.density!r}.")
            if not 0.0 < float(self.density) <= 1.0:
                raise ValueError(f"CPLConfig.density must be in (0, 1] or None, got {self.density}.")
            self.density = float(self.density)
        if self.support in ("random", "magnitude") and self.density is None:
            raise ValueError(
                f"CPLConfig.density is required for support='{self.support}': give the fraction of coordinates to "
                "train, e.g. density=0.1."
            )
        if self.support == "dense" and self.density not in (None, 1.0):
            raise ValueError(f"CPLConfig.density must be None or 1 for support='dense', got {self.density}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"CPLConfig.seed must be an int, got {self.seed!r}.")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("CPLConfig.layers_pattern only applies together with layers_to_transform.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """PEFT's loader, plus an integrity check of a local adapter file before the model is modified."""
        from .integrity import check_adapter_file
        from .report import REPORT_FILE, SelectionReport

        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        directory = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        check_adapter_file(directory)
        if os.path.isfile(os.path.join(directory, REPORT_FILE)):
            config.selection_report = SelectionReport.load(directory)
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's writer, plus the selection report (if any) next to adapter_config.json."""
        super().save_pretrained(save_directory, **kwargs)
        report = getattr(self, "selection_report", None)
        if report is not None:
            report.save(save_directory)

    @property
    def torch_delta_dtype(self) -> torch.dtype:
        return DELTA_DTYPES[self.delta_dtype]


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"CPLConfig.{name} must be one of {allowed}, got {value!r}.")
