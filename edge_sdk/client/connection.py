"""One paho connection to the broker: the subscriptions, the table of waiting requests, and the
device's status and capabilities. Everything here runs on paho's network thread or under its
lock; the clients (sync.py, aio.py) and the handles (streams.py, watch.py) sit on top.

Robustness: a disconnected SDK reconnects by itself, and when the device says 'online' again it
re-sends the requests still waiting (same request id: the daemon does not run one twice and
re-sends a finished request's final event). A device going 'offline' fails waiting requests at
once with ``DeviceOfflineError``. Junk from the broker (non-JSON events, unknown status values)
is logged and ignored; malformed events reach the waiting call as ``ProtocolError``.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import paho.mqtt.client as mqtt

from edge_sdk.client.errors import (BrokerConnectionError, DeviceOfflineError, EdgeError, RequestTimeoutError,
                                    error_from_event, read_event)
from edge_sdk.client.settings import ConnectionSettings
from edge_sdk.mqtt_common import dumps, make_client, new_client_id, prop, publish_props, user_props
from edge_sdk.protocol.models import DEVICE_STATUSES, REQUEST_PROPERTY, Capabilities
from edge_sdk.protocol.topics import Topics, check_client_name, check_device_id

log = logging.getLogger("edge_sdk.client")

TERMINAL_EVENTS = ("result", "error", "watch_registered", "listen_registered", "snapshot", "stream_closed")


@dataclass(eq=False)
class Pending:
    """A request waiting for its events; ``deliver`` gets each one (or the exception that ends it)."""

    request_id: str
    topic: str
    body: bytes
    props: Any
    deliver: Callable[[Any], None]
    last_seq: int = -1
    resend: bool = False
    suppress_deltas: bool = False


def item_error(item: Any) -> BaseException | None:
    """The exception a delivered item stands for: the item itself when the connection delivered
    one (offline, client closed), the mapped EdgeError of an 'error' event; None otherwise."""
    if isinstance(item, BaseException):
        return item
    if item.get("type") == "error":
        return error_from_event(item)
    return None


class Connection:
    def __init__(self, st: ConnectionSettings):
        self.st = st
        self.client_id = st.client_id or new_client_id("edge-sdk")
        try:
            self.name = check_client_name(st.username or self.client_id)
        except ValueError:
            raise ValueError(f"client name {st.username or self.client_id!r} (the username, else the client id) "
                             "must match [A-Za-z0-9][A-Za-z0-9_-]*: it is a topic level") from None
        if st.device_id is None:
            from edge_sdk.client.discovery import discover

            found = discover(timeout=st.status_wait, settings=st)
            online = sorted(d for d, c in found.items() if c.get("status") == "online") or sorted(found)
            if len(online) != 1:
                raise DeviceOfflineError(f"device_id not given and {len(online)} devices found under "
                                         f"{st.prefix!r}: {online}")
            st.device_id = online[0]
        self.topics = Topics(st.prefix, check_device_id(st.device_id))
        # A per-connection reply topic inside this client name's inbox (several SDK instances may
        # share one username).
        self.reply_topic = f"{self.topics.inbox(self.name)}/{self.client_id}"
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: dict[str, Pending] = {}
        self.status: str | None = None
        self.caps: dict | None = None
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._closed = False
        self.connected = threading.Event()
        self._connect_error: str | None = None
        self._subs: dict[str, Callable[[Any], None]] = {}  # extra topics (watch events) -> handler
        self._sub_waits: dict[int, threading.Event] = {}
        self._offline_listeners: list[Callable[[], None]] = []
        self._on_close: list[Callable[[], None]] = []

        c = self.client = make_client(self.client_id, **st.broker_kwargs())
        # If this process vanishes, the broker cancels its requests on the device.
        c.will_set(self.topics.request(self.name, "cancel"),
                   dumps({"v": 1, "all": True, "reply_to": self.reply_topic}), qos=1)
        c.reconnect_delay_set(0.1, 2.0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message

    # --- hooks for handles --------------------------------------------------------------------

    def add_offline_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs (network thread) when the device says 'offline'."""
        self._offline_listeners.append(listener)

    def remove_offline_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._offline_listeners:
            self._offline_listeners.remove(listener)

    def add_close_hook(self, hook: Callable[[], None]) -> None:
        """``hook()`` runs when the client closes (watch handles cancel or end themselves)."""
        self._on_close.append(hook)

    def remove_close_hook(self, hook: Callable[[], None]) -> None:
        if hook in self._on_close:
            self._on_close.remove(hook)

    # --- connection ---------------------------------------------------------------------------

    def connect(self) -> None:
        st = self.st
        try:
            self.client.connect(st.host, st.port, keepalive=st.keepalive, clean_start=True)
        except (OSError, ValueError) as e:
            raise BrokerConnectionError(f"cannot reach the MQTT broker at {st.host}:{st.port}: {e}") from e
        self.client.loop_start()
        self._subscribed.wait(st.connect_timeout)
        if self._connect_error or not self.connected.is_set():
            err = self._connect_error or "no answer"
            self.close()
            raise BrokerConnectionError(f"MQTT broker at {st.host}:{st.port} did not accept us: {err}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            pend = list(self._pending.values())
            self._pending.clear()
        for p in pend:  # tell the device, then the waiters
            self.cancel(p.request_id)
            p.deliver(DeviceOfflineError("client closed", request_id=p.request_id))
        for hook in list(self._on_close):
            hook()
        try:
            self.client.disconnect()  # a clean disconnect: the Will (cancel all) is not sent
        finally:
            self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            log.error("broker refused the connection: %s", reason_code)
            self._subscribed.set()  # wake connect(); it reports the error
            return
        self.connected.set()
        with self._lock:
            for p in self._pending.values():
                p.resend = True
            extra = [(t, 1) for t in self._subs]
        # (re)subscribe: the inbox first, then status (whose retained 'online' triggers re-sends)
        _, self._sub_mid = client.subscribe([(self.reply_topic, 1), (self.topics.capabilities, 1),
                                             (self.topics.status, 1), *extra])

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if not self._closed:
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)
        with self._lock:
            self.status = None  # unknown until the broker tells us again
            for p in self._pending.values():
                p.resend = True

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._lock:
            ev = self._sub_waits.pop(mid, None)
        if ev is not None:
            ev.ok = not any(rc.is_failure for rc in reason_codes)  # type: ignore[attr-defined]
            ev.set()
        if mid == self._sub_mid:
            bad = [rc for rc in reason_codes if rc.is_failure]
            if bad:
                self._connect_error = f"subscription refused: {bad}"
                log.error("broker refused our subscriptions: %s", bad)
            self._subscribed.set()

    def _on_message(self, client, userdata, msg):
        try:
            if msg.topic == self.reply_topic:
                self._on_event(msg)
            elif msg.topic == self.topics.status:
                self._on_status(msg.payload)
            elif msg.topic == self.topics.capabilities:
                caps = json.loads(msg.payload) if msg.payload else None
                with self._cond:
                    self.caps = caps if isinstance(caps, dict) or caps is None else None
                    self._cond.notify_all()
            else:
                handler = self._subs.get(msg.topic)
                if handler is not None:
                    ev = json.loads(msg.payload)
                    if isinstance(ev, dict):
                        handler(ev)
                    else:
                        log.warning("ignored a non-object event on %s", msg.topic)
        except Exception:
            log.exception("bad message on %s", msg.topic)

    def _on_status(self, payload: bytes) -> None:
        status = payload.decode("utf-8", "replace") if payload else None
        if status is not None and status not in DEVICE_STATUSES:
            log.warning("ignored status %r on %s: not one of %s", status[:64], self.topics.status,
                        ", ".join(DEVICE_STATUSES))
            return
        with self._cond:
            self.status = status
            self._cond.notify_all()
            pend = list(self._pending.values())
            if status == "offline":
                self._pending.clear()
        if status == "offline":
            for p in pend:
                p.deliver(DeviceOfflineError(f"device {self.topics.device_id!r} went offline",
                                             request_id=p.request_id, code="offline", status=503))
            for listener in list(self._offline_listeners):
                listener()
        elif status == "online":
            for p in pend:
                if p.resend:
                    p.resend = False
                    log.info("re-sending request %s after a reconnect", p.request_id)
                    self.client.publish(p.topic, p.body, qos=1, properties=p.props)

    def _on_event(self, msg) -> None:
        ctype = prop(msg, "ContentType")
        if isinstance(ctype, str) and ctype.startswith("image/"):  # a binary reply (snapshot)
            ev: dict = {k: v for k, v in user_props(msg).items()}
            ev.setdefault("type", "snapshot")
            ev["seq"] = int(ev["seq"]) if str(ev.get("seq", "")).isdigit() else 0
            ev["mime"] = ctype
            ev["bytes"] = bytes(msg.payload)
        else:
            ev = json.loads(msg.payload)
            if not isinstance(ev, dict):
                log.warning("ignored a non-object event on %s", msg.topic)
                return
        corr = prop(msg, "CorrelationData")
        rid = None
        if corr:
            try:
                rid = bytes(corr).decode("utf-8")
            except UnicodeDecodeError:
                rid = None
        rid = rid or ev.get("request_id")
        if not isinstance(rid, str):
            return
        with self._lock:
            p = self._pending.get(rid)
            if p is None:
                return  # late or duplicate
            seq = ev.get("seq", 0)
            kind = ev.get("type")
            if isinstance(seq, int) and not isinstance(seq, bool):  # else the handle reports it malformed
                if kind == "accepted" and p.last_seq > 0:
                    p.suppress_deltas = True  # the device ran it again from the start (it had restarted)
                elif seq <= p.last_seq:
                    return
                p.last_seq = max(p.last_seq, seq)
            if kind in TERMINAL_EVENTS:
                self._pending.pop(rid, None)
            if kind == "delta" and p.suppress_deltas:
                return
        p.deliver(ev)

    # --- requests -----------------------------------------------------------------------------

    def wait_status(self, timeout: float) -> str | None:
        end = time.monotonic() + timeout
        with self._cond:
            while self.status is None:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self.status

    def submit(self, payload: dict, deliver: Callable[[Any], None], timeout: float | None, *, op: str = "chat",
               attachment: tuple[bytes, str] | None = None) -> Pending:
        """Send a request on ``R/req/C/<op>``. ``attachment`` (bytes, content type): send it as
        the MQTT 5 binary payload, with the JSON request in the user property 'request'."""
        if self._closed:
            raise EdgeError("client is closed")
        status = self.wait_status(min(self.st.status_wait, timeout or self.st.status_wait))
        if status != "online" and status != "stopping":
            raise DeviceOfflineError(
                f"device {self.topics.device_id!r} is {status or 'not announced on the broker'} "
                f"(status topic {self.topics.status})", status=503, code="offline",
                request_id=payload.get("request_id"))
        rid = payload["request_id"]
        topic = self.topics.request(self.name, op)
        expiry = math.ceil(timeout) if timeout else None
        if attachment is not None:
            props = publish_props(correlation=rid.encode(), response_topic=self.reply_topic, expiry_s=expiry,
                                  content_type=attachment[1], user=[(REQUEST_PROPERTY, dumps(payload).decode("utf-8"))])
            body = attachment[0]
        else:
            props = publish_props(correlation=rid.encode(), response_topic=self.reply_topic, expiry_s=expiry)
            body = dumps(payload)
        p = Pending(rid, topic, body, props, deliver)
        with self._lock:
            if rid in self._pending:
                raise ValueError(f"request id {rid!r} is already in use")
            self._pending[rid] = p
        info = self.client.publish(topic, p.body, qos=1, properties=props)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            p.resend = False  # paho re-sends queued QoS 1 messages itself on reconnect
        return p

    def expect(self, rid: str, deliver: Callable[[Any], None]) -> None:
        """Route the events of ``rid`` (a request the device started itself, such as an audio
        stream's utterance) to ``deliver``."""
        with self._lock:
            self._pending[rid] = Pending(rid, "", b"", None, deliver)

    def publish_binary(self, op: str, payload: dict, body: bytes, content_type: str) -> None:
        """A fire-and-forget binary message (an audio stream's chunk): ``body`` as the MQTT 5
        payload, the JSON ``payload`` in the user property 'request'."""
        props = publish_props(content_type=content_type, user=[(REQUEST_PROPERTY, dumps(payload).decode("utf-8"))])
        self.client.publish(self.topics.request(self.name, op), body, qos=1, properties=props)

    def forget(self, rid: str) -> None:
        with self._lock:
            self._pending.pop(rid, None)

    def request(self, op: str, payload: dict, timeout: float) -> dict:
        """One request whose answer is a single terminal event; raises the matching EdgeError."""
        q: queue.Queue = queue.Queue()
        p = self.submit(payload, q.put, timeout, op=op)
        try:
            ev = q.get(timeout=timeout)
        except queue.Empty:
            self.forget(p.request_id)
            raise RequestTimeoutError(f"no answer to {op} {p.request_id} within {timeout:.1f} s",
                                      request_id=p.request_id, code="timeout") from None
        err = item_error(ev)
        if err is not None:
            raise err
        return ev

    def publish_request(self, op: str, payload: dict) -> None:
        """A fire-and-forget request (cancel, watch_cancel): no reply is awaited."""
        try:
            self.client.publish(self.topics.request(self.name, op), dumps(payload), qos=1, properties=publish_props())
        except Exception:  # pragma: no cover
            log.debug("%s publish failed", op, exc_info=True)

    def cancel(self, rid: str) -> None:
        self.publish_request("cancel", {"v": 1, "request_id": rid})

    def add_subscription(self, topic: str, handler: Callable[[Any], None], timeout: float) -> None:
        """Subscribe ``topic`` (kept across reconnects) and wait for the broker's SUBACK."""
        ev = threading.Event()
        with self._lock:
            self._subs[topic] = handler
            _, mid = self.client.subscribe(topic, qos=1)
            self._sub_waits[mid] = ev
        if not ev.wait(timeout) or not getattr(ev, "ok", False):
            self.remove_subscription(topic)
            raise BrokerConnectionError(f"the broker did not grant a subscription to {topic}")

    def remove_subscription(self, topic: str) -> None:
        with self._lock:
            if self._subs.pop(topic, None) is None:
                return
        try:
            self.client.unsubscribe(topic)
        except Exception:  # pragma: no cover
            log.debug("unsubscribe failed", exc_info=True)

    def capabilities(self, timeout: float) -> Capabilities:
        end = time.monotonic() + timeout
        with self._cond:
            while self.caps is None:
                left = end - time.monotonic()
                if left <= 0:
                    raise DeviceOfflineError(f"no capabilities from device {self.topics.device_id!r}")
                self._cond.wait(left)
            caps = self.caps
        return read_event(Capabilities, caps)
