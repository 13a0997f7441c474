"""The MQTT daemon (``edge-sdk serve``): one request walks transport -> admission -> scheduler ->
worker -> events (see daemon.py for the map); settings in config.py, watch jobs, cameras,
snapshots and the housekeeper beside them, a private mosquitto runner for tests and benchmarks in
broker.py. The wire contract is edge_sdk.protocol.

Importing this package is cheap; the daemon loads on first use of ``Daemon`` / ``serve``.
"""

from __future__ import annotations


def __getattr__(name):
    if name in ("Daemon", "serve"):
        from edge_sdk.serve import daemon, cli
        return daemon.Daemon if name == "Daemon" else cli.serve
    if name == "ServeSettings":
        from edge_sdk.serve.config import ServeSettings
        return ServeSettings
    raise AttributeError(name)
