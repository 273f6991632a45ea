"""peft-cpl: Collaborative Parameter Learning as a PEFT tuner (`peft_cpl.tuner`) and a toolkit around it
(`peft_cpl.toolkit`: data, evaluation, training loop, Trainer callback, CLI).

Importing this package registers the "CPL" method with PEFT, so `get_peft_model(model, CPLConfig(...))` and
`PeftModel.from_pretrained(base, cpl_adapter_dir)` work. Import it before loading a CPL adapter: PEFT has no plugin
entry points.

The import itself is light: the names below are loaded on first use, and the registration happens at once if peft is
already imported, else right after peft's own import (`_on_peft_import`). So `peft-cpl --help` and code that only
reads item files do not load torch or peft.
"""

from __future__ import annotations

import importlib

from . import _on_peft_import, _quiet

_quiet.install()  # before anything imports peft (which imports bitsandbytes)
_on_peft_import.register_cpl()

__version__ = "0.1.0"
_TOOLKIT_NAMES = {"CollaborativeGuardCallback": "peft_cpl.toolkit.hf_trainer"}


def __getattr__(name: str):
    """The public names of `peft_cpl.tuner` (its `__all__`) and the Trainer callback, imported on first use."""
    if name == "__all__":
        value = [*importlib.import_module("peft_cpl.tuner").__all__, *_TOOLKIT_NAMES]
    elif name in _TOOLKIT_NAMES:
        value = getattr(importlib.import_module(_TOOLKIT_NAMES[name]), name)
    elif name.startswith("_"):
        raise AttributeError(f"module 'peft_cpl' has no attribute {name!r}")
    else:
        tuner = importlib.import_module("peft_cpl.tuner")
        if name not in tuner.__all__:
            raise AttributeError(f"module 'peft_cpl' has no attribute {name!r}")
        value = getattr(tuner, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__getattr__("__all__")})
