"""edge_sdk: build, run and serve Ministral 3 on Jetson-class GPUs and CPUs, offline."""

__version__ = "0.1.0"
