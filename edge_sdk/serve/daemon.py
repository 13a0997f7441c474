"""The MQTT daemon: one model, many clients, over a local broker (mosquitto).

Threads (nothing slow runs on paho's network thread):

- paho's network thread: ``_on_message`` validates a request, admits it (or refuses it at once
  with an error event) and enqueues it; it never runs the model.
- the worker: pops the highest-priority request and streams it through ``model.stream``,
  coalescing token deltas into few messages.

``client.publish`` is never called while the scheduler lock is held: paho holds its callback
lock around ``on_message`` and may take it inside ``publish``, so holding ours across a publish
could deadlock against the network thread. Code under the lock collects what to send and sends it
after releasing.
- the housekeeper: expires queued requests at their deadline, publishes health, pets the systemd
  watchdog.
- the watch thread (watch.py) ticks watch jobs and hands their inferences to the worker's queue
  at the lowest priority; a media thread encodes snapshots; one reader thread per camera
  (cameras.py).

The daemon needs only the standard library, paho and pydantic; it never imports torch.
"""

from __future__ import annotations

import base64
import concurrent.futures
import heapq
import json
import itertools
import logging
import math
import os
import re
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

import edge_sdk
from edge_sdk.mqtt_common import (NAME_RE, SCHEMA_VERSION, Topics, dumps, make_client, prop,
                                  publish_props, user_props)
from edge_sdk.runtime.types import GenerationError
from edge_sdk.serve.config import ServeSettings
from edge_sdk.serve.cameras import CameraHub, ImageRejected, check_image_bytes, decode_rgb
from edge_sdk.serve.protocol import (ERROR_STATUS, ID_PATTERN, JOB_ID_PATTERN, PROMPT_PROPERTY, REQUEST_PROPERTY,
                                     CancelRequest, ChatRequest, ImagePart, SnapshotRequest, WatchCancelRequest,
                                     WatchRequest)
from edge_sdk.serve.sdnotify import Notifier
from edge_sdk.serve.watch import WatchManager, WatchRefused

log = logging.getLogger("edge_sdk.serve")

_ID_RE = re.compile(ID_PATTERN)
_JOB_ID_RE = re.compile(JOB_ID_PATTERN)
OPS = ("chat", "cancel", "watch", "watch_cancel", "snapshot")
WATCH_PRIORITY = -1  # below every client request (0..9)


class UnsupportedMediaError(GenerationError):
    """A content part the model or the daemon cannot take (an image without vision, an unknown camera)."""


def default_image_resolver(part: ImagePart) -> Any:
    """Inline images become bytes (kept for callers that pass their own resolver; the daemon's own
    resolution, with cameras and size checks, is ``Daemon._resolve_image``)."""
    if part.data is not None:
        return base64.b64decode(part.data)
    raise UnsupportedMediaError(f"no camera source {part.camera!r} on this device")


@dataclass
class _Reply:
    """Where a request's events go: the validated reply topic and the Correlation Data to echo."""

    topic: str
    correlation: bytes | None
    request_id: str | None = None


@dataclass(eq=False)
class Job:
    client: str
    request_id: str
    req: ChatRequest
    reply: _Reply
    received: float
    deadline: float | None
    order: int
    cancel: threading.Event = field(default_factory=threading.Event)
    seq: int = 0
    state: str = "queued"  # queued | running | done
    attachment: bytes | None = None  # the MQTT 5 binary image payload (image parts with payload: true)
    prompt: Any = None  # a ready prompt (watch jobs) instead of req.messages
    prio: int | None = None  # overrides req.priority (watch jobs: WATCH_PRIORITY)
    sink: Callable[[dict], None] | None = None  # gets the terminal event instead of the reply topic

    @property
    def key(self) -> tuple[str, str]:
        return (self.client, self.request_id)

    @property
    def priority(self) -> int:
        return self.req.priority if self.prio is None else self.prio

    def sort_key(self) -> tuple[int, int]:
        return (-self.priority, self.order)

    def __lt__(self, other: "Job") -> bool:
        return self.sort_key() < other.sort_key()

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def model_info(model: Any) -> dict:
    """name / context_length / modalities from ``model.capabilities()`` where it exists."""
    caps = getattr(model, "capabilities", None)
    info: dict = {}
    try:
        info = dict(caps() if callable(caps) else (caps or {}))
    except Exception:  # a broken capabilities() must not stop the daemon
        log.exception("model.capabilities() failed")
    name = info.get("model") or info.get("name") or getattr(model, "name", None) or type(model).__name__
    mods = info.get("modalities") or ["text"]
    return {"name": str(name), "context_length": info.get("context_length"), "modalities": list(mods)}


class Daemon:
    """Serve ``model`` on the broker named in ``settings``. ``start()``/``stop()`` for embedding
    (tests, bench); ``serve_forever()`` for the CLI (signals, systemd notify)."""

    def __init__(self, model: Any, settings: ServeSettings | None = None, *,
                 image_resolver: Callable[[ImagePart], Any] | None = None):
        self.model = model
        self.s = settings or ServeSettings()
        self.topics = Topics(self.s.topic_prefix, self.s.device_id)
        self.image_resolver = image_resolver
        self.info = model_info(model)
        self.hub = CameraHub(self.s.cameras, loop=self.s.camera_loop, reconnect_max_s=self.s.camera_reconnect_max_s,
                             stale_s=self.s.camera_timeout_s)
        self.watch = WatchManager(self)
        self._media = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-sdk-media")
        self.started_at = time.time()
        self._t0 = time.monotonic()

        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._queue: list[Job] = []
        self._active: dict[tuple[str, str], Job] = {}
        self._recent: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._running: Job | None = None
        self._order = itertools.count()
        self._stopping = False
        self._stopped = threading.Event()
        self.connected = threading.Event()
        self._ever_connected = False
        self.stats = dict(completed=0, failed=0, cancelled=0, rejected_busy=0, dropped_messages=0,
                          generated_tokens=0, connects=0)
        self._last_tps = 0.0
        self._avg_req_s = 1.0
        self._threads: list[threading.Thread] = []
        self.notifier = Notifier()

        s = self.s
        self.client = make_client(
            s.effective_client_id, username=s.username,
            password=s.password.get_secret_value() if s.password else None,
            tls_ca=str(s.tls_ca) if s.tls_ca else None, tls_cert=str(s.tls_cert) if s.tls_cert else None,
            tls_key=str(s.tls_key) if s.tls_key else None, tls_insecure=s.tls_insecure,
            transport=s.transport, max_queued_messages=s.max_queued_messages)
        self.client.will_set(self.topics.status, b"offline", qos=1, retain=True)
        self.client.reconnect_delay_set(s.reconnect_min_delay_s, s.reconnect_max_delay_s)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "Daemon":
        s = self.s
        log.info("serving model %s as device %r on %s:%s (prefix %r)", self.info["name"], s.device_id,
                 s.host, s.port, s.topic_prefix)
        self.hub.start()
        for name, target in (("edge-sdk-worker", self._worker_loop), ("edge-sdk-housekeeper", self._housekeeper_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.watch.start()
        if self.watch.thread is not None:
            self._threads.append(self.watch.thread)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        self.client.connect_async(s.host, s.port, keepalive=s.keepalive, clean_start=True, properties=props)
        self.client.loop_start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self, grace_s: float | None = None) -> None:
        """Refuse new work, let the running request finish (up to ``grace_s``), end every other
        request with an error, say 'offline' and disconnect."""
        if self._stopped.is_set():
            return
        grace_s = self.s.stop_grace_s if grace_s is None else grace_s
        log.info("stopping (grace %.1f s)", grace_s)
        self.notifier.notify("STOPPING=1")
        self.watch.stop()
        with self._lock:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
        self._send(self.topics.status, b"stopping", retain=True)
        for job in queued:
            self._finish(job, self._error_event(job.request_id, job.next_seq(), "stopping",
                                                "the daemon is shutting down"))
        end = time.monotonic() + grace_s
        while self._running is not None and time.monotonic() < end:
            time.sleep(0.01)
        running = self._running
        if running is not None:
            running.cancel.set()
            end = time.monotonic() + 2.0
            while self._running is not None and time.monotonic() < end:
                time.sleep(0.01)
        self._stopped.set()
        with self._cv:
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=3.0)
        self._media.shutdown(wait=True, cancel_futures=True)
        self.hub.close()
        if self.connected.is_set():
            info = self.client.publish(self.topics.status, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self.notifier.close()
        log.info("stopped")

    def serve_forever(self, stop_event: threading.Event | None = None) -> bool:
        """Run until SIGTERM/SIGINT (or ``stop_event``), then stop gracefully. False if it ended
        because an internal thread died (the CLI then exits non-zero for systemd to restart it)."""
        stop_event = stop_event or threading.Event()

        def _sig(signum, frame):
            log.info("signal %s received", signal.Signals(signum).name)
            stop_event.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _sig)
            signal.signal(signal.SIGINT, _sig)
        self.start()
        healthy = True
        try:
            while not stop_event.wait(0.5):
                if not all(t.is_alive() for t in self._threads):
                    log.error("an internal thread died; exiting so that systemd restarts the daemon")
                    healthy = False
                    break
        finally:
            self.stop()
        return healthy

    # --- MQTT callbacks (network thread) ----------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        self.stats["connects"] += 1
        client.subscribe(self.topics.request_filter, qos=1)
        # Subscription first: the broker handles packets in order, so once 'online' is visible the
        # request topic is live (clients may wait for 'online' before sending).
        client.publish(self.topics.capabilities, dumps(self.capabilities()), qos=1, retain=True,
                       properties=publish_props())
        client.publish(self.topics.status, b"online", qos=1, retain=True)
        self._ever_connected = True
        self.connected.set()
        log.info("connected to broker (%s), subscribed to %s", "again" if self.stats["connects"] > 1 else "first time",
                 self.topics.request_filter)
        if self.stats["connects"] == 1:
            self.notifier.notify("READY=1\nSTATUS=serving")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if not self._stopped.is_set():
            log.warning("disconnected from broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg):
        try:
            self._handle(msg)
        except Exception:  # never let an exception kill paho's loop
            log.exception("unexpected error handling a message on %s", msg.topic)

    # --- admission --------------------------------------------------------------------------------

    def _handle(self, msg: mqtt.MQTTMessage) -> None:
        parsed = self.topics.parse_request(msg.topic)
        if parsed is None or not NAME_RE.match(parsed[0]):
            log.warning("dropped a message on %r: no valid client name level to reply to", msg.topic)
            self.stats["dropped_messages"] += 1
            return
        client_name, op, extra = parsed
        corr = prop(msg, "CorrelationData")
        corr = bytes(corr) if corr is not None else None
        reply = _Reply(self.topics.inbox(client_name), corr, _rid_from_correlation(corr))
        bad_topic = None
        resp_topic = prop(msg, "ResponseTopic")
        if resp_topic is not None:
            if self._reply_topic_ok(resp_topic, client_name):
                reply.topic = resp_topic
            else:
                bad_topic = resp_topic

        payload = msg.payload
        attachment = None
        ctype = prop(msg, "ContentType")
        if isinstance(ctype, str) and ctype.lower().startswith("image/"):
            # MQTT 5 binary image request: the payload is the image, the JSON request is the user
            # property 'request' (or just the text in 'prompt').
            attachment = bytes(payload)
            up = user_props(msg)
            if REQUEST_PROPERTY in up:
                payload = up[REQUEST_PROPERTY].encode("utf-8")
            else:
                content: list[dict] = [{"type": "image", "payload": True}]
                if PROMPT_PROPERTY in up:
                    content.append({"type": "text", "text": up[PROMPT_PROPERTY]})
                payload = dumps({"v": 1, "messages": [{"role": "user", "content": content}]})
        if len(payload) > self.s.max_payload_bytes:
            return self._reject(reply, "payload_too_large",
                                f"payload of {len(payload)} bytes exceeds {self.s.max_payload_bytes}")
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as e:
            return self._reject(reply, "invalid_json", f"payload is not JSON: {e}")
        if isinstance(data, dict):
            rid = data.get("request_id")
            if isinstance(rid, str) and _ID_RE.match(rid):
                reply.request_id = rid
            rt = data.get("reply_to")
            if resp_topic is None and isinstance(rt, str):
                if self._reply_topic_ok(rt, client_name):
                    reply.topic = rt
                else:
                    bad_topic = rt
        if bad_topic is not None:
            return self._reject(reply, "invalid_reply_topic",
                                f"reply topic {bad_topic!r} is not inside {self.topics.inbox_prefix(client_name)!r}")
        if extra or op not in OPS:
            return self._reject(reply, "unknown_op", f"unknown operation {'/'.join([op, *extra])!r}; "
                                                     f"ops: {', '.join(OPS)}")
        if not isinstance(data, dict):
            return self._reject(reply, "invalid_request", f"payload must be a JSON object, not {type(data).__name__}")
        if attachment is not None and op != "chat":
            return self._reject(reply, "invalid_request", f"a binary image payload is only accepted on 'chat', not {op!r}")
        if op == "cancel":
            return self._handle_cancel(client_name, data, reply)
        if op == "watch":
            return self._handle_watch(client_name, data, reply)
        if op == "watch_cancel":
            return self._handle_watch_cancel(client_name, data, reply)
        if op == "snapshot":
            return self._handle_snapshot(client_name, data, reply)
        return self._handle_chat(client_name, data, reply, attachment)

    def _reply_topic_ok(self, topic: str, client_name: str) -> bool:
        prefix = self.topics.inbox_prefix(client_name)
        return (topic.startswith(prefix) and len(topic) > len(prefix) and "+" not in topic
                and "#" not in topic and "\0" not in topic)

    def _handle_chat(self, client_name: str, data: dict, reply: _Reply, attachment: bytes | None = None) -> None:
        try:
            req = ChatRequest.model_validate(data)
        except ValidationError as e:
            return self._reject(reply, "invalid_request", _summarize(e), details=_details(e))
        rid = req.request_id or reply.request_id
        if rid is None:
            return self._reject(reply, "invalid_request",
                                "request_id missing: put it in the payload or in the MQTT 5 Correlation Data")
        reply.request_id = rid
        s = self.s
        if req.max_tokens is not None and req.max_tokens > s.max_tokens:
            return self._reject(reply, "invalid_request", f"max_tokens {req.max_tokens} exceeds this device's limit {s.max_tokens}")
        if req.messages is not None and len(req.messages) > s.max_messages:
            return self._reject(reply, "invalid_request", f"{len(req.messages)} messages exceed the limit {s.max_messages}")
        if _has_images(req) and "image" not in self.info["modalities"]:
            return self._reject(reply, "unsupported_media",
                                f"model {self.info['name']} takes no images (modalities: {self.info['modalities']})")
        refused = self._check_images(req, attachment)
        if refused is not None:
            return self._reject(reply, refused.code, refused.message)
        now = time.monotonic()
        deadline_ms = req.deadline_ms or s.max_deadline_ms
        job = Job(client_name, rid, req, reply, now, now + deadline_ms / 1000 if deadline_ms else None,
                  next(self._order), attachment=attachment)
        done = refuse = None
        with self._lock:
            if job.key in self._active:
                log.info("request %s/%s is already in progress; duplicate ignored", client_name, rid)
                return
            done = self._recent.get(job.key)
            mine = sum(1 for j in self._active.values() if j.client == client_name)
            if done is None:  # else it finished recently: its final event is sent again below
                if self._stopping:
                    refuse = ("stopping", "the daemon is shutting down", None)
                elif mine >= s.max_pending_per_client:
                    refuse = ("busy", f"client {client_name!r} already has {mine} requests pending "
                                      f"(limit {s.max_pending_per_client})", self._retry_after_ms())
                elif sum(1 for j in self._queue if j.sink is None) >= s.queue_length:  # watch runs never count
                    refuse = ("busy", f"queue full ({s.queue_length} waiting)", self._retry_after_ms())
                else:
                    position = sum(1 for j in self._queue if j.priority >= req.priority)
                    self._active[job.key] = job  # reserved: duplicates are ignored from here on
        if done is not None:
            log.info("request %s/%s already finished; resending its final event", client_name, rid)
            return self._send(reply.topic, done, correlation=reply.correlation)
        if refuse is not None:
            if refuse[0] == "busy":
                self.stats["rejected_busy"] += 1
            return self._reject(reply, refuse[0], refuse[1], retry_after_ms=refuse[2])
        # 'accepted' is queued in paho before the worker can see the job: seq order holds.
        self._send(reply.topic, {"v": 1, "type": "accepted", "request_id": rid, "seq": 0,
                                 "queue_position": position}, correlation=reply.correlation)
        with self._cv:
            stopping = self._stopping
            if not stopping:
                heapq.heappush(self._queue, job)
                self._cv.notify()
        if stopping:
            return self._finish(job, self._error_event(rid, job.next_seq(), "stopping", "the daemon is shutting down"))
        log.debug("accepted %s/%s (priority %d, position %d)", client_name, rid, req.priority, position)

    def _check_images(self, req: ChatRequest, attachment: bytes | None) -> ImageRejected | None:
        """Cheap checks of every image part before the request is accepted (no decoding here)."""
        parts = [p for m in (req.messages or []) if not isinstance(m.content, str)
                 for p in m.content if p.type == "image"]
        uses_payload = any(p.payload for p in parts)
        if attachment is not None and not uses_payload:
            return ImageRejected("invalid_request", "the request has a binary image payload but no image part "
                                                    "with \"payload\": true")
        if attachment is None and uses_payload:
            return ImageRejected("invalid_request", "an image part has \"payload\": true but the request's payload "
                                                    "is not an image (MQTT 5 content type image/*)")
        try:
            if attachment is not None:
                check_image_bytes(attachment, self.s.max_image_bytes)
            for p in parts:
                if p.camera is not None and p.camera not in self.hub:
                    raise ImageRejected("unsupported_media", f"no camera {p.camera!r} on this device "
                                                             f"(cameras: {', '.join(self.hub.names) or 'none'})")
                if p.data is not None:
                    check_image_bytes(base64.b64decode(p.data), self.s.max_image_bytes)
        except ImageRejected as e:
            return e
        return None

    def _handle_cancel(self, client_name: str, data: dict, reply: _Reply) -> None:
        try:
            req = CancelRequest.model_validate(data)
        except ValidationError as e:
            return self._reject(reply, "invalid_request", _summarize(e), details=_details(e))
        if req.all:
            self.watch.cancel_client(client_name, req.reply_to)
        elif self.watch.cancel(client_name, req.request_id):
            return
        ended = []
        with self._lock:
            if req.all:
                jobs = [j for j in self._active.values() if j.client == client_name
                        and (req.reply_to is None or j.reply.topic == req.reply_to)]
            else:
                j = self._active.get((client_name, req.request_id))
                jobs = [j] if j is not None else []
            if not jobs:
                log.debug("cancel from %s for %s: nothing in progress", client_name, req.request_id or "all")
            for job in jobs:
                job.cancel.set()
                if job.state == "queued":
                    self._queue.remove(job)
                    heapq.heapify(self._queue)
                    self.stats["cancelled"] += 1
                    ev = self._empty_result(job, "cancelled")
                    if self._close(job, ev):
                        ended.append((job, ev))
        for job, ev in ended:
            self._send(job.reply.topic, ev, correlation=job.reply.correlation)
        for job in jobs:
            log.info("cancel %s/%s (%s)", job.client, job.request_id, job.state)

    # --- watch jobs and snapshots -------------------------------------------------------------------

    def _handle_watch(self, client_name: str, data: dict, reply: _Reply) -> None:
        try:
            req = WatchRequest.model_validate(data)
        except ValidationError as e:
            return self._reject(reply, "invalid_request", _summarize(e), details=_details(e))
        job_id = req.request_id or reply.request_id
        if job_id is None or not _JOB_ID_RE.match(job_id):
            return self._reject(reply, "invalid_request", f"watch job id {job_id!r} (request_id or Correlation Data) "
                                                          f"must match {JOB_ID_PATTERN}: it is a topic level")
        reply.request_id = job_id
        if self._stopping:
            return self._reject(reply, "stopping", "the daemon is shutting down")
        try:
            spec, created = self.watch.register(client_name, job_id, req, reply.topic)
        except WatchRefused as e:
            if e.code == "busy":
                self.stats["rejected_busy"] += 1
            return self._reject(reply, e.code, e.message)
        self._send(reply.topic, {"v": 1, "type": "watch_registered", "request_id": job_id, "seq": 0, "job_id": job_id,
                                 "camera": spec.camera,
                                 "events_topic": self.topics.watch_events(spec.camera, client_name, job_id),
                                 "every_s": spec.every_s, "on_change": spec.on_change, "persistent": spec.persistent,
                                 "expires_at": round(spec.expires_at, 3) if spec.expires_at else None},
                   correlation=reply.correlation)

    def _handle_watch_cancel(self, client_name: str, data: dict, reply: _Reply) -> None:
        try:
            req = WatchCancelRequest.model_validate(data)
        except ValidationError as e:
            return self._reject(reply, "invalid_request", _summarize(e), details=_details(e))
        if not self.watch.cancel(client_name, req.job_id):
            log.debug("watch_cancel from %s for %s: no such job", client_name, req.job_id)

    def submit_watch(self, manager: WatchManager, wjob: Any, frame: Any, trigger: str, change: float | None) -> bool:
        """Queue one run of a watch job (watch thread). False if the queue is full or stopping."""
        sp = wjob.spec
        s = self.s
        req = ChatRequest.model_construct(stream=False, max_tokens=min(sp.max_tokens or s.default_max_tokens, s.max_tokens),
                                          temperature=sp.temperature, seed=sp.seed, priority=0)
        now = time.monotonic()
        job = Job("", f"watch-{sp.client}-{sp.job_id}-{wjob.seq}", req, _Reply("", None), now, None, next(self._order),
                  prompt=manager.prompt_for(wjob, frame.rgb()), prio=WATCH_PRIORITY,
                  sink=lambda ev: manager.finished(wjob, frame, trigger, change, ev))
        with self._cv:
            if self._stopping or len(self._queue) >= s.queue_length:
                return False
            wjob.running = job
            heapq.heappush(self._queue, job)
            self._cv.notify()
        return True

    def _handle_snapshot(self, client_name: str, data: dict, reply: _Reply) -> None:
        try:
            req = SnapshotRequest.model_validate(data)
        except ValidationError as e:
            return self._reject(reply, "invalid_request", _summarize(e), details=_details(e))
        reply.request_id = req.request_id or reply.request_id
        if req.camera not in self.hub:
            return self._reject(reply, "unsupported_media", f"no camera {req.camera!r} on this device "
                                                            f"(cameras: {', '.join(self.hub.names) or 'none'})")
        try:
            self._media.submit(self._snapshot, req, reply)
        except RuntimeError:  # executor shut down: stopping
            self._reject(reply, "stopping", "the daemon is shutting down")

    def _snapshot(self, req: SnapshotRequest | None, reply: _Reply | None, camera: str | None = None) -> None:
        """Media thread: encode the newest frame; reply (binary or base64 JSON) and refresh the
        retained ``R/camera/{cam}/snapshot``."""
        camera = req.camera if req is not None else camera
        s = self.s
        max_side = (req.max_side if req is not None else None) or s.snapshot_max_side
        try:
            jpeg, meta = self.hub.snapshot(camera, max_side=max_side, quality=s.snapshot_quality,
                                           timeout=s.camera_timeout_s)
        except ImageRejected as e:
            if reply is not None:
                self._reject(reply, e.code, e.message)
            return
        except Exception as e:  # pragma: no cover - OpenCV failure
            log.exception("snapshot of %s failed", camera)
            if reply is not None:
                self._reject(reply, "internal", f"{type(e).__name__}: {e}"[:500])
            return
        user = [("type", "snapshot"), *((k, str(v)) for k, v in meta.items() if k != "mime")]
        if max_side == s.snapshot_max_side:
            self._send(self.topics.snapshot(camera), jpeg, qos=0, retain=True, content_type="image/jpeg", user=user)
        if reply is None:
            return
        if req.encoding == "base64":
            self._send(reply.topic, {"v": 1, "type": "snapshot", "request_id": reply.request_id, "seq": 0, **meta,
                                     "data": base64.b64encode(jpeg).decode("ascii")}, correlation=reply.correlation)
        else:
            rid = [("request_id", reply.request_id)] if reply.request_id else []
            self._send(reply.topic, jpeg, correlation=reply.correlation, content_type="image/jpeg",
                       user=[*user, *rid, ("seq", "0")])

    def _retry_after_ms(self) -> int:
        return int(max(100, min(60_000, (len(self._queue) + 1) * self._avg_req_s * 1000)))

    def _reject(self, reply: _Reply, code: str, message: str, **extra) -> None:
        log.info("refused request %s -> %s: %s %s", reply.request_id, reply.topic, code, message)
        self._send(reply.topic, self._error_event(reply.request_id, 0, code, message, **extra),
                   correlation=reply.correlation)

    @staticmethod
    def _error_event(request_id, seq, code, message, **extra) -> dict:
        ev = {"v": 1, "type": "error", "request_id": request_id, "seq": seq, "status": ERROR_STATUS[code],
              "code": code, "message": message}
        ev.update({k: v for k, v in extra.items() if v is not None})
        return ev

    # --- worker -------------------------------------------------------------------------------------

    def _worker_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopped.is_set():
                    self._cv.wait(0.5)
                if not self._queue:
                    return
                job = heapq.heappop(self._queue)
                job.state = "running"
                self._running = job
            try:
                self._run(job)
            except ImageRejected as e:
                self._fail(job, e.code, e.message)
            except UnsupportedMediaError as e:
                self._fail(job, "unsupported_media", str(e))
            except GenerationError as e:
                self._fail(job, "generation_error", str(e))
            except Exception as e:
                log.exception("request %s/%s failed", job.client, job.request_id)
                self._fail(job, "internal", f"{type(e).__name__}: {e}"[:500])
            finally:
                self._running = None

    def _fail(self, job: Job, code: str, message: str) -> None:
        self.stats["failed"] += 1
        self._finish(job, self._error_event(job.request_id, job.next_seq(), code, message))

    def _run(self, job: Job) -> None:
        req = job.req
        start = time.monotonic()
        if job.cancel.is_set() or (job.deadline is not None and start >= job.deadline):
            reason = "cancelled" if job.cancel.is_set() else "deadline"
            self.stats["cancelled"] += 1
            return self._finish(job, self._empty_result(job, reason))
        prompt = job.prompt if job.prompt is not None else self._prompt(job)
        max_tokens = min(req.max_tokens or self.s.default_max_tokens, self.s.max_tokens)
        stream = self.model.stream(prompt, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                   top_k=req.top_k, seed=req.seed, stop=tuple(req.stop),
                                   cancel=job.cancel, deadline=job.deadline)
        coalesce_s = self.s.coalesce_ms / 1000
        texts: list[str] = []
        tokens: list[int] = []
        pend_text: list[str] = []
        pend_tok: list[int] = []
        first_t = None
        last_flush = 0.0
        for d in stream:
            now = time.monotonic()
            if first_t is None:
                first_t = now
            texts.append(d.text)
            tokens.extend(d.tokens)
            if not req.stream:
                continue
            pend_text.append(d.text)
            pend_tok.extend(d.tokens)
            if last_flush == 0.0 or now - last_flush >= coalesce_s or len(pend_tok) >= self.s.coalesce_tokens:
                self._delta(job, pend_text, pend_tok)
                pend_text, pend_tok = [], []
                last_flush = now
        if pend_text or pend_tok:
            self._delta(job, pend_text, pend_tok)
        end = time.monotonic()
        res = getattr(stream, "result", None)
        if res is not None:
            text, toks, reason = res.text, list(res.tokens), res.finish_reason
            prompt_tokens, completion, tps = res.prompt_tokens, res.completion_tokens, res.tokens_per_second
        else:  # a model without .result: rebuild what we can
            text, toks = "".join(texts), tokens
            reason = "cancelled" if job.cancel.is_set() else "length" if len(tokens) >= max_tokens else "stop"
            prompt_tokens, completion = 0, len(tokens)
            tps = (len(tokens) - 1) / (end - first_t) if first_t and len(tokens) > 1 and end > first_t else 0.0
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        else:
            self.stats["completed"] += 1
        self.stats["generated_tokens"] += completion
        self._last_tps = tps
        self._avg_req_s = 0.8 * self._avg_req_s + 0.2 * (end - start)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "time_to_first_token_ms": _ms(first_t - job.received) if first_t else None,
                 "tokens_per_s": round(tps, 3), "queue_ms": _ms(start - job.received),
                 "total_ms": _ms(end - job.received)}
        self._finish(job, {"v": 1, "type": "result", "request_id": job.request_id, "seq": job.next_seq(),
                           "text": text, "tokens": toks, "finish_reason": reason, "usage": usage})
        log.info("%s/%s done: %s, %d+%d tokens, ttft %s ms, %.1f tok/s", job.client, job.request_id, reason,
                 prompt_tokens, completion, usage["time_to_first_token_ms"], tps)

    def _delta(self, job: Job, texts: list[str], toks: list[int]) -> None:
        self._send(job.reply.topic, {"v": 1, "type": "delta", "request_id": job.request_id, "seq": job.next_seq(),
                                     "text": "".join(texts), "tokens": list(toks)},
                   correlation=job.reply.correlation)
        # paho's network thread writes the message, and it needs the GIL: a CPU-bound decode loop
        # would otherwise hold it for the whole switch interval (5 ms) before the delta leaves.
        time.sleep(0)

    def _prompt(self, job: Job) -> Any:
        req = job.req
        if req.prompt is not None:
            return req.prompt
        out = []
        for m in req.messages:
            if isinstance(m.content, str):
                out.append({"role": m.role, "content": m.content})
            elif all(p.type == "text" for p in m.content):
                out.append({"role": m.role, "content": "".join(p.text for p in m.content)})
            else:
                parts = [{"type": "text", "text": p.text} if p.type == "text"
                         else {"type": "image", "image": self._resolve_image(p, job)} for p in m.content]
                out.append({"role": m.role, "content": parts})
        return out

    def _resolve_image(self, part: ImagePart, job: Job) -> Any:
        """Worker: an image part -> what the model takes (uint8 RGB [H, W, 3]); ImageRejected."""
        if part.payload:
            return decode_rgb(job.attachment or b"", self.s.max_image_bytes)
        if self.image_resolver is not None:
            return self.image_resolver(part)
        if part.camera is not None:
            return self.hub.latest(part.camera, timeout=self.s.camera_timeout_s).rgb()
        return decode_rgb(base64.b64decode(part.data or ""), self.s.max_image_bytes)

    def _empty_result(self, job: Job, reason: str) -> dict:
        now = time.monotonic()
        return {"v": 1, "type": "result", "request_id": job.request_id, "seq": job.next_seq(), "text": "",
                "tokens": [], "finish_reason": reason,
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "time_to_first_token_ms": None,
                          "tokens_per_s": 0.0, "queue_ms": _ms(now - job.received),
                          "total_ms": _ms(now - job.received)}}

    def _finish(self, job: Job, event: dict) -> None:
        """Send the one terminal event of ``job`` and free its slot (call without the lock)."""
        with self._lock:
            ok = self._close(job, event)
        if ok:
            if job.sink is not None:
                try:
                    job.sink(event)
                except Exception:
                    log.exception("watch result handling failed")
                return
            self._send(job.reply.topic, event, correlation=job.reply.correlation)

    def _close(self, job: Job, event: dict) -> bool:
        """Under the lock: mark ``job`` done and remember its final event; False if it already was."""
        if job.state == "done":
            return False
        job.state = "done"
        if job.sink is not None:
            return True
        self._active.pop(job.key, None)
        if self.s.recent_requests:
            self._recent[job.key] = event
            while len(self._recent) > self.s.recent_requests:
                self._recent.popitem(last=False)
        return True

    # --- publishing -----------------------------------------------------------------------------------

    def _send(self, topic: str, payload: Any, *, qos: int = 1, retain: bool = False,
              correlation: bytes | None = None, expiry_s: int | None = None, content_type: str | None = None,
              user: list[tuple[str, str]] | None = None) -> None:
        """Publish now (paho queues it for its network thread). Never call with the lock held."""
        self._publish(topic, payload, qos, retain, correlation, expiry_s, content_type, user)

    def _publish(self, topic, payload, qos, retain, correlation, expiry_s, content_type=None, user=None) -> None:
        is_json = not isinstance(payload, bytes)
        data = dumps(payload) if is_json else payload
        try:
            info = self.client.publish(topic, data, qos=qos, retain=retain,
                                       properties=publish_props(correlation, expiry_s=expiry_s, json_payload=is_json,
                                                                content_type=content_type, user=user))
        except Exception:
            log.exception("publish to %s failed", topic)
            self.stats["dropped_messages"] += 1
            return
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE or (info.rc == mqtt.MQTT_ERR_NO_CONN and qos == 0):
            self.stats["dropped_messages"] += 1

    # --- housekeeping -------------------------------------------------------------------------------

    def _housekeeper_loop(self) -> None:
        next_metrics = time.monotonic() + min(1.0, self.s.metrics_interval_s)
        snap_every = self.s.snapshot_interval_s
        next_snap = time.monotonic() + (snap_every or 0)
        wd = self.notifier.watchdog_s
        next_wd = time.monotonic()
        while not self._stopped.wait(0.05):
            now = time.monotonic()
            expired = []
            with self._lock:
                for job in list(self._queue):
                    if job.deadline is not None and now >= job.deadline:
                        self._queue.remove(job)
                        expired.append(job)
                if expired:
                    heapq.heapify(self._queue)
                ended = []
                for job in expired:
                    self.stats["cancelled"] += 1
                    ev = self._empty_result(job, "deadline")
                    if self._close(job, ev):
                        ended.append((job, ev))
            for job, ev in ended:
                self._send(job.reply.topic, ev, correlation=job.reply.correlation)
            if now >= next_metrics:
                next_metrics = now + self.s.metrics_interval_s
                if self.connected.is_set():
                    self._send(self.topics.health, self.health(), qos=0, retain=True,
                               expiry_s=max(1, math.ceil(3 * self.s.metrics_interval_s)))
            if snap_every and now >= next_snap and self.connected.is_set():
                next_snap = now + snap_every
                for cam in self.hub.names:
                    try:
                        self._media.submit(self._snapshot, None, None, cam)
                    except RuntimeError:
                        break
            if wd and now >= next_wd:
                next_wd = now + wd / 2
                if all(t.is_alive() for t in self._threads):
                    self.notifier.notify("WATCHDOG=1")

    def health(self) -> dict:
        with self._lock:
            depth = len(self._queue)
            running = self._running is not None
        state = "stopping" if self._stopping else "busy" if running or depth else "idle"
        return {"v": 1, "ts": round(time.time(), 3), "state": state, "queue_depth": depth,
                "in_flight": depth + int(running), **{k: v for k, v in self.stats.items() if k != "connects"},
                "tokens_per_s": round(self._last_tps, 3), "memory_rss_bytes": _rss_bytes(),
                "uptime_s": round(time.monotonic() - self._t0, 3), "watch_jobs": len(self.watch),
                "watch_runs": self.watch.stats["runs"], "watch_skipped": self.watch.stats["skipped"],
                **({"cameras": self.hub.status()} if self.hub.names else {})}

    def capabilities(self) -> dict:
        s, t = self.s, self.topics
        return {"v": 1, "schema_version": SCHEMA_VERSION, "device_id": s.device_id,
                "daemon_version": edge_sdk.__version__, "model": self.info, "ops": list(OPS),
                "cameras": self.hub.names,
                "limits": {"max_tokens": s.max_tokens, "default_max_tokens": min(s.default_max_tokens, s.max_tokens),
                           "queue_length": s.queue_length, "max_pending_per_client": s.max_pending_per_client,
                           "max_payload_bytes": s.max_payload_bytes, "max_messages": s.max_messages,
                           "max_image_bytes": s.max_image_bytes, "watch_min_every_s": s.watch_min_every_s,
                           "max_watch_jobs": s.max_watch_jobs},
                "topics": {"request": t.request("{client}", "{op}"), "inbox": t.inbox("{client}"),
                           "status": t.status, "capabilities": t.capabilities, "health": t.health,
                           "watch_events": t.watch_events("{camera}", "{client}", "{job_id}"),
                           "snapshot": t.snapshot("{camera}")},
                "started_at": round(self.started_at, 3)}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _rid_from_correlation(corr: bytes | None) -> str | None:
    if not corr:
        return None
    try:
        s = corr.decode("utf-8")
        if _ID_RE.match(s):
            return s
    except UnicodeDecodeError:
        pass
    return corr.hex()[:128]


def _has_images(req: ChatRequest) -> bool:
    return any(not isinstance(m.content, str) and any(p.type == "image" for p in m.content)
               for m in (req.messages or []))


def _summarize(e: ValidationError) -> str:
    errs = e.errors()
    first = errs[0]
    loc = ".".join(str(x) for x in first["loc"]) or "(payload)"
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"invalid request: {loc}: {first['msg']}{more}"


def _details(e: ValidationError) -> list[dict]:
    return [{"loc": ".".join(str(x) for x in err["loc"]), "msg": err["msg"], "type": err["type"]}
            for err in e.errors()[:10]]
