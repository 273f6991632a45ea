"""Register CPL with PEFT as soon as peft is imported, without importing peft (and torch) ourselves.

`import peft_cpl` used to import the whole tuner to register "CPL" with PEFT, which costs seconds even where no model
is ever built (the CLI's --help). Registration only matters once peft is imported, so: if it already is, register
now; otherwise put a finder on `sys.meta_path` that, when peft is first imported (by anyone), lets the import finish
and then imports `peft_cpl.tuner`, which registers CPL. The finder removes itself at that point, and it changes
nothing else about how peft is found or loaded.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

TARGET = "peft"


def _register() -> None:
    importlib.import_module("peft_cpl.tuner")  # its __init__ registers CPL (tuner/_registration.py)


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        _remove_finder()
        for finder in sys.meta_path:  # the spec the import would have used anyway
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module):
            try:
                original(module)
            finally:
                del loader.exec_module  # back to the loader's own method
            _register()

        loader.exec_module = exec_module
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _AfterPeftImport)]


def register_cpl() -> None:
    """Register CPL with PEFT now if peft is imported, else right after its import."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterPeftImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())
