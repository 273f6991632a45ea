"""peft-cpl: Collaborative Parameter Learning as a PEFT tuner (`peft_cpl.tuner`) and a toolkit around it
(`peft_cpl.toolkit`: data, evaluation, training loop, Trainer callback, CLI).

Importing this package registers the "CPL" method with PEFT, so `get_peft_model(model, CPLConfig(...))` and
`PeftModel.from_pretrained(base, cpl_adapter_dir)` work. Import it before loading a CPL adapter: PEFT has no plugin
entry points.
"""

from . import _quiet

_quiet.install()  # before anything imports peft (which imports bitsandbytes)

from .toolkit.hf_trainer import CollaborativeGuardCallback  # noqa: E402
from .tuner import *  # noqa: E402, F403
from .tuner import __all__ as _tuner_all  # noqa: E402

__all__ = [*_tuner_all, "CollaborativeGuardCallback"]
__version__ = "0.1.0"
