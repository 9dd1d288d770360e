"""Fixed-budget CLIP training (DataComp's recipe) and the offline scorer model trained the same way.

Names are loaded on first use (PEP 562), so that importing the package, as the command line does to register its
commands, does not import torch.
"""

import importlib

_EXPORTS = {
    "SCALES": "config", "Scale": "config", "TrainConfig": "config", "scale_config": "config",
    "TrainResult": "loop", "read_metrics": "loop", "train": "loop", "lr_at": "schedule",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
