"""The MQTT daemon: one model, many clients, over a local broker (mosquitto).

A request walks these stages, each its own module:

1. transport.read_message  (paho's network thread) MQTT message -> Envelope, or a Refusal
2. admission.Admission.check                        Envelope -> the op's validated request, or a Refusal
3. scheduler.Scheduler.submit / enqueue             priorities, limits, de-duplication, cancel, expiry
4. worker.Worker.loop      (the worker thread)      runs the model, coalesces deltas
5. events.Publisher                                 every reply built from edge_sdk.protocol's models

``Daemon`` wires them together with the models it serves (models.py: one or several, and the
routing between them), the watch jobs (watch.py), live audio streams (audio_streams.py), listen
jobs on its microphones (listen.py), snapshots (snapshots.py), cameras (cameras.py) and the
housekeeper (housekeeper.py: expiry, health, systemd watchdog), and owns the broker
connection's lifecycle. It needs only the standard library, paho and pydantic; it never
imports torch.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

import edge_sdk
from edge_sdk.mqtt_common import make_client
from edge_sdk.media.vad import SileroVad
from edge_sdk.protocol.models import (OPS, Accepted, AudioStreamRequest, CancelRequest, Capabilities, ChatRequest, Health,
                                      ListenCancelRequest, ListenRegistered, ListenRequest, SnapshotRequest,
                                      WatchCancelRequest, WatchRegistered, WatchRequest)
from edge_sdk.protocol.topics import SCHEMA_VERSION, Topics
from edge_sdk.serve.admission import Admission
from edge_sdk.serve.audio_streams import AudioStreams
from edge_sdk.serve.cameras import CameraHub
from edge_sdk.serve.config import ServeSettings
from edge_sdk.serve.events import Publisher, to_wire
from edge_sdk.serve.housekeeper import Housekeeper, rss_bytes
from edge_sdk.serve.listen import ListenManager
from edge_sdk.serve.models import ModelSet
from edge_sdk.serve.scheduler import Job, Scheduler
from edge_sdk.serve.sdnotify import Notifier
from edge_sdk.serve.snapshots import Snapshots
from edge_sdk.serve.transport import Envelope, Refusal, read_message, shutting_down
from edge_sdk.serve.watch import WatchManager
from edge_sdk.serve.worker import Worker

log = logging.getLogger("edge_sdk.serve")

#: A connection that the broker closes sooner than this after it opened is a flap: the messages
#: paho would re-send on the next connect are dropped, so that no single PUBLISH the broker
#: refuses can keep the daemon in a reconnect loop (PROTOCOL.md, rule 9).
FLAP_S = 5.0


class Daemon:
    """Serve ``models`` (one model, or several as ModelSet takes them) on the broker named in
    ``settings``. ``start()``/``stop()`` for embedding (tests, bench); ``serve_forever()`` for the
    CLI (signals, systemd notify)."""

    def __init__(self, models: Any, settings: ServeSettings | None = None):
        self.models = models if isinstance(models, ModelSet) else ModelSet(models)
        self.s = s = settings or ServeSettings()
        self.topics = Topics(s.topic_prefix, s.device_id)
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self._stopped = threading.Event()
        self.connected = threading.Event()
        self.stats = dict(completed=0, failed=0, cancelled=0, rejected_busy=0, dropped_messages=0,
                          generated_tokens=0, connects=0)
        self.notifier = Notifier()
        self._threads: list[threading.Thread] = []
        self._connected_at: float | None = None
        self._last_connection_s: float | None = None

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

        self.publisher = Publisher(self.client, self.stats)
        self.hub = CameraHub(s.cameras, loop=s.camera_loop, reconnect_max_s=s.camera_reconnect_max_s,
                             stale_s=s.camera_timeout_s)
        self.scheduler = Scheduler(s.queue_length, s.max_pending_per_client, s.recent_requests, self.stats)
        self.worker = Worker(self.models, self.scheduler, s, self.hub, self.stats, self._stopped)
        self.watch = WatchManager(s, self.topics, self.hub, self.scheduler.enqueue, self.publisher.send)
        self.streams = AudioStreams(s, self.publisher.event, self._submit_job, lambda: SileroVad(s.vad_model))
        self.listen = ListenManager(s, self.topics, self.scheduler.enqueue, self.publisher.send,
                                    lambda: SileroVad(s.vad_model))
        self.admission = Admission(s, self.models, self.hub, self.listen)
        self.snapshots = Snapshots(self.hub, s, self.topics, self.publisher)
        self.housekeeper = Housekeeper(
            self._stopped, self.notifier, expire=self.scheduler.expire, publish_health=self._publish_health,
            health_every_s=s.metrics_interval_s, refresh_snapshots=self._refresh_snapshots,
            snapshot_every_s=s.snapshot_interval_s, threads_alive=self._threads_alive)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "Daemon":
        s = self.s
        log.info("serving %s as device %r on %s:%s (prefix %r)",
                 ", ".join(f"{m.name} ({', '.join(m.info['modalities'])})" for m in self.models.served), s.device_id,
                 s.host, s.port, s.topic_prefix)
        self.hub.start()
        for name, target in (("edge-sdk-worker", self.worker.loop), ("edge-sdk-housekeeper", self.housekeeper.loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.watch.start()
        self.listen.start()
        self._threads += [t for t in (self.watch.thread, self.listen.thread) if t is not None]
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
        self.listen.stop()
        self.streams.stop()
        self.publisher.send(self.topics.status, b"stopping", retain=True)
        self.scheduler.stop()
        if not self.scheduler.wait_idle(grace_s):
            running = self.scheduler.running
            if running is not None:
                running.cancel.set()
            self.scheduler.wait_idle(2.0)
        self._stopped.set()
        self.scheduler.wake()
        for t in self._threads:
            t.join(timeout=3.0)
        self.snapshots.close()
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
                if not self._threads_alive():
                    log.error("an internal thread died; exiting so that systemd restarts the daemon")
                    healthy = False
                    break
        finally:
            self.stop()
        return healthy

    def _threads_alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    # --- the broker connection (network thread) ---------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        self.stats["connects"] += 1
        if self._last_connection_s is not None and self._last_connection_s < FLAP_S:
            dropped = client.drop_out_messages()
            if dropped:
                self.stats["dropped_messages"] += len(dropped)
                log.error("the broker closed the last connection after %.1f s: dropped %d unacknowledged "
                          "messages instead of re-sending them (first: %r)", self._last_connection_s, len(dropped),
                          dropped[0].topic)
        self._connected_at = time.monotonic()
        # Retain As Published: a request sent with the retain flag arrives with it, and is refused.
        client.subscribe(self.topics.request_filter, options=SubscribeOptions(qos=1, retainAsPublished=True))
        # Subscription first: the broker handles packets in order, so once 'online' is visible the
        # request topic is live (clients may wait for 'online' before sending).
        self.publisher.send(self.topics.capabilities, self.capabilities(), retain=True)
        self.publisher.send(self.topics.status, b"online", retain=True)
        self.connected.set()
        log.info("connected to broker (%s), subscribed to %s", "again" if self.stats["connects"] > 1 else "first time",
                 self.topics.request_filter)
        if self.stats["connects"] == 1:
            self.notifier.notify("READY=1\nSTATUS=serving")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if self._connected_at is not None:
            self._last_connection_s = time.monotonic() - self._connected_at
        if not self._stopped.is_set():
            log.warning("disconnected from broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg):
        try:
            self._handle(msg)
        except Exception:  # never let an exception kill paho's loop
            log.exception("unexpected error handling a message on %s", msg.topic)

    # --- one request: transport -> admission -> its op ----------------------------------------------

    def _handle(self, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            if not msg.payload:  # the broker forwarding the deletion below
                return
            # A retained request would run again on every restart: delete it, then refuse it.
            self.publisher.send(msg.topic, b"", retain=True)
        env = read_message(msg, self.topics, self.s.max_payload_bytes)
        if env is None:
            self.stats["dropped_messages"] += 1
            return
        if isinstance(env, Refusal):
            return self.publisher.refuse(env.reply, env)
        try:
            req = self.admission.check(env)
            getattr(self, f"_op_{env.op}")(env, req)
        except Refusal as refusal:
            self.publisher.refuse(env.reply, refusal)

    def _op_chat(self, env: Envelope, req: ChatRequest) -> None:
        reply = env.reply
        self._submit_job(self.admission.job(env, req, lambda ev: self.publisher.event(reply, ev)))

    _op_transcribe = _op_chat  # the same path: one job, the same events

    def _op_audio_stream(self, env: Envelope, req: AudioStreamRequest) -> None:
        self.streams.handle(env, req)

    def _submit_job(self, job: Job) -> None:
        """A client's job into the queue: 'accepted', or its earlier outcome for a duplicate."""
        reply, req = job.reply, job.req
        admitted = self.scheduler.submit(job)
        if admitted.duplicate:
            log.info("request %s/%s is already in progress; duplicate ignored", job.client, job.request_id)
            return
        if admitted.finished is not None:
            log.info("request %s/%s already finished; resending its final event", job.client, job.request_id)
            return self.publisher.event(reply, admitted.finished)
        # 'accepted' is queued in paho before the worker can see the job: seq order holds.
        self.publisher.event(reply, Accepted(request_id=job.request_id, queue_position=admitted.position))
        if not self.scheduler.enqueue(job):  # stopping meanwhile: the scheduler ended it
            return
        log.debug("accepted %s/%s (priority %d, position %d)", job.client, job.request_id, req.priority,
                  admitted.position)

    def _op_cancel(self, env: Envelope, req: CancelRequest) -> None:
        if req.all:
            self.watch.cancel_client(env.client, req.reply_to)
            self.listen.cancel_client(env.client, req.reply_to)
            self.streams.close_client(env.client)
        elif self.watch.cancel(env.client, req.request_id) or self.listen.cancel(env.client, req.request_id):
            return
        jobs = self.scheduler.cancel(env.client, None if req.all else req.request_id, req.reply_to)
        if not jobs:
            log.debug("cancel from %s for %s: nothing in progress", env.client, req.request_id or "all")
        for job in jobs:
            log.info("cancel %s/%s (%s)", job.client, job.request_id, job.state)

    def _register(self, registry: WatchManager | ListenManager, env: Envelope, req: Any) -> Any:
        """A watch or listen job's registration; its spec (a new job's, or the existing one's)."""
        if self.scheduler.stopping:
            raise shutting_down()
        try:
            spec, _ = registry.register(env.client, env.reply.request_id, req, env.reply.topic)
        except Refusal as refusal:
            if refusal.code == "busy":
                self.stats["rejected_busy"] += 1
            raise
        return spec

    def _op_watch(self, env: Envelope, req: WatchRequest) -> None:
        spec, job_id = self._register(self.watch, env, req), env.reply.request_id
        self.publisher.event(env.reply, WatchRegistered(
            request_id=job_id, job_id=job_id, camera=spec.camera,
            events_topic=self.topics.watch_events(spec.camera, env.client, job_id), every_s=spec.every_s,
            on_change=spec.on_change, persistent=spec.persistent,
            expires_at=round(spec.expires_at, 3) if spec.expires_at else None))

    def _op_watch_cancel(self, env: Envelope, req: WatchCancelRequest) -> None:
        if not self.watch.cancel(env.client, req.job_id):
            log.debug("watch_cancel from %s for %s: no such job", env.client, req.job_id)

    def _op_listen(self, env: Envelope, req: ListenRequest) -> None:
        spec, job_id = self._register(self.listen, env, req), env.reply.request_id
        self.publisher.event(env.reply, ListenRegistered(
            request_id=job_id, job_id=job_id, microphone=spec.microphone, model=spec.model,
            events_topic=self.topics.listen_events(spec.microphone, env.client, job_id),
            expires_at=round(spec.expires_at, 3) if spec.expires_at else None))

    def _op_listen_cancel(self, env: Envelope, req: ListenCancelRequest) -> None:
        if not self.listen.cancel(env.client, req.job_id):
            log.debug("listen_cancel from %s for %s: no such job", env.client, req.job_id)

    def _op_snapshot(self, env: Envelope, req: SnapshotRequest) -> None:
        self.snapshots.request(req, env.reply)

    # --- retained device topics -----------------------------------------------------------------------

    def _publish_health(self) -> None:
        if self.connected.is_set():
            self.publisher.send(self.topics.health, self.health(), qos=0, retain=True,
                                expiry_s=max(1, math.ceil(3 * self.s.metrics_interval_s)))

    def _refresh_snapshots(self) -> None:
        if self.connected.is_set():
            self.snapshots.refresh()

    def health(self) -> dict:
        depth = self.scheduler.depth()
        running = self.scheduler.running is not None
        state = "stopping" if self.scheduler.stopping else "busy" if running or depth else "idle"
        counters = {k: v for k, v in self.stats.items() if k != "connects"}
        return to_wire(Health(
            ts=round(time.time(), 3), state=state, queue_depth=depth, in_flight=depth + int(running), **counters,
            tokens_per_s=round(self.worker.last_tokens_per_s, 3), memory_rss_bytes=rss_bytes(),
            uptime_s=round(time.monotonic() - self._t0, 3), watch_jobs=len(self.watch),
            watch_runs=self.watch.stats["runs"], watch_skipped=self.watch.stats["skipped"],
            **({"cameras": self.hub.status()} if self.hub.names else {}),
            **({"listen_jobs": len(self.listen), "microphones": self.listen.status()} if self.listen.names else {})))

    def capabilities(self) -> Capabilities:
        s, t = self.s, self.topics
        return Capabilities(
            schema_version=SCHEMA_VERSION, device_id=s.device_id, daemon_version=edge_sdk.__version__,
            model=self.models.default.info, models=self.models.infos(), ops=list(OPS), cameras=self.hub.names,
            microphones=self.listen.names,
            limits={"max_tokens": s.max_tokens, "default_max_tokens": min(s.default_max_tokens, s.max_tokens),
                    "queue_length": s.queue_length, "max_pending_per_client": s.max_pending_per_client,
                    "max_payload_bytes": s.max_payload_bytes, "max_messages": s.max_messages,
                    "max_image_bytes": s.max_image_bytes, "max_audio_bytes": s.max_audio_bytes,
                    "max_audio_s": s.max_audio_s, "max_audio_streams": s.max_audio_streams,
                    "audio_stream_idle_s": s.audio_stream_idle_s, "watch_min_every_s": s.watch_min_every_s,
                    "max_watch_jobs": s.max_watch_jobs, "max_listen_jobs": s.max_listen_jobs},
            topics={"request": t.request("{client}", "{op}"), "inbox": t.inbox("{client}"),
                    "status": t.status, "capabilities": t.capabilities, "health": t.health,
                    "watch_events": t.watch_events("{camera}", "{client}", "{job_id}"),
                    "listen_events": t.listen_events("{microphone}", "{client}", "{job_id}"),
                    "snapshot": t.snapshot("{camera}")},
            started_at=round(self.started_at, 3))
