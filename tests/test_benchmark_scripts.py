"""The benchmark scripts that need no downloaded model run end to end on tiny settings, so they cannot rot.

(perf.py needs the real SmolLM2 and knowledge_injection/ has its own --quick test.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str) -> str:
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout


def test_index_bytes_prints_a_row_per_support_and_density_beside_shira():
    text = run_script("index_bytes.py", "--layers", "1", "--densities", "0.1", "1.0")
    assert re.search(r"PEFT SHiRA r=32 .* 1[0-9]\.\d\d B/coord in the file, of which indices 8\.00", text)
    rows = re.findall(r"^(random|magnitude|rows)\s+(\d\.\d\d)\s+[\d,]+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", text, re.M)
    assert [(label, density) for label, density, *_ in rows] == [
        ("random", "0.10"), ("random", "1.00"), ("magnitude", "0.10"), ("magnitude", "1.00"), ("rows", "0.10"),
        ("rows", "1.00"),
    ]
    by_key = {(label, density): (float(file), float(values), float(index)) for label, density, file, values, index
              in rows}
    assert by_key[("random", "1.00")][2] == 0.0  # a dense support stores no indices
    assert 0.5 < by_key[("random", "0.10")][2] < 0.7  # near the entropy bound, 0.586 B at 10%
    assert by_key[("rows", "0.10")][2] < 0.05


def test_strategies_times_every_strategy():
    text = run_script("strategies.py", "--tokens", "8", "--densities", "0.1", "--shapes", "32x16", "--repeats", "1")
    header = next(line for line in text.splitlines() if "density" in line)
    for strategy in ("fold bitmask", "fold blocked", "fold int32", "additive", "row", "gather", "csr"):
        assert strategy in header
    assert re.search(r"^\s*32x16\s+0\.1(\s+[\d.]+){4,}", text, re.M), text


def test_memory_table_covers_every_setting_of_a_config(tmp_path):
    text = run_script("memory_table.py", "--configs", str(ROOT / "benchmarks/configs/qwen2.5-1.5b.json"),
                      "--densities", "0.6", "--output", str(tmp_path / "table.md"))
    rows = [line for line in text.splitlines() if line.startswith("| qwen2.5-1.5b")]
    assert len(rows) == 3 * 2 * 2  # bases x optimizers x fused
    per_value = {tuple(cell.strip() for cell in row.split("|")[3:6]): float(row.split("|")[6]) for row in rows}
    assert per_value[("bf16", "adamw8bit", "yes")] <= 6.5 and per_value[("bf16", "adamw", "yes")] <= 12.5
    assert per_value[("bf16", "adamw", "no")] <= 16.5
    assert (tmp_path / "table.md").read_text() == text.rstrip("\n") + "\n"
