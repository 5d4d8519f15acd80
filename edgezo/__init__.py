"""edgezo: private on-device fine-tuning with zeroth-order optimisation on ONNX Runtime.

The runtime never imports torch. Main entry points::

    from edgezo.config import FinetuneConfig
    from edgezo.train import finetune
    summary = finetune(FinetuneConfig(bundle="bundle/", data="notes.jsonl", steps=100))

    from edgezo import Personalizer        # for an app: background fit, pause, cancel, score
    p = Personalizer("bundle/", "laptop-cpu", app_dir="app-state/").fit(examples)
"""

__version__ = "0.1.0"

__all__ = ["FinetuneConfig", "Personalizer", "Progress", "finetune"]

_LAZY = {"Personalizer": "app", "Progress": "app", "FinetuneConfig": "config", "finetune": "train"}


def __getattr__(name: str):
    """Import the public names on first use: ``import edgezo`` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'edgezo' has no attribute {name!r}")
