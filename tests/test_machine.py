"""Behaviour that depends on the machine (CPU flags, thread count, optional packages), tested rather than assumed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_cpl import _quiet

ROOT = Path(__file__).resolve().parents[1]


def test_the_optional_kernels_notice_of_bitsandbytes_is_dropped_and_nothing_else():
    # bitsandbytes logs this at import on AVX512-BF16 CPUs without the optional `kernels` package (peft imports it)
    logger = logging.getLogger(_quiet.BNB_CPU_LOGGER)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    level = logger.level
    logger.setLevel(logging.WARNING)  # an example may have quietened bitsandbytes' loggers
    logger.addHandler(handler)
    try:
        logger.warning(_quiet.KERNELS_NOTICE + ": %s. Please make sure you already `pip install kernels`", "No module")
        logger.warning("some other bitsandbytes warning")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == ["some other bitsandbytes warning"]


def test_importing_the_library_and_cli_help_print_no_warning():
    for command in (["-c", "import peft_cpl"], ["-m", "peft_cpl.toolkit.cli", "--help"]):
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", (command, done.stderr)


@pytest.mark.skipif(os.environ.get("PEFT_CPL_MACHINE_VARIANT") == "1", reason="already the variant run")
def test_the_quantized_and_numeric_tests_pass_on_other_cpu_kernels_and_one_thread():
    """Rerun the machine-sensitive tests with torch's generic CPU kernels (no AVX2/AVX512) and a single thread.

    bitsandbytes picks its CPU dequantization kernel from torch's CPU capability, and float tolerances depend on the
    reduction order that the thread count sets; CI machines differ in both. The 4-bit layout bitsandbytes uses on
    AVX512-BF16 CPUs is forced in tests/test_quantized.py on every machine.
    """
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "PEFT_CPL_MACHINE_VARIANT": "1"}
    tests = ["tests/test_quantized.py", "tests/test_quantized_selection.py", "tests/test_functional.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
