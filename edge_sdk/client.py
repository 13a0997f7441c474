"""The Python SDK: talk to an edge_sdk daemon through the MQTT broker.

    from edge_sdk import Client
    with Client(host="localhost", port=1883, device_id="jetson") as c:
        print(c.chat("Hello!", max_tokens=32, seed=0).text)
        for delta in c.chat([{"role": "user", "content": "Count to 5"}], stream=True):
            print(delta.text, end="", flush=True)

Images: ``{"type": "image", "image": path | bytes | HxWx3 uint8 RGB ndarray}`` parts (the SDK
encodes them: one image goes as an MQTT 5 binary payload, several as base64 in the JSON) or
``{"type": "image", "camera": "front"}`` (the device's newest frame). ``client.watch(camera, prompt,
every=2.0)`` registers a watch job and iterates its events; ``client.snapshot(camera)`` returns a
JPEG.

``AsyncClient`` has the same methods as coroutines. Both speak the contract in
edge_sdk/serve/PROTOCOL.md: requests on ``P/v1/N/req/C/chat`` with an MQTT 5 Response Topic
inside this client's inbox, events back there, the device's retained status and capabilities.

Robustness: a disconnected SDK reconnects by itself, and when the device says 'online' again it
re-sends the requests still waiting (same request id: the daemon does not run one twice and
re-sends a finished request's final event). A device going 'offline' fails waiting requests at
once with ``DeviceOfflineError``; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

import paho.mqtt.client as mqtt

from edge_sdk.mqtt_common import (DEFAULT_PREFIX, NAME_RE, Topics, check_device_id, dumps, make_client,
                                  new_client_id, prop, publish_props, user_props)
from edge_sdk.serve.cameras import sniff_mime
from edge_sdk.serve.protocol import (REQUEST_PROPERTY, Capabilities, Delta, Result, WatchEnd, WatchError,
                                     WatchEvent, WatchRegistered)

log = logging.getLogger("edge_sdk.client")

ChatResult = Result
ChatDelta = Delta

__all__ = ["Client", "AsyncClient", "ChatStream", "AsyncChatStream", "ChatResult", "ChatDelta", "Capabilities",
           "WatchHandle", "AsyncWatchHandle", "WatchEvent", "WatchError", "WatchEnd", "WatchRegistered",
           "EdgeError", "BadRequestError", "UnsupportedMediaError", "InvalidImageError", "BusyError",
           "DeviceOfflineError", "CameraUnavailableError", "RequestTimeoutError", "ServerError",
           "BrokerConnectionError", "discover"]

#: MQTT 5 user properties are UTF-8 strings of at most 65,535 bytes: a bigger JSON request falls
#: back to base64 images in the JSON payload.
_MAX_USER_PROPERTY = 60_000


# --- exceptions -------------------------------------------------------------------------------------


class EdgeError(Exception):
    """Base of every SDK error; carries the daemon's status, code and the request id."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 request_id: str | None = None, event: dict | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.event = event


class BadRequestError(EdgeError):
    """The daemon refused the request as malformed or impossible (400, 404, 413, 415)."""


class UnsupportedMediaError(BadRequestError):
    """An image (or other part) the device's model cannot take, or an unknown camera (415)."""


class InvalidImageError(BadRequestError):
    """An image that does not decode: empty, truncated, corrupt (400 invalid_image)."""


class CameraUnavailableError(EdgeError):
    """The device's camera has no fresh frame right now (503 camera_unavailable); retry later."""


class BusyError(EdgeError):
    """The device's queue is full (429); retry after ``retry_after_ms``."""

    def __init__(self, message: str, *, retry_after_ms: int | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after_ms = retry_after_ms


class DeviceOfflineError(EdgeError):
    """The device is offline, stopping, or has never said it is online."""


class RequestTimeoutError(EdgeError, TimeoutError):
    """No final answer within the timeout (the SDK cancels the request on the device)."""


class ServerError(EdgeError):
    """The daemon failed while running the request (500)."""


class BrokerConnectionError(EdgeError, ConnectionError):
    """The MQTT broker cannot be reached or refused the connection."""


def error_from_event(ev: dict) -> EdgeError:
    status = ev.get("status") or 500
    kw = dict(status=status, code=ev.get("code"), request_id=ev.get("request_id"), event=ev)
    msg = f"[{status} {ev.get('code')}] {ev.get('message')}"
    if status == 429:
        return BusyError(msg, retry_after_ms=ev.get("retry_after_ms"), **kw)
    if status == 415:
        return UnsupportedMediaError(msg, **kw)
    if ev.get("code") == "invalid_image":
        return InvalidImageError(msg, **kw)
    if ev.get("code") == "camera_unavailable":
        return CameraUnavailableError(msg, **kw)
    if status == 503:
        return DeviceOfflineError(msg, **kw)
    if 400 <= status < 500:
        return BadRequestError(msg, **kw)
    return ServerError(msg, **kw)


def _item_error(item: Any) -> BaseException | None:
    """The exception a queued item stands for: the item itself when the core delivered one
    (offline, client closed), the mapped EdgeError of an 'error' event; None otherwise."""
    if isinstance(item, BaseException):
        return item
    if item.get("type") == "error":
        return error_from_event(item)
    return None


def _threadsafe_putter(loop: asyncio.AbstractEventLoop, q: asyncio.Queue) -> Callable[[Any], None]:
    """A deliver callback for paho's thread that puts items on an asyncio queue of ``loop``."""

    def deliver(item, _loop=loop, _q=q):
        try:
            _loop.call_soon_threadsafe(_q.put_nowait, item)
        except RuntimeError:  # loop closed
            pass

    return deliver


def _snapshot_payload(camera: str, max_side: int | None) -> dict:
    payload: dict[str, Any] = {"v": 1, "request_id": uuid.uuid4().hex, "camera": camera}
    if max_side is not None:
        payload["max_side"] = max_side
    return payload


# --- the shared core (paho network thread side) -------------------------------------------------------


@dataclass(eq=False)
class _Pending:
    request_id: str
    topic: str
    body: bytes
    props: Any
    deliver: Callable[[Any], None]
    last_seq: int = -1
    resend: bool = False
    suppress_deltas: bool = False
    done: bool = False


@dataclass
class _Settings:
    host: str = "localhost"
    port: int = 1883
    device_id: str | None = None
    prefix: str = DEFAULT_PREFIX
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    transport: str = "tcp"
    keepalive: int = 15
    timeout: float = 120.0
    connect_timeout: float = 5.0
    status_wait: float = 2.0
    extra: dict = field(default_factory=dict)


class _Core:
    """One paho connection: subscriptions, the pending-request table, status and capabilities."""

    def __init__(self, st: _Settings):
        self.st = st
        self.client_id = st.client_id or new_client_id("edge-sdk")
        self.name = st.username or self.client_id
        if not NAME_RE.match(self.name):
            raise ValueError(f"client name {self.name!r} (the username, else the client id) must match "
                             "[A-Za-z0-9][A-Za-z0-9_-]*: it is a topic level")
        if st.device_id is None:
            found = discover(**_conn_kwargs(st), timeout=st.status_wait)
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
        self._pending: dict[str, _Pending] = {}
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
        self._watches: list[Any] = []  # listening watch handles (closing the client cancels non-persistent ones)

        c = self.client = make_client(self.client_id, username=st.username, password=st.password,
                                      tls_ca=st.tls_ca, tls_cert=st.tls_cert, tls_key=st.tls_key,
                                      tls_insecure=st.tls_insecure, transport=st.transport)
        # If this process vanishes, the broker cancels its requests on the device.
        c.will_set(self.topics.request(self.name, "cancel"),
                   dumps({"v": 1, "all": True, "reply_to": self.reply_topic}), qos=1)
        c.reconnect_delay_set(0.1, 2.0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message

    # connection

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
            self._publish_cancel(p.request_id)
            p.deliver(DeviceOfflineError("client closed", request_id=p.request_id))
        for h in list(self._watches):
            if not h.persistent:
                h._send_cancel()
            h._deliver(None)
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
        # (re)subscribe: the inbox first, then status (whose retained 'online' triggers re-sends)
        with self._lock:
            extra = [(t, 1) for t in self._subs]
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
                self._on_status(msg.payload.decode("utf-8", "replace"))
            elif msg.topic == self.topics.capabilities:
                caps = json.loads(msg.payload) if msg.payload else None
                with self._cond:
                    self.caps = caps
                    self._cond.notify_all()
            else:
                handler = self._subs.get(msg.topic)
                if handler is not None:
                    handler(json.loads(msg.payload))
        except Exception:
            log.exception("bad message on %s", msg.topic)

    def _on_status(self, status: str) -> None:
        with self._cond:
            self.status = status or None
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
            ev["seq"] = int(ev.get("seq") or 0)
            ev["mime"] = ctype
            ev["bytes"] = bytes(msg.payload)
        else:
            ev = json.loads(msg.payload)
        corr = prop(msg, "CorrelationData")
        rid = None
        if corr:
            try:
                rid = bytes(corr).decode("utf-8")
            except UnicodeDecodeError:
                rid = None
        rid = rid or ev.get("request_id")
        with self._lock:
            p = self._pending.get(rid)
            if p is None:
                return  # late or duplicate
            seq = ev.get("seq", 0)
            kind = ev.get("type")
            if kind == "accepted" and p.last_seq > 0:
                p.suppress_deltas = True  # the device ran it again from the start (it had restarted)
            elif seq <= p.last_seq:
                return
            p.last_seq = max(p.last_seq, seq)
            terminal = kind in ("result", "error", "watch_registered", "snapshot")
            if terminal:
                self._pending.pop(rid, None)
                p.done = True
            if kind == "delta" and p.suppress_deltas:
                return
        p.deliver(ev)

    # requests

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
               attachment: tuple[bytes, str] | None = None) -> _Pending:
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
        p = _Pending(rid, topic, body, props, deliver)
        with self._lock:
            if rid in self._pending:
                raise ValueError(f"request id {rid!r} is already in use")
            self._pending[rid] = p
        info = self.client.publish(topic, p.body, qos=1, properties=props)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            p.resend = False  # paho re-sends queued QoS 1 messages itself on reconnect
        return p

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
        err = _item_error(ev)
        if err is not None:
            raise err
        return ev

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

    def _publish_cancel(self, rid: str) -> None:
        try:
            self.client.publish(self.topics.request(self.name, "cancel"),
                                dumps({"v": 1, "request_id": rid}), qos=1, properties=publish_props())
        except Exception:  # pragma: no cover
            log.debug("cancel publish failed", exc_info=True)

    def cancel(self, rid: str) -> None:
        self._publish_cancel(rid)

    def capabilities(self, timeout: float) -> Capabilities:
        end = time.monotonic() + timeout
        with self._cond:
            while self.caps is None:
                left = end - time.monotonic()
                if left <= 0:
                    raise DeviceOfflineError(f"no capabilities from device {self.topics.device_id!r}")
                self._cond.wait(left)
            return Capabilities.model_validate(self.caps)


def _conn_kwargs(st: _Settings) -> dict:
    return dict(host=st.host, port=st.port, prefix=st.prefix, username=st.username, password=st.password,
                tls_ca=st.tls_ca, tls_cert=st.tls_cert, tls_key=st.tls_key, tls_insecure=st.tls_insecure,
                transport=st.transport)


def build_chat_payload(messages: str | Iterable[Any] | None = None, *, prompt: str | list[int] | None = None,
                       request_id: str | None = None, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                       seed: int | None = None, stop: list[str] | None = None, stream: bool = True,
                       deadline: float | None = None, priority: int | None = None) -> dict:
    """The JSON of a chat request (only the fields given; the daemon fills the defaults)."""
    payload: dict[str, Any] = {"v": 1, "request_id": request_id or uuid.uuid4().hex}
    if messages is not None:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        payload["messages"] = [m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else dict(m)
                               for m in messages]
    if prompt is not None:
        payload["prompt"] = prompt
    for k, v in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                 ("seed", seed), ("priority", priority)):
        if v is not None:
            payload[k] = v
    if temperature is not None:
        payload["temperature"] = float(temperature)
    if top_p is not None:
        payload["top_p"] = float(top_p)
    if stop:
        payload["stop"] = list(stop)
    payload["stream"] = bool(stream)
    if deadline is not None:
        payload["deadline_ms"] = max(1, int(deadline * 1000))
    return payload


def encode_image_input(image: Any) -> tuple[bytes, str]:
    """An image for a request -> (encoded bytes, MIME type). Paths and bytes are sent as they are
    (the device checks them); an HxWx3 uint8 RGB ndarray (as the runtime takes) becomes a JPEG
    (quality 95), an HxW one a grey JPEG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            data = f.read()
    elif type(image).__module__ == "numpy" and hasattr(image, "shape"):
        import cv2
        import numpy as np

        arr = np.asarray(image)
        if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
            raise ValueError(f"an image array must be HxWx3 (RGB) or HxW uint8, got {arr.shape} {arr.dtype}")
        ok, buf = cv2.imencode(".jpg", arr[:, :, ::-1] if arr.ndim == 3 else arr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise ValueError("cannot encode the image array as JPEG")
        return buf.tobytes(), "image/jpeg"
    else:
        raise TypeError(f"an image must be a path, bytes or a numpy array, not {type(image).__name__}")
    return data, sniff_mime(data) or "application/octet-stream"


def prepare_images(payload: dict, *, binary: bool = True) -> tuple[dict, tuple[bytes, str] | None]:
    """Turn ``{"type": "image", "image": ...}`` parts of a chat payload into protocol parts. With
    ``binary`` and exactly one such image (and a JSON request that fits a user property), that image
    becomes the MQTT 5 payload (``{"type": "image", "payload": true}``); otherwise base64 ``data``."""
    found: list[tuple[dict, bytes, str]] = []
    for m in payload.get("messages") or []:
        content = m.get("content")
        if not isinstance(content, list):
            continue
        m["content"] = content = list(content)  # never modify the caller's messages
        for i, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "image" and "image" in part:
                data, mime = encode_image_input(part["image"])
                new = {k: v for k, v in part.items() if k != "image"}
                content[i] = new
                found.append((new, data, mime))
    if not found:
        return payload, None
    if binary and len(found) == 1:
        part, data, mime = found[0]
        part["payload"] = True
        if len(dumps(payload)) <= _MAX_USER_PROPERTY and mime.startswith("image/"):
            return payload, (data, mime)
        del part["payload"]
    for part, data, mime in found:
        part["data"] = base64.b64encode(data).decode("ascii")
        if mime.startswith("image/"):
            part["mime"] = mime
    return payload, None


def build_watch_payload(camera: str, prompt: str, *, every: float, on_change: bool = False,
                        change_threshold: float | None = None, max_tokens: int | None = None,
                        temperature: float | None = None, seed: int | None = None, expires: float | None = None,
                        persistent: bool = False, system: str | None = None, job_id: str | None = None) -> dict:
    payload: dict[str, Any] = {"v": 1, "request_id": job_id or f"w{uuid.uuid4().hex[:16]}", "camera": camera,
                               "prompt": prompt, "every_s": float(every), "on_change": bool(on_change),
                               "persistent": bool(persistent)}
    for k, v in (("change_threshold", change_threshold), ("max_tokens", max_tokens), ("seed", seed),
                 ("system", system)):
        if v is not None:
            payload[k] = v
    if temperature is not None:
        payload["temperature"] = float(temperature)
    if expires is not None:
        payload["expires_s"] = float(expires)
    return payload


def _watch_item(ev: dict) -> Any:
    kind = ev.get("type")
    if kind == "watch":
        return WatchEvent.model_validate(ev)
    if kind == "watch_error":
        return WatchError.model_validate(ev)
    if kind == "watch_end":
        return WatchEnd.model_validate(ev)
    return None


class _WatchBase:
    """What the sync and async watch handles share: subscription, registration, cancel and the
    handling of each queued item; only the wait for the next item differs."""

    _q: Any  # the subclass's queue (queue.Queue or asyncio.Queue), made before this __init__ runs

    def __init__(self, core: _Core, payload: dict, deliver: Callable[[Any], None], event_timeout: float | None):
        self._core = core
        self.event_timeout = event_timeout
        self.end: WatchEnd | None = None
        self.job_id: str = payload["request_id"]
        self.camera: str = payload["camera"]
        self.persistent: bool = payload["persistent"]
        self.events_topic = core.topics.watch_events(self.camera, core.name, self.job_id)
        self.registration: WatchRegistered | None = None
        self._deliver = deliver
        self._finished = False
        self._listening = False

    def _on_offline(self) -> None:
        if not self.persistent and not self._finished:
            self._deliver(DeviceOfflineError(f"device {self._core.topics.device_id!r} went offline; "
                                             f"watch job {self.job_id} is gone", code="offline", status=503))

    def _listen(self, timeout: float) -> None:
        self._core.add_subscription(self.events_topic, self._deliver, timeout)
        self._core._offline_listeners.append(self._on_offline)
        self._core._watches.append(self)
        self._listening = True

    def _stop_listening(self) -> None:
        if self._listening:
            self._listening = False
            self._core.remove_subscription(self.events_topic)
            for lst, item in ((self._core._offline_listeners, self._on_offline), (self._core._watches, self)):
                try:
                    lst.remove(item)
                except ValueError:
                    pass

    def _send_cancel(self) -> None:
        try:
            self._core.client.publish(self._core.topics.request(self._core.name, "watch_cancel"),
                                      dumps({"v": 1, "job_id": self.job_id}), qos=1, properties=publish_props())
        except Exception:  # pragma: no cover
            log.debug("watch_cancel publish failed", exc_info=True)

    def _detach(self) -> None:
        self._stop_listening()
        if not self._finished:
            self._q.put_nowait(None)  # wakes a waiting get(), which then ends the iteration

    def _no_event(self, timeout: float | None) -> RequestTimeoutError:
        return RequestTimeoutError(f"no watch event for job {self.job_id} within {timeout} s",
                                   request_id=self.job_id, code="timeout")

    def _take(self, item: Any) -> WatchEvent | WatchError | None:
        """Handle one queued item: the event to return, or None (skipped, or the end: then
        ``_finished`` is set). Raises a delivered exception (offline, client closed)."""
        if item is None:  # detach() or the client closed
            self._finished = True
            return None
        if isinstance(item, BaseException):
            self._finished = True
            self._stop_listening()
            raise item
        ev = _watch_item(item)
        if isinstance(ev, WatchEnd):
            self.end = ev
            self._finished = True
            self._stop_listening()
            return None
        return ev


class WatchHandle(_WatchBase):
    """Events of one watch job: ``for ev in handle`` yields ``WatchEvent`` (an answer) and
    ``WatchError`` (a tick that failed, e.g. the camera was lost; the job goes on) until the job
    ends (expired, cancelled elsewhere) or ``cancel()``. ``get(timeout)`` waits for one event.
    Leaving a ``with`` block cancels the job; ``detach()`` stops listening and leaves it running."""

    def __init__(self, core: _Core, payload: dict, event_timeout: float | None):
        self._q: queue.Queue = queue.Queue()
        super().__init__(core, payload, self._q.put, event_timeout)

    def get(self, timeout: float | None = None) -> WatchEvent | WatchError:
        """The next event; RequestTimeoutError if none within ``timeout``; StopIteration at the end."""
        while not self._finished:
            try:
                item = self._q.get(timeout=timeout)
            except queue.Empty:
                raise self._no_event(timeout) from None
            ev = self._take(item)
            if ev is not None:
                return ev
        raise StopIteration

    def __iter__(self) -> Iterator[WatchEvent | WatchError]:
        return self

    def __next__(self) -> WatchEvent | WatchError:
        return self.get(self.event_timeout)

    def cancel(self) -> None:
        """End the job on the device (idempotent); iteration stops at once."""
        self._send_cancel()
        self.detach()

    def detach(self) -> None:
        """Stop listening; the job keeps running on the device (e.g. a persistent one)."""
        self._detach()

    def __enter__(self) -> "WatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class AsyncWatchHandle(_WatchBase):
    """``async for ev in handle``; ``await handle.get(timeout)``; ``await handle.cancel()``."""

    def __init__(self, core: _Core, payload: dict, loop: asyncio.AbstractEventLoop, event_timeout: float | None):
        self._q: asyncio.Queue = asyncio.Queue()
        super().__init__(core, payload, _threadsafe_putter(loop, self._q), event_timeout)

    async def get(self, timeout: float | None = None) -> WatchEvent | WatchError:
        while not self._finished:
            try:
                item = await asyncio.wait_for(self._q.get(), timeout=timeout)
            except asyncio.TimeoutError:
                raise self._no_event(timeout) from None
            ev = self._take(item)
            if ev is not None:
                return ev
        raise StopAsyncIteration

    def __aiter__(self) -> AsyncIterator[WatchEvent | WatchError]:
        return self

    async def __anext__(self) -> WatchEvent | WatchError:
        return await self.get(self.event_timeout)

    async def cancel(self) -> None:
        self._send_cancel()
        await self.detach()

    async def detach(self) -> None:
        self._detach()

    async def __aenter__(self) -> "AsyncWatchHandle":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.cancel()


def _register_watch(core: _Core, handle: _WatchBase, payload: dict, timeout: float) -> None:
    """Subscribe the events topic, then register the job (so no event can be missed)."""
    handle._listen(timeout)
    try:
        ev = core.request("watch", payload, timeout)
    except BaseException:
        handle._stop_listening()
        raise
    handle.registration = WatchRegistered.model_validate(ev)


def _snapshot_bytes(ev: dict) -> bytes:
    if "bytes" in ev:
        return ev["bytes"]
    return base64.b64decode(ev.get("data") or "")


# --- sync client ------------------------------------------------------------------------------------


class _StreamBase:
    """What ``ChatStream`` and ``AsyncChatStream`` share: the deadline, the handling of each queued
    event and cancel/close; only the wait for the next item (queue.get or asyncio.wait_for) differs."""

    def __init__(self, core: _Core, pending: _Pending, q: Any, timeout: float):
        self._core = core
        self._p = pending
        self._q = q
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        self.request_id = pending.request_id
        self.result: ChatResult | None = None
        self.queue_position: int | None = None
        self._finished = False

    def _left(self) -> float:
        """Seconds left before the request times out (never negative)."""
        return max(0.0, self._deadline - time.monotonic())

    def _timed_out(self) -> RequestTimeoutError:
        """End the stream after its deadline passed: forget and cancel the request."""
        self._finished = True
        self._core.forget(self.request_id)
        self._core.cancel(self.request_id)
        return RequestTimeoutError(f"no final answer for {self.request_id} within {self._timeout:.1f} s",
                                   request_id=self.request_id, code="timeout")

    def _take(self, item: Any) -> ChatDelta | None:
        """Handle one queued item: a delta to return, or None ('accepted', or the result: then
        ``_finished`` is set). Raises the error an item stands for."""
        err = _item_error(item)
        if err is not None:
            self._finished = True
            raise err
        kind = item.get("type")
        if kind == "accepted":
            self.queue_position = item.get("queue_position")
        elif kind == "delta":
            return Delta.model_validate(item)
        elif kind == "result":
            self._finished = True
            self.result = Result.model_validate(item)
        return None

    def cancel(self) -> None:
        """Ask the device to stop; the stream then ends with finish_reason 'cancelled'."""
        if not self._finished:
            self._core.cancel(self.request_id)

    def _close(self) -> None:
        if not self._finished:
            self._finished = True
            self._core.forget(self.request_id)
            self._core.cancel(self.request_id)


class ChatStream(_StreamBase):
    """Iterator over a request's ``ChatDelta``s; ``.result`` holds the ``ChatResult`` afterwards.
    Closing it early (or leaving a ``with`` block) cancels the request on the device."""

    def __iter__(self) -> Iterator[ChatDelta]:
        return self

    def __next__(self) -> ChatDelta:
        while not self._finished:
            try:
                item = self._q.get(timeout=self._left())
            except queue.Empty:
                raise self._timed_out() from None
            delta = self._take(item)
            if delta is not None:
                return delta
        raise StopIteration

    def wait(self) -> ChatResult:
        """Consume the rest of the stream and return the final result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    @property
    def text(self) -> str | None:
        return self.result.text if self.result else None

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class Client:
    """A synchronous client for one device. Thread-safe: several threads may chat at once."""

    def __init__(self, host: str = "localhost", port: int = 1883, device_id: str | None = None, *,
                 prefix: str = DEFAULT_PREFIX, username: str | None = None, password: str | None = None,
                 client_id: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_insecure: bool = False, transport: str = "tcp",
                 timeout: float = 120.0, connect_timeout: float = 5.0, status_wait: float = 2.0,
                 keepalive: int = 15):
        """Connect to the broker (``BrokerConnectionError`` if it cannot). ``device_id`` None:
        discover the one device under ``prefix``. ``timeout``: default per-request timeout (s)."""
        self._st = _Settings(host, port, device_id, prefix, username, password, client_id, tls_ca, tls_cert,
                             tls_key, tls_insecure, transport, keepalive, timeout, connect_timeout, status_wait)
        self._core = _Core(self._st)
        self._core.connect()

    @property
    def device_id(self) -> str:
        return self._core.topics.device_id

    @property
    def client_id(self) -> str:
        return self._core.client_id

    @property
    def status(self) -> str | None:
        """The device's last known status: 'online', 'stopping', 'offline' or None (unknown)."""
        return self._core.status

    def wait_status(self, timeout: float = 2.0) -> str | None:
        """The device's status, waiting up to ``timeout`` s while it is still unknown."""
        return self._core.wait_status(timeout)

    def capabilities(self, timeout: float = 5.0) -> Capabilities:
        """The device's retained capabilities (model, modalities, limits, schema version)."""
        return self._core.capabilities(timeout)

    def chat(self, messages: str | Iterable[Any] | None = None, *, prompt: str | list[int] | None = None,
             max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, seed: int | None = None, stop: list[str] | None = None,
             stream: bool = False, timeout: float | None = None, deadline: float | None = None,
             priority: int | None = None, request_id: str | None = None) -> ChatResult | ChatStream:
        """Run a chat request. ``messages``: a string (one user turn) or [{"role", "content"}].
        ``stream=False`` returns the ``ChatResult``; ``stream=True`` a ``ChatStream`` of deltas.
        ``timeout`` (s) bounds the wait here; ``deadline`` (s) makes the device stop generating
        (finish_reason 'deadline'). Raises BusyError, BadRequestError, DeviceOfflineError,
        RequestTimeoutError, ServerError."""
        timeout = self._st.timeout if timeout is None else timeout
        payload = build_chat_payload(messages, prompt=prompt, request_id=request_id, max_tokens=max_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                     stream=stream, deadline=deadline, priority=priority)
        payload, attachment = prepare_images(payload)
        q: queue.Queue = queue.Queue()
        p = self._core.submit(payload, q.put, timeout, attachment=attachment)
        s = ChatStream(self._core, p, q, timeout)
        return s if stream else s.wait()

    def cancel(self, request_id: str) -> None:
        """Ask the device to stop a request (harmless if it is unknown or finished)."""
        self._core.cancel(request_id)

    def snapshot(self, camera: str, *, max_side: int | None = None, timeout: float | None = None) -> bytes:
        """The newest frame of the device's camera ``camera`` as JPEG bytes (scaled to fit
        ``max_side``, default the device's snapshot_max_side). Raises UnsupportedMediaError for an
        unknown camera, CameraUnavailableError when it has no fresh frame."""
        payload = _snapshot_payload(camera, max_side)
        return _snapshot_bytes(self._core.request("snapshot", payload, self._st.timeout if timeout is None else timeout))

    def watch(self, camera: str, prompt: str, *, every: float, on_change: bool = False,
              change_threshold: float | None = None, max_tokens: int | None = None, temperature: float | None = None,
              seed: int | None = None, expires: float | None = None, persistent: bool = False,
              system: str | None = None, job_id: str | None = None, timeout: float | None = None,
              event_timeout: float | None = None) -> WatchHandle:
        """Ask ``prompt`` about camera ``camera`` every ``every`` seconds (``on_change``: only when
        the scene changed, at most that often) until cancelled or ``expires`` seconds passed.
        ``persistent``: the job survives a daemon restart. Returns a ``WatchHandle`` to iterate
        (``event_timeout``: how long iteration waits for each event; None: forever)."""
        payload = build_watch_payload(camera, prompt, every=every, on_change=on_change,
                                      change_threshold=change_threshold, max_tokens=max_tokens,
                                      temperature=temperature, seed=seed, expires=expires, persistent=persistent,
                                      system=system, job_id=job_id)
        h = WatchHandle(self._core, payload, event_timeout)
        _register_watch(self._core, h, payload, self._st.timeout if timeout is None else min(timeout, self._st.timeout))
        return h

    def cancel_watch(self, job_id: str) -> None:
        """End a watch job of this client name (e.g. a persistent one from an earlier run)."""
        self._core.client.publish(self._core.topics.request(self._core.name, "watch_cancel"),
                                  dumps({"v": 1, "job_id": job_id}), qos=1, properties=publish_props())

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- asyncio client ---------------------------------------------------------------------------------


class AsyncChatStream(_StreamBase):
    """``async for delta in stream``; ``.result`` afterwards. ``await stream.aclose()`` cancels."""

    def __aiter__(self) -> AsyncIterator[ChatDelta]:
        return self

    async def __anext__(self) -> ChatDelta:
        while not self._finished:
            try:
                item = await asyncio.wait_for(self._q.get(), timeout=self._left())
            except asyncio.TimeoutError:
                raise self._timed_out() from None
            delta = self._take(item)
            if delta is not None:
                return delta
        raise StopAsyncIteration

    async def wait(self) -> ChatResult:
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def aclose(self) -> None:
        self._close()

    async def __aenter__(self) -> "AsyncChatStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class AsyncClient:
    """The asyncio twin of ``Client``: ``async with AsyncClient(...) as c: await c.chat(...)``.
    paho runs in its own thread; events reach the event loop with call_soon_threadsafe."""

    def __init__(self, host: str = "localhost", port: int = 1883, device_id: str | None = None, *,
                 prefix: str = DEFAULT_PREFIX, username: str | None = None, password: str | None = None,
                 client_id: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_insecure: bool = False, transport: str = "tcp",
                 timeout: float = 120.0, connect_timeout: float = 5.0, status_wait: float = 2.0,
                 keepalive: int = 15):
        self._st = _Settings(host, port, device_id, prefix, username, password, client_id, tls_ca, tls_cert,
                             tls_key, tls_insecure, transport, keepalive, timeout, connect_timeout, status_wait)
        self._core: _Core | None = None

    async def connect(self) -> "AsyncClient":
        if self._core is None:
            def _mk():
                core = _Core(self._st)
                core.connect()
                return core
            self._core = await asyncio.get_running_loop().run_in_executor(None, _mk)
        return self

    async def _c(self) -> _Core:
        return self._core or (await self.connect())._core

    @property
    def device_id(self) -> str | None:
        return self._core.topics.device_id if self._core else self._st.device_id

    @property
    def status(self) -> str | None:
        return self._core.status if self._core else None

    async def capabilities(self, timeout: float = 5.0) -> Capabilities:
        core = await self._c()
        return await asyncio.get_running_loop().run_in_executor(None, core.capabilities, timeout)

    async def chat(self, messages: str | Iterable[Any] | None = None, *, prompt: str | list[int] | None = None,
                   max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None, seed: int | None = None, stop: list[str] | None = None,
                   stream: bool = False, timeout: float | None = None, deadline: float | None = None,
                   priority: int | None = None, request_id: str | None = None) -> ChatResult | AsyncChatStream:
        """As ``Client.chat``; with ``stream=True`` returns an ``AsyncChatStream``."""
        core = await self._c()
        timeout = self._st.timeout if timeout is None else timeout
        payload = build_chat_payload(messages, prompt=prompt, request_id=request_id, max_tokens=max_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                     stream=stream, deadline=deadline, priority=priority)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        deliver = _threadsafe_putter(loop, q)
        if core.status is None:  # waiting for the retained status blocks: do it off the loop
            await loop.run_in_executor(None, core.wait_status, min(self._st.status_wait, timeout))
        payload, attachment = prepare_images(payload)
        p = core.submit(payload, deliver, timeout, attachment=attachment)
        s = AsyncChatStream(core, p, q, timeout)
        return s if stream else await s.wait()

    async def cancel(self, request_id: str) -> None:
        (await self._c()).cancel(request_id)

    async def snapshot(self, camera: str, *, max_side: int | None = None, timeout: float | None = None) -> bytes:
        """As ``Client.snapshot``."""
        core = await self._c()
        payload = _snapshot_payload(camera, max_side)
        t = self._st.timeout if timeout is None else timeout
        ev = await asyncio.get_running_loop().run_in_executor(None, core.request, "snapshot", payload, t)
        return _snapshot_bytes(ev)

    async def watch(self, camera: str, prompt: str, *, every: float, on_change: bool = False,
                    change_threshold: float | None = None, max_tokens: int | None = None,
                    temperature: float | None = None, seed: int | None = None, expires: float | None = None,
                    persistent: bool = False, system: str | None = None, job_id: str | None = None,
                    timeout: float | None = None, event_timeout: float | None = None) -> AsyncWatchHandle:
        """As ``Client.watch``; returns an ``AsyncWatchHandle`` (``async for ev in handle``)."""
        core = await self._c()
        payload = build_watch_payload(camera, prompt, every=every, on_change=on_change,
                                      change_threshold=change_threshold, max_tokens=max_tokens,
                                      temperature=temperature, seed=seed, expires=expires, persistent=persistent,
                                      system=system, job_id=job_id)
        loop = asyncio.get_running_loop()
        h = AsyncWatchHandle(core, payload, loop, event_timeout)
        t = self._st.timeout if timeout is None else min(timeout, self._st.timeout)
        await loop.run_in_executor(None, _register_watch, core, h, payload, t)
        return h

    async def close(self) -> None:
        if self._core is not None:
            core, self._core = self._core, None
            await asyncio.get_running_loop().run_in_executor(None, core.close)

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()


# --- discovery ----------------------------------------------------------------------------------------


def discover(host: str = "localhost", port: int = 1883, *, prefix: str = DEFAULT_PREFIX, timeout: float = 1.0,
             username: str | None = None, password: str | None = None, tls_ca: str | None = None,
             tls_cert: str | None = None, tls_key: str | None = None, tls_insecure: bool = False,
             transport: str = "tcp") -> dict[str, dict]:
    """Devices announced under ``prefix``: device id -> capabilities dict plus its 'status'.
    Reads the retained ``P/v1/+/capabilities`` and ``P/v1/+/status`` for ``timeout`` seconds."""
    found: dict[str, dict] = {}
    done = threading.Event()
    c = make_client(new_client_id("edge-sdk-discover"), username=username, password=password, tls_ca=tls_ca,
                    tls_cert=tls_cert, tls_key=tls_key, tls_insecure=tls_insecure, transport=transport)
    t = Topics(prefix, "x")

    def on_connect(client, userdata, flags, rc, props):
        if not rc.is_failure:
            client.subscribe([(t.all_devices("capabilities"), 1), (t.all_devices("status"), 1)])

    def on_message(client, userdata, msg):
        parts = msg.topic.split("/")
        dev, leaf = parts[-2], parts[-1]
        entry = found.setdefault(dev, {})
        try:
            if leaf == "capabilities" and msg.payload:
                entry.update(json.loads(msg.payload))
            elif leaf == "status":
                entry["status"] = msg.payload.decode("utf-8", "replace")
        except ValueError:
            pass

    c.on_connect = on_connect
    c.on_message = on_message
    try:
        c.connect(host, port, keepalive=10)
    except OSError as e:
        raise BrokerConnectionError(f"cannot reach the MQTT broker at {host}:{port}: {e}") from e
    c.loop_start()
    done.wait(timeout)
    c.disconnect()
    c.loop_stop()
    return {d: e for d, e in found.items() if e}
