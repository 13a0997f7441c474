"""``discover``: the devices announced on a broker, from their retained status and capabilities."""

from __future__ import annotations

import json
import time
from typing import Any

from edge_sdk.client.errors import BrokerConnectionError
from edge_sdk.client.settings import ConnectionSettings
from edge_sdk.mqtt_common import make_client, new_client_id
from edge_sdk.protocol.topics import Topics


def discover(host: str = "localhost", port: int = 1883, *, timeout: float = 1.0,
             settings: ConnectionSettings | None = None, **options: Any) -> dict[str, dict]:
    """Devices announced under the prefix: device id -> capabilities dict plus its 'status'.
    Reads the retained ``P/v1/+/capabilities`` and ``P/v1/+/status`` for ``timeout`` seconds.
    ``options``: ``ConnectionSettings`` fields (``prefix``, ``username``, ``password``, TLS...),
    or pass ``settings`` whole."""
    st = settings or ConnectionSettings(host=host, port=port, **options)
    found: dict[str, dict] = {}
    c = make_client(new_client_id("edge-sdk-discover"), **st.broker_kwargs())
    t = Topics(st.prefix, "x")

    def on_connect(client, userdata, flags, rc, props):
        if not rc.is_failure:
            client.subscribe([(t.all_devices("capabilities"), 1), (t.all_devices("status"), 1)])

    def on_message(client, userdata, msg):
        parts = msg.topic.split("/")
        dev, leaf = parts[-2], parts[-1]
        entry = found.setdefault(dev, {})
        try:
            if leaf == "capabilities" and msg.payload:
                caps = json.loads(msg.payload)
                if isinstance(caps, dict):
                    entry.update(caps)
            elif leaf == "status":
                entry["status"] = msg.payload.decode("utf-8", "replace")
        except ValueError:
            pass

    c.on_connect = on_connect
    c.on_message = on_message
    try:
        c.connect(st.host, st.port, keepalive=10)
    except OSError as e:
        raise BrokerConnectionError(f"cannot reach the MQTT broker at {st.host}:{st.port}: {e}") from e
    c.loop_start()
    time.sleep(timeout)
    c.disconnect()
    c.loop_stop()
    return {d: e for d, e in found.items() if e}
