"""The objects ``flwr run`` loads (``[tool.flwr.app.components]``); they import Flower.

Their settings come from the run config (``[tool.flwr.app.config]``, ``--run-config``) and each
SuperNode's ``--node-config`` (see :mod:`edgezo.federated.flower_apps`).
"""

from .flower_apps import make_client_app, make_server_app

server_app = make_server_app()
client_app = make_client_app()
