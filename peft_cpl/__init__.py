"""peft-cpl: Collaborative Parameter Learning as a PEFT tuner.

Importing this package registers the "CPL" method with PEFT, so `get_peft_model(model, CPLConfig(...))` and
`PeftModel.from_pretrained(base, cpl_adapter_dir)` work. Import it before loading a CPL adapter.
"""

from ._registration import register

register()

from .config import CPLConfig  # noqa: E402
from .layer import CPLLayer, Embedding, Linear  # noqa: E402
from .model import CPLModel  # noqa: E402

__all__ = ["CPLConfig", "CPLLayer", "CPLModel", "Embedding", "Linear"]
__version__ = "0.1.0"
