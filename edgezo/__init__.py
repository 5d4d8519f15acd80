"""edgezo: private on-device fine-tuning with zeroth-order optimisation on ONNX Runtime.

The runtime never imports torch. Main entry points::

    from edgezo.config import FinetuneConfig
    from edgezo.train import finetune
    summary = finetune(FinetuneConfig(bundle="bundle/", data="notes.jsonl", steps=100))
"""

__version__ = "0.1.0"
