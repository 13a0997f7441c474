"""What the daemon (edge_sdk.serve) and the SDK (edge_sdk.client) share about MQTT.

Topic names, the protocol version, and a paho client factory that applies the measured fixes
(MQTT 5, callback API 2, TCP_NODELAY on the socket). Only the standard library and paho here:
both sides import this module, and the SDK must stay light.

The topic contract is written down in edge_sdk/serve/PROTOCOL.md; keep the two in step.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

#: Protocol major version: it is part of every topic (``P/v1/...``). Bumped only on a breaking change.
PROTOCOL_MAJOR = 1
#: Schema version of the JSON payloads (major.minor); minor bumps only add optional fields.
SCHEMA_VERSION = "1.1"
DEFAULT_PREFIX = "edge"

#: Device ids and client names are single topic levels: no wildcards, no slashes, no '$'.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
#: The reserved level under which client inboxes live; it can never be a device id.
CLIENTS_LEVEL = "clients"


def check_device_id(device_id: str) -> str:
    if not DEVICE_ID_RE.match(device_id or "") or device_id == CLIENTS_LEVEL:
        raise ValueError(f"device id {device_id!r} must match [a-z0-9][a-z0-9-]* (max 64) and not be 'clients'")
    return device_id


def check_prefix(prefix: str) -> str:
    if not PREFIX_RE.match(prefix or ""):
        raise ValueError(f"topic prefix {prefix!r} must be levels of [A-Za-z0-9_-] joined by '/'")
    return prefix


def check_client_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ValueError(f"client name {name!r} must match [A-Za-z0-9][A-Za-z0-9_-]* (max 64); it is a topic level")
    return name


def sanitize_device_id(name: str) -> str:
    """A host name turned into a legal device id ('Jetson_Orin.local' -> 'jetson-orin-local')."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:64]
    return out if out and out != CLIENTS_LEVEL else "device"


@dataclass(frozen=True)
class Topics:
    """All topic names for one device under one prefix. ``R = P/v1/N``.

    ========================================  =====================================================
    ``R/status``                              retained ``online`` / ``stopping`` / ``offline`` (Will)
    ``R/capabilities``                        retained JSON
    ``R/health``                              retained JSON metrics, QoS 0, expiring
    ``R/req/C/chat``, ``R/req/C/cancel``      requests from client name C
    ``P/v1/clients/C/res/N[/...]``            C's inbox: replies from device N
    ``R/events/{cam}/watch/C/{job}``          watch job results (JSON events)
    ``R/camera/{cam}/snapshot``               retained JPEG snapshot
    ========================================  =====================================================
    """

    prefix: str
    device_id: str

    @property
    def root(self) -> str:
        return f"{self.prefix}/v{PROTOCOL_MAJOR}/{self.device_id}"

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def capabilities(self) -> str:
        return f"{self.root}/capabilities"

    @property
    def health(self) -> str:
        return f"{self.root}/health"

    @property
    def request_filter(self) -> str:
        return f"{self.root}/req/#"

    def request(self, client: str, op: str) -> str:
        return f"{self.root}/req/{client}/{op}"

    def inbox_prefix(self, client: str) -> str:
        """Every reply topic for client name C must start with this (the broker's ACL lets only C read it)."""
        return f"{self.prefix}/v{PROTOCOL_MAJOR}/{CLIENTS_LEVEL}/{client}/"

    def inbox(self, client: str) -> str:
        """The default reply topic for requests from C to this device."""
        return f"{self.inbox_prefix(client)}res/{self.device_id}"

    def watch_events(self, camera: str, client: str, job_id: str) -> str:
        """Where watch job ``job_id`` of client name C publishes: ``R/events/{camera}/watch/C/{job_id}``."""
        return f"{self.root}/events/{camera}/watch/{client}/{job_id}"

    @property
    def watch_events_filter(self) -> str:
        """Every watch event of this device."""
        return f"{self.root}/events/+/watch/#"

    def snapshot(self, camera: str) -> str:
        """Retained small JPEG of camera ``camera``: ``R/camera/{camera}/snapshot``."""
        return f"{self.root}/camera/{camera}/snapshot"

    def all_devices(self, leaf: str) -> str:
        """A filter over every device under the prefix, e.g. ``P/v1/+/capabilities``."""
        return f"{self.prefix}/v{PROTOCOL_MAJOR}/+/{leaf}"

    def parse_request(self, topic: str) -> tuple[str, str, list[str]] | None:
        """``R/req/C/op[/extra...]`` -> (C, op, extra levels); None if the topic has no client level."""
        base = f"{self.root}/req/"
        if not topic.startswith(base):
            return None
        parts = topic[len(base):].split("/")
        if len(parts) < 2 or not parts[0]:
            return None
        return parts[0], parts[1], parts[2:]


def set_nodelay(sock: Any) -> None:
    """TCP_NODELAY on the MQTT socket: a QoS 1 round trip drops from ~88 ms to ~0.6 ms."""
    try:
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:  # pragma: no cover - exotic sockets
        log.debug("could not set TCP_NODELAY: %s", e)


def _on_socket_open(client, userdata, sock) -> None:
    set_nodelay(sock)


def make_client(client_id: str, *, username: str | None = None, password: str | None = None,
                tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                tls_insecure: bool = False, transport: str = "tcp",
                max_queued_messages: int = 0) -> mqtt.Client:
    """A paho client with callback API 2, MQTT 5, TCP_NODELAY and optional TLS / credentials."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
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
