"""Test helpers for the MQTT daemon and SDK: a real mosquitto on a free loopback port, the
``serve_model`` fixture, a daemon factory, a raw paho helper.

Import the fixtures into a test module with ``from mqtt_broker import *  # noqa: F401,F403``.

``serve_model`` is THE one place that decides which model the serve/client tests run: today a
small deterministic fake (``FakeModel``); switch it to the real tiny engine by changing
``make_serve_model`` below (e.g. ``edge_sdk.load(<tiny engine package>)``).
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
import zlib
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import pytest

from edge_sdk.mqtt_common import make_client, new_client_id, publish_props
from edge_sdk.runtime.types import ContextOverflowError, GenerationResult, TextDelta
from edge_sdk.serve.broker import Mosquitto, mosquitto_binary

__all__ = ["FakeModel", "make_serve_model", "mosquitto", "serve_model", "start_daemon", "RawClient",
           "requires_mosquitto"]

requires_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")

WORDS = ["the", "robot", "moves", "left", "right", "stop", "go", "arm", "camera", "sees", "a", "red",
         "box", "on", "table", "é", "日本", "ok", "wheel", "speed"]


class FakeModel:
    """Deterministic stand-in for ``edge_sdk.load(...)``: token ids from a seeded RNG over the
    prompt, one ``TextDelta`` per token, honouring max_tokens, stop, cancel and deadline.
    ``token_delay_s`` makes it slow enough to cancel/queue/restart mid-stream."""

    name = "fake-tiny"
    context_length = 512

    def __init__(self, token_delay_s: float = 0.0):
        self.token_delay_s = token_delay_s
        self.calls = 0
        self._lock = threading.Lock()

    def capabilities(self) -> dict:
        return {"model": self.name, "context_length": self.context_length, "modalities": ["text"]}

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(prompt.encode("utf-8"))
        if prompt and isinstance(prompt[0], int):
            return list(prompt)
        return list(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode("utf-8"))

    def stream(self, prompt, max_tokens=256, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=None,
               cancel=None, deadline=None):
        ids = self._prompt_ids(prompt)
        if len(ids) > self.context_length:
            raise ContextOverflowError(f"prompt of {len(ids)} tokens exceeds the context of {self.context_length}")
        with self._lock:
            self.calls += 1
        return _FakeStream(self, ids, max_tokens, temperature, seed, list(stop or []), cancel, deadline)

    def generate(self, prompt, **kw) -> GenerationResult:
        s = self.stream(prompt, **kw)
        for _ in s:
            pass
        return s.result


class _FakeStream:
    def __init__(self, model, ids, max_tokens, temperature, seed, stop, cancel, deadline):
        self.m, self.ids, self.max_tokens, self.stop = model, ids, max_tokens, stop
        self.cancel, self.deadline = cancel, deadline
        key = zlib.crc32(bytes(str((ids, seed, round(temperature, 6))), "utf-8"))
        self.rng = random.Random(key)
        # greedy (temperature 0) runs to max_tokens; sampling ends after a prompt-dependent length
        self.natural_len = 5 + key % 40 if temperature > 0 else 1 << 30
        self.result: GenerationResult | None = None

    def __iter__(self):
        t0 = time.monotonic()
        first = None
        toks: list[int] = []
        text = ""
        reason = "length"
        while True:
            if self.cancel is not None and self.cancel.is_set():
                reason = "cancelled"
                break
            if self.deadline is not None and time.monotonic() >= self.deadline:
                reason = "deadline"
                break
            if len(toks) >= self.max_tokens:
                reason = "length"
                break
            if len(toks) >= self.natural_len:
                reason = "stop"
                break
            if self.m.token_delay_s:
                time.sleep(self.m.token_delay_s)
            tok = self.rng.randrange(len(WORDS))
            piece = WORDS[tok] + " "
            toks.append(tok)
            text += piece
            if first is None:
                first = time.monotonic() - t0
            hit = next((s for s in self.stop if s in text), None)
            if hit:
                text = text[: text.index(hit)]
                reason = "stop"
                break
            yield TextDelta(piece, [tok])
        self.result = GenerationResult(text=text, tokens=toks, finish_reason=reason, prompt_tokens=len(self.ids),
                                       completion_tokens=len(toks), time_to_first_token_s=first,
                                       total_time_s=time.monotonic() - t0)


def make_serve_model(token_delay_s: float = 0.0):
    """The one switch: return the model the serve tests use."""
    return FakeModel(token_delay_s=token_delay_s)


@pytest.fixture
def serve_model():
    """Factory: ``serve_model()`` fast, ``serve_model(token_delay_s=0.02)`` slow."""
    return make_serve_model


@pytest.fixture
def mosquitto():
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    b = Mosquitto()
    b.start()
    yield b
    b.cleanup()


_dev_counter = itertools.count()


@pytest.fixture
def start_daemon(mosquitto):
    """``start_daemon(model, **settings)`` -> a started, connected Daemon on the test broker."""
    from edge_sdk.serve.config import ServeSettings
    from edge_sdk.serve.daemon import Daemon

    started = []

    def _start(model, broker=None, wait=True, **overrides):
        broker = broker or mosquitto
        kw = dict(host=broker.host, port=broker.port, device_id=f"dev-{next(_dev_counter)}",
                  metrics_interval_s=0.5, stop_grace_s=0.5, reconnect_min_delay_s=0.1, reconnect_max_delay_s=0.5)
        kw.update(overrides)
        d = Daemon(model, ServeSettings(**kw))
        started.append(d)
        d.start()
        if wait:
            assert d.wait_connected(5.0), "daemon did not connect"
        return d

    yield _start
    for d in started:
        d.stop(grace_s=0.2)


@dataclass
class RawReply:
    events: list
    props: list


class RawClient:
    """A plain paho client that speaks the protocol by hand (MQTT 5 or 3.1.1)."""

    def __init__(self, broker, *, protocol=mqtt.MQTTv5, client_id=None, username=None, password=None):
        self.client_id = client_id or new_client_id("raw")
        if protocol == mqtt.MQTTv5:
            self.c = make_client(self.client_id, username=username, password=password)
        else:
            self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol)
            if username:
                self.c.username_pw_set(username, password)
        self.protocol = protocol
        self.msgs: list[mqtt.MQTTMessage] = []
        self.cond = threading.Condition()
        self.subacks: dict[int, list] = {}
        self.connect_rc = None
        self._connected = threading.Event()
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_connect = self._on_connect
        self.c.connect(broker.host, broker.port, keepalive=10)
        self.c.loop_start()
        assert self._connected.wait(5), "raw client did not connect"

    def _on_connect(self, client, userdata, flags, rc, props):
        self.connect_rc = rc
        self._connected.set()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.msgs.append(msg)
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, rcs, props):
        with self.cond:
            self.subacks[mid] = rcs
            self.cond.notify_all()

    def subscribe(self, topic: str, timeout: float = 5.0) -> list:
        _, mid = self.c.subscribe(topic, qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.subacks, timeout), "no SUBACK"
            return self.subacks[mid]

    def publish(self, topic, payload, *, correlation=None, response_topic=None, qos=1):
        props = None
        if self.protocol == mqtt.MQTTv5:
            props = publish_props(correlation=correlation, response_topic=response_topic, json_payload=False)
        info = self.c.publish(topic, payload, qos=qos, properties=props)
        info.wait_for_publish(timeout=5)
        return info

    def wait_for(self, pred, timeout: float = 5.0) -> list:
        with self.cond:
            ok = self.cond.wait_for(lambda: pred(self.msgs), timeout)
            assert ok, f"timed out; got {[(m.topic, m.payload[:200]) for m in self.msgs]}"
            return list(self.msgs)

    def events(self, topic: str | None = None, correlation: bytes | None = None) -> list[dict]:
        with self.cond:
            out = []
            for m in self.msgs:
                if topic is not None and m.topic != topic:
                    continue
                if correlation is not None and getattr(m.properties, "CorrelationData", None) != correlation:
                    continue
                try:
                    out.append(json.loads(m.payload))
                except ValueError:
                    pass
            return out

    def wait_terminal(self, request_id=None, correlation=None, timeout: float = 5.0) -> list[dict]:
        def done(_):
            evs = self.events(correlation=correlation)
            return any(e.get("type") in ("result", "error") and (request_id is None or e.get("request_id") == request_id)
                       for e in evs)
        self.wait_for(done, timeout)
        evs = self.events(correlation=correlation)
        return [e for e in evs if request_id is None or e.get("request_id") == request_id]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()
