"""Topic names and the names inside them: the device id, the client name, the prefix.

Every topic the daemon publishes to or the SDK subscribes to is built here, and every topic the
daemon is asked to publish to (a client's reply topic) is checked here against MQTT's rules for
topic names, so that no request can make the daemon send a packet the broker refuses.
The contract these names implement is PROTOCOL.md beside this file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Protocol major version: it is part of every topic (``P/v1/...``). Bumped only on a breaking change.
PROTOCOL_MAJOR = 1
#: Schema version of the JSON payloads (major.minor); minor bumps only add optional fields.
SCHEMA_VERSION = "1.2"
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


#: A topic name is at most 65,535 bytes of UTF-8 (MQTT 5, 1.5.4); the daemon allows far less.
MAX_TOPIC_BYTES = 512


def topic_name_error(topic: str) -> str | None:
    """Why ``topic`` may not be published to, or None if it may. MQTT 5 (1.5.4, 4.7) forbids in a
    topic name U+0000, wildcards, and ill-formed UTF-8; it lets a broker refuse control characters
    (U+0001-U+001F, U+007F-U+009F) and non-characters, and mosquitto does by dropping the
    connection. Such a name from a request would cut the daemon off the broker, so all are refused."""
    if not isinstance(topic, str) or not topic:
        return "empty topic"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "not well-formed UTF-8 (a lone surrogate)"
    if size > MAX_TOPIC_BYTES:
        return f"longer than {MAX_TOPIC_BYTES} bytes"
    for ch in topic:
        cp = ord(ch)
        if ch in "+#":
            return "contains a wildcard ('+' or '#')"
        if cp <= 0x1F or 0x7F <= cp <= 0x9F:
            return f"contains the control character U+{cp:04X}"
        if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
            return f"contains the non-character U+{cp:04X}"
    return None


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
    ``R/events/{mic}/listen/C/{job}``         listen job events: voice, transcripts (JSON)
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

    def listen_events(self, microphone: str, client: str, job_id: str) -> str:
        """Where listen job ``job_id`` of client name C publishes: ``R/events/{mic}/listen/C/{job_id}``."""
        return f"{self.root}/events/{microphone}/listen/{client}/{job_id}"

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
