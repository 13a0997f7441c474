"""The MQTT daemon (``edge-sdk serve``): topics and payloads (protocol.py, PROTOCOL.md),
settings (config.py), the daemon (daemon.py), the benchmark (bench.py) and a private mosquitto
runner for tests and benchmarks (broker.py).

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
