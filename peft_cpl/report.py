"""SelectionReport: what collaborative selection found, per module and overall."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
        """Write selection_report.json atomically (temp file + rename)."""
        path = Path(directory) / REPORT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=".selection-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(self.to_dict(), stream, indent=1)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SelectionReport:
        return cls.from_dict(json.loads((Path(directory) / REPORT_FILE).read_text()))

    def plot(self, path: str | os.PathLike) -> Path:
        """Bar chart of the collaborative / conflicting / zero-gradient split per module, saved as an image."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [module.name.removeprefix("base_model.model.") for module in self.modules]
        collaborative = [m.collaborative / max(m.numel, 1) for m in self.modules]
        conflicting = [m.conflicting / max(m.numel, 1) for m in self.modules]
        zero = [m.zero_gradient / max(m.numel, 1) for m in self.modules]
        figure, axis = plt.subplots(figsize=(max(6, 0.18 * len(names) + 2), 4))
        positions = range(len(names))
        axis.bar(positions, collaborative, label="collaborative (s >= 0)", color="#2a9d8f")
        axis.bar(positions, conflicting, bottom=collaborative, label="conflicting (s < 0)", color="#e76f51")
        bottoms = [a + b for a, b in zip(collaborative, conflicting)]
        axis.bar(positions, zero, bottom=bottoms, label="zero gradient", color="#bbbbbb")
        axis.set_ylabel("fraction of coordinates")
        axis.set_ylim(0, 1)
        axis.set_title(f"CPL selection: cos(g_M, g_I) = {self.cosine:+.3f}")
        axis.set_xticks(list(positions), names, rotation=90, fontsize=6)
        axis.legend(loc="lower right", fontsize=7)
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path
