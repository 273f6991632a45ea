"""The CPL tuner, laid out like PEFT's own tuners: it could be copied into PEFT as `peft/tuners/cpl/`.

The algorithm is in three files: selection.py (gradients -> support), guard.py (update -> masked update) and
layer.py (support + values -> output). Around them: config, the delta math (functional.py), supports and their scores
(support.py, scoring.py), the on-disk codec, the PEFT model (dispatch, save/load), merges and the bitsandbytes
backend. Importing this package registers "CPL" with PEFT.
"""

from ._registration import register
from .adapters import AdapterSupport, cpl_layers, export_support, resolve_adapter, restore_support
from .config import CPLConfig
from .guard import CollaborativeGuard, GuardHandle
from .layer import CPLLayer, Embedding, Linear
from .merge import MergeReport, ModuleMerge, merge_and_report, merge_into_float
from .model import CPLModel
from .report import ModuleSelection, SelectionReport
from .selection import select_collaborative
from .support import Support

register()

__all__ = [
    "AdapterSupport",
    "CPLConfig",
    "CPLLayer",
    "CPLModel",
    "CollaborativeGuard",
    "Embedding",
    "GuardHandle",
    "Linear",
    "MergeReport",
    "ModuleMerge",
    "ModuleSelection",
    "SelectionReport",
    "Support",
    "cpl_layers",
    "export_support",
    "merge_and_report",
    "merge_into_float",
    "resolve_adapter",
    "restore_support",
    "select_collaborative",
]
