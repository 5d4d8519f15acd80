"""Federated personalisation that exchanges only seeds and scalars (FedKSeed-style).

The core (:mod:`.protocol`, :mod:`.model`, :mod:`.server`, :mod:`.client`, :mod:`.loop`) does
not import Flower; :mod:`.flower_apps` adapts it to Flower's Message API (``ClientApp`` /
``ServerApp``) and imports ``flwr`` when used (``pip install 'edgezo[federated]'``).
"""

from .client import FederationClient, split_examples
from .protocol import FedSettings, Rejected
from .server import FederationServer

__all__ = ["FedSettings", "FederationClient", "FederationServer", "Rejected", "split_examples"]
