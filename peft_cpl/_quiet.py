"""Silence the one notice that optional bitsandbytes kernels print at import, on machines where it does not apply.

`import peft` imports bitsandbytes whenever it is installed (peft/helpers.py), and bitsandbytes 0.50 on an
AVX512-BF16 CPU then logs "Failed to load CPU gemm_4bit_forward from kernels-community" unless the optional `kernels`
package can fetch that kernel (never offline). It falls back to its own CPU kernel, and CPL never calls that kernel
anyway: it keeps 4-bit weights in the canonical layout (tuner/bnb.py). This module imports nothing, so the filter is
in place before peft is imported.
"""

from __future__ import annotations

import logging
import warnings

KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


class _DropKernelsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KERNELS_NOTICE)


def install() -> None:
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(existing, _DropKernelsNotice) for existing in logger.filters):
        logger.addFilter(_DropKernelsNotice())


def quiet_programs() -> None:
    """For our programs (CLI, demo), not for the library: peft asks transformers 5 for `is_gradient_checkpointing`,
    which warns a FutureWarning on every get_peft_model that the user can do nothing about."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
