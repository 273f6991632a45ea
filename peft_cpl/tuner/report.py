"""SelectionReport: what collaborative selection found, per module and overall."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import atomic

REPORT_FILE = "selection_report.json"


@dataclass
class ModuleSelection:
    """Counts for one targeted weight. collaborative + conflicting + zero_gradient == numel."""

    name: str
    numel: int
    collaborative: int  # s = g_M * g_I >= 0 and g_I != 0
    conflicting: int  # s < 0
    zero_gradient: int  # g_I == 0: the injection data does not move it
    support: int  # coordinates chosen (collaborative, capped by density)
    contribution: float  # S = sum of s over the weight
    mastered_sq: float  # |g_M|^2, for the cosine
    injection_sq: float  # |g_I|^2

    @property
    def collaborative_fraction(self) -> float:
        return self.collaborative / self.numel if self.numel else 0.0


@dataclass
class SelectionReport:
    adapter_name: str
    granularity: str
    density: float | None
    ranking: str
    mastered_examples: int
    injection_examples: int
    modules: list[ModuleSelection] = field(default_factory=list)

    def total(self, attribute: str) -> float:
        return sum(getattr(module, attribute) for module in self.modules)

    @property
    def cosine(self) -> float:
        """cos(g_M, g_I) over all targeted weights."""
        norm = math.sqrt(self.total("mastered_sq") * self.total("injection_sq"))
        return self.total("contribution") / norm if norm else 0.0

    def summary(self) -> dict:
        numel = self.total("numel") or 1
        return {
            "numel": int(self.total("numel")),
            "collaborative_fraction": self.total("collaborative") / numel,
            "conflicting_fraction": self.total("conflicting") / numel,
            "zero_gradient_fraction": self.total("zero_gradient") / numel,
            "support": int(self.total("support")),
            "support_fraction": self.total("support") / numel,
            "contribution": self.total("contribution"),
            "cosine": self.cosine,
        }

    def sentence(self) -> str:
        """The selection in one line: the collaborative and conflicting shares, cos(g_M, g_I), the support size."""
        total = self.summary()
        return (
            f"{total['collaborative_fraction']:.1%} of {total['numel']:,} targeted coordinates are collaborative, "
            f"{total['conflicting_fraction']:.1%} conflicting; cos(g_M, g_I) = {total['cosine']:+.3f}; "
            f"support {total['support']:,} values ({total['support_fraction']:.2%})"
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["summary"] = self.summary()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SelectionReport:
        fields = {key: value for key, value in data.items() if key not in ("modules", "summary")}
        return cls(**fields, modules=[ModuleSelection(**module) for module in data.get("modules", [])])

    def table(self) -> str:
        header = f"{'module':<48} {'numel':>10} {'collab':>7} {'conflict':>8} {'zero-g':>7} {'support':>10}"
        lines = [header, "-" * len(header)]
        for module in self.modules:
            numel = module.numel or 1
            lines.append(
                f"{module.name[-48:]:<48} {module.numel:>10,} {module.collaborative / numel:>7.1%} "
                f"{module.conflicting / numel:>8.1%} {module.zero_gradient / numel:>7.1%} {module.support:>10,}"
            )
        total = self.summary()
        lines.append("-" * len(header))
        lines.append(
            f"{'all targeted weights':<48} {total['numel']:>10,} {total['collaborative_fraction']:>7.1%} "
            f"{total['conflicting_fraction']:>8.1%} {total['zero_gradient_fraction']:>7.1%} {total['support']:>10,}"
        )
        lines.append(
            f"S = g_M.g_I = {total['contribution']:.4g}, cos(g_M, g_I) = {total['cosine']:+.3f}, from "
            f"{self.mastered_examples} mastered / {self.injection_examples} injection examples"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / REPORT_FILE
        atomic.write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SelectionReport:
        return cls.from_dict(json.loads((Path(directory) / REPORT_FILE).read_text()))

    def plot(self, path: str | os.PathLike) -> Path:
        """Figure of the collaborative share per module, saved as an image.

        Few modules: a stacked bar per module (collaborative / conflicting / zero gradient). Many modules in numbered
        layers (a transformer): the collaborative share per layer, one line per module type, beside the overall split
        per module type.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        by_layer = _group_by_layer(self.modules)
        if len(self.modules) <= 24 or by_layer is None:
            figure, axis = plt.subplots(figsize=(max(6, 0.3 * len(self.modules) + 2), 4))
            names = [m.name.removeprefix("base_model.model.") for m in self.modules]
            _stacked_bars(axis, names, self.modules)
        else:
            figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
            for kind, points in by_layer.items():
                layers = sorted(points)
                left.plot(layers, [points[i].collaborative_fraction for i in layers], marker=".", label=kind)
            left.set_xlabel("layer")
            left.set_ylabel("collaborative fraction (s >= 0)")
            left.set_ylim(0, 1)
            left.axhline(0.5, color="#999999", linewidth=0.8, linestyle=":")
            left.legend(fontsize=7, ncol=2)
            totals = [_total(kind, list(points.values())) for kind, points in by_layer.items()]
            _stacked_bars(right, list(by_layer), totals)
        share = self.total("collaborative") / max(self.total("numel"), 1)
        figure.suptitle(f"CPL selection: {share:.1%} collaborative, cos(g_M, g_I) = {self.cosine:+.3f}")
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path


def _group_by_layer(modules: list[ModuleSelection]) -> dict[str, dict[int, ModuleSelection]] | None:
    """{module type: {layer index: module}} when every name has a layer number, else None."""
    groups: dict[str, dict[int, ModuleSelection]] = {}
    for module in modules:
        match = re.search(r"\.(\d+)\.(?:.*\.)?([^.]+)$", module.name)
        if match is None:
            return None
        groups.setdefault(match.group(2), {})[int(match.group(1))] = module
    return groups


def _total(name: str, modules: list[ModuleSelection]) -> ModuleSelection:
    counts = [f.name for f in fields(ModuleSelection) if f.name != "name"]
    return ModuleSelection(name=name, **{key: sum(getattr(m, key) for m in modules) for key in counts})


def _stacked_bars(axis, names: list[str], modules: list[ModuleSelection]) -> None:
    collaborative = [m.collaborative_fraction for m in modules]
    conflicting = [m.conflicting / max(m.numel, 1) for m in modules]
    zero = [m.zero_gradient / max(m.numel, 1) for m in modules]
    positions = list(range(len(names)))
    axis.bar(positions, collaborative, label="collaborative (s >= 0)", color="#2a9d8f")
    axis.bar(positions, conflicting, bottom=collaborative, label="conflicting (s < 0)", color="#e76f51")
    axis.bar(positions, zero, bottom=[a + b for a, b in zip(collaborative, conflicting)], label="zero gradient",
             color="#bbbbbb")
    axis.set_ylabel("fraction of coordinates")
    axis.set_ylim(0, 1)
    axis.set_xticks(positions, names, rotation=90 if len(names) > 8 else 30, fontsize=7)
    axis.legend(loc="lower right", fontsize=7)
