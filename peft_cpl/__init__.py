"""peft-cpl: Collaborative Parameter Learning as a PEFT tuner.

Importing this package registers the "CPL" method with PEFT, so `get_peft_model(model, CPLConfig(...))` and
`PeftModel.from_pretrained(base, cpl_adapter_dir)` work. Import it before loading a CPL adapter: PEFT has no plugin
entry points.
"""

from . import _quiet

_quiet.install()  # before anything imports peft (which imports bitsandbytes)

from ._registration import register  # noqa: E402

register()

from .config import CPLConfig  # noqa: E402
from .guard import CollaborativeGuard, GuardedOptimizer  # noqa: E402
from .layer import CPLLayer, Embedding, Linear  # noqa: E402
from .model import CPLModel  # noqa: E402
from .report import ModuleSelection, SelectionReport  # noqa: E402
from .selection import select_collaborative  # noqa: E402
from .trainer import CollaborativeGuardCallback  # noqa: E402

__all__ = [
    "CPLConfig",
    "CPLLayer",
    "CPLModel",
    "CollaborativeGuard",
    "CollaborativeGuardCallback",
    "Embedding",
    "GuardedOptimizer",
    "Linear",
    "ModuleSelection",
    "SelectionReport",
    "select_collaborative",
]
__version__ = "0.1.0"
