"""The paho side both the daemon (edge_sdk.serve) and the SDK (edge_sdk.client) use.

A client factory that applies the measured fixes (MQTT 5, callback API 2, TCP_NODELAY and quick
ACKs on the socket), PUBLISH properties, and reading properties off a received message. Only the standard
library and paho here: the SDK must stay light. Topic names and payloads are edge_sdk.protocol.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)


def set_nodelay(sock: Any) -> None:
    """TCP_NODELAY on the MQTT socket: a QoS 1 round trip drops from ~88 ms to ~0.6 ms."""
    try:
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:  # pragma: no cover - exotic sockets
        log.debug("could not set TCP_NODELAY: %s", e)


def _on_socket_open(client, userdata, sock) -> None:
    set_nodelay(sock)


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
#: Off only to measure what it saves (``edge-sdk bench --mqtt``).
QUICK_ACK = True


def set_quickack(sock: Any) -> None:
    """Acknowledge received TCP data at once. A broker without ``set_tcp_nodelay`` (mosquitto's
    default) holds each small message until the previous one is acknowledged, and Linux delays
    that acknowledgement up to 40 ms: measured here, a 1-token request took 44 ms through a stock
    mosquitto and 1.5 ms with this on both daemon and SDK. The kernel leaves quick-ack mode by
    itself, so it is set again after every read."""
    if _TCP_QUICKACK is not None and getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:  # pragma: no cover - a socket that does not take it
            pass


class _Client(mqtt.Client):
    """paho's client with ``set_quickack`` after each read of its socket."""

    def _sock_recv(self, bufsize: int) -> bytes:
        data = super()._sock_recv(bufsize)
        if QUICK_ACK:
            set_quickack(self._sock)
        return data


def make_client(client_id: str, *, username: str | None = None, password: str | None = None,
                tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                tls_insecure: bool = False, transport: str = "tcp",
                max_queued_messages: int = 0) -> mqtt.Client:
    """A paho client with callback API 2, MQTT 5, TCP_NODELAY and quick ACKs, and optional TLS /
    credentials."""
    c = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                    transport=transport)
    c.on_socket_open = _on_socket_open
    if username is not None:
        c.username_pw_set(username, password)
    if tls_ca or tls_cert:
        c.tls_set(ca_certs=tls_ca, certfile=tls_cert, keyfile=tls_key, cert_reqs=ssl.CERT_REQUIRED,
                  tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if tls_insecure:
            c.tls_insecure_set(True)
    if max_queued_messages:
        c.max_queued_messages_set(max_queued_messages)
    return c


def new_client_id(kind: str) -> str:
    """Unique client ids: two clients with one id kick each other off in a loop."""
    return f"{kind}-{uuid.uuid4().hex[:12]}"


def publish_props(correlation: bytes | None = None, response_topic: str | None = None,
                  expiry_s: int | None = None, json_payload: bool = True, content_type: str | None = None,
                  user: list[tuple[str, str]] | None = None) -> Properties:
    """PUBLISH properties. ``content_type`` (e.g. image/jpeg) marks a binary payload;
    ``user``: MQTT 5 user properties (name, value) pairs."""
    p = Properties(PacketTypes.PUBLISH)
    if content_type is not None:
        p.ContentType = content_type
    elif json_payload:
        p.PayloadFormatIndicator = 1
        p.ContentType = "application/json"
    if user:
        p.UserProperty = list(user)
    if correlation is not None:
        p.CorrelationData = correlation
    if response_topic is not None:
        p.ResponseTopic = response_topic
    if expiry_s is not None:
        p.MessageExpiryInterval = int(expiry_s)
    return p


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the form every payload takes on the wire."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def user_props(msg: mqtt.MQTTMessage) -> dict[str, str]:
    """MQTT 5 user properties of a message as a dict (the last value of a repeated name wins)."""
    pairs = prop(msg, "UserProperty") or []
    return {str(k): str(v) for k, v in pairs}


def prop(msg: mqtt.MQTTMessage, name: str) -> Any:
    props = getattr(msg, "properties", None)
    return getattr(props, name, None) if props is not None else None
