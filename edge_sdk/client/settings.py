"""How the SDK reaches a device: one settings object shared by ``Client``, ``AsyncClient`` and
``discover`` (their keyword arguments are its fields)."""

from __future__ import annotations

from dataclasses import dataclass

from edge_sdk.protocol.topics import DEFAULT_PREFIX


@dataclass
class ConnectionSettings:
    host: str = "localhost"
    port: int = 1883
    #: None: discover the one device under ``prefix``.
    device_id: str | None = None
    prefix: str = DEFAULT_PREFIX
    #: With the shipped broker ACL the username is the client name C of every topic.
    username: str | None = None
    password: str | None = None
    #: Default: a unique ``edge-sdk-<hex>`` (two clients with one id kick each other off).
    client_id: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    transport: str = "tcp"
    keepalive: int = 15
    #: Default per-request timeout (s).
    timeout: float = 120.0
    connect_timeout: float = 5.0
    #: How long to wait for the device's retained status before a request.
    status_wait: float = 2.0

    def broker_kwargs(self) -> dict:
        """What ``mqtt_common.make_client`` takes besides the client id."""
        return dict(username=self.username, password=self.password, tls_ca=self.tls_ca, tls_cert=self.tls_cert,
                    tls_key=self.tls_key, tls_insecure=self.tls_insecure, transport=self.transport)


