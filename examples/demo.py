"""What `make demo` runs: the device's main job on the embedded default, end to end.

A local mosquitto, the daemon (`edge-sdk serve`) on the CPU backend, and an app that asks through
the Python SDK and streams the answer — the same path robot firmware takes. Usage:

    python examples/demo.py ENGINE_PACKAGE
"""

from __future__ import annotations

import subprocess
import sys

from edge_sdk.client import Client
from edge_sdk.serve.broker import Mosquitto


def main(package: str) -> int:
    broker = Mosquitto().start()
    print(f"mosquitto listening on {broker.host}:{broker.port}")
    daemon = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "serve", package, "--host", broker.host,
                               "--port", str(broker.port), "--device-id", "demo"])
    try:
        with Client(host=broker.host, port=broker.port, device_id="demo", status_wait=60) as client:
            caps = client.capabilities()
            print(f"device 'demo' serves {caps.model.name}, context {caps.model.context_length} tokens")
            question = "Where is the charging dock?"
            print(f"> {question}")
            stream = client.chat([{"role": "system", "content": "You are a warehouse robot."},
                                  {"role": "user", "content": question}],
                                 max_tokens=48, temperature=0.7, seed=0, stream=True)
            for delta in stream:
                print(delta.text, end="", flush=True)
            r = stream.result
            print(f"\n[{r.finish_reason}: {r.usage.completion_tokens} tokens, first token "
                  f"{r.usage.time_to_first_token_ms:.1f} ms, {r.usage.tokens_per_s:.0f} tok/s through MQTT]")
            print("(the tiny demo model has random weights: the words are noise, every stage is real)")
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
