"""edge_sdk: build, run and serve Ministral 3 on Jetson-class GPUs and CPUs, offline.

`edge_sdk.load(path)` runs an engine package in-process; `edge_sdk.Client` / `AsyncClient` talk
to the on-device daemon over MQTT. Both are imported on first use, so `import edge_sdk` is cheap.
"""

__version__ = "0.1.0"

__all__ = ["load", "Client", "AsyncClient", "discover", "__version__"]


def __getattr__(name):
    if name == "load":
        from .runtime.model import load

        return load
    if name in ("Client", "AsyncClient", "discover"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'edge_sdk' has no attribute {name!r}")
