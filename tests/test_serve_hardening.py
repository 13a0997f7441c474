"""The daemon and the SDK against requests and events made to break them (PROTOCOL.md's rules
8-13), on a real mosquitto: topics the broker would refuse, publishes that would loop, deep JSON,
ill-formed UTF-8, retained requests, a slow reader, junk events, a stock broker's Nagle delay."""

from __future__ import annotations

import json
import logging
import time

import pytest

from edge_sdk.client import (BadRequestError, Client, DeviceOfflineError, EdgeError, ProtocolError, ServerError,
                             error_from_event)
from edge_sdk.mqtt_common import make_client, new_client_id, publish_props
from edge_sdk.protocol.topics import Topics, topic_name_error
from edge_sdk.serve.broker import Mosquitto, mosquitto_binary

from mqtt_broker import *  # noqa: F401,F403
from mqtt_broker import RawClient, make_serve_model

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")


def test_topic_name_rules():
    ok = ["edge/v1/clients/a/res/x", "a", "edge/v1/clients/a/é/中"]
    bad = ["", "a/+/b", "a/#", "a\u0000b", "a\u0001b", "a\u001fb", "a\u007fb", "a\u009fb", "a\ufffeb", "a\uffffb",
           "a\ufdd0b", "a\U0001fffeb", "a\ud800b", "x" * 513]
    assert [topic_name_error(t) for t in ok] == [None] * len(ok)
    assert all(topic_name_error(t) for t in bad)


def _chat(raw, t, client, body, **kw):
    raw.publish(t.request(client, "chat"), json.dumps(body).encode() if isinstance(body, dict) else body, **kw)


def test_reply_topics_the_broker_would_refuse_are_refused(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model())
    t = d.topics
    raw = RawClient(mosquitto, client_id="eve")
    raw.subscribe(t.inbox("eve") + "/#")
    raw.subscribe(t.inbox("eve"))
    for i, tail in enumerate(["\u0001x", "\ufffe", "\u0085", "x\u007f", "a" * 600]):
        rid = f"bad{i}"
        _chat(raw, t, "eve", {"request_id": rid, "prompt": "hi", "max_tokens": 2, "reply_to": t.inbox("eve") + "/" + tail})
        err = raw.wait_terminal(request_id=rid)[-1]
        assert (err["code"], err["status"]) == ("invalid_reply_topic", 400), err
    # (as an MQTT 5 Response Topic such names never reach the daemon: mosquitto drops the sender)
    _chat(raw, t, "eve", {"request_id": "good", "prompt": "hi", "max_tokens": 2})
    assert raw.wait_terminal(request_id="good")[-1]["type"] == "result"
    assert d.stats["connects"] == 1
    raw.close()


def test_a_publish_the_broker_refuses_cannot_keep_the_daemon_off_it(serve_model, start_daemon, mosquitto,
                                                                    monkeypatch):
    """Whatever makes mosquitto drop the daemon for a malformed packet (here: the topic checks
    switched off), the daemon is back within a reconnect or two and serves again."""
    import edge_sdk.serve.events as events
    import edge_sdk.serve.transport as transport

    d = start_daemon(serve_model())
    t = d.topics
    monkeypatch.setattr(events, "topic_name_error", lambda topic: None)
    monkeypatch.setattr(transport, "topic_name_error", lambda topic: None)
    raw = RawClient(mosquitto, client_id="eve")
    raw.subscribe(t.inbox("eve"))
    _chat(raw, t, "eve", {"request_id": "poison", "prompt": "hi", "max_tokens": 2,
                          "reply_to": t.inbox("eve") + "/\u0001"})
    time.sleep(2.0)
    assert d.stats["connects"] <= 3, d.stats
    assert d.wait_connected(3)
    _chat(raw, t, "eve", {"request_id": "after", "prompt": "hi", "max_tokens": 2})
    assert raw.wait_terminal(request_id="after")[-1]["type"] == "result"
    raw.close()


@pytest.mark.parametrize("payload, why", [
    (b"[" * 1000 + b"]" * 1000, "deep array"),
    (b'{"a":' * 3000 + b"1" + b"}" * 3000, "deep object"),
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "deep value in a request"),
    (b'{"prompt": "\xed\xa0\x80"}', "encoded surrogate"),
    (b'{"prompt": "\xc0\xaf"}', "overlong encoding"),
    (b'{"prompt": "\xf8\x88\x80\x80\x80"}', "five-byte sequence"),
    (b'{"prompt": "\\ud800"}', "lone surrogate escape"),
    (b'{"prompt": "ok", "stop": ["\\udfff"]}', "lone low surrogate escape"),
])
def test_deep_json_and_bad_utf8_get_invalid_json(serve_model, start_daemon, mosquitto, payload, why):
    d = start_daemon(serve_model(), max_payload_bytes=65536)
    t = d.topics
    raw = RawClient(mosquitto, client_id="fz")
    raw.subscribe(t.inbox("fz"))
    raw.publish(t.request("fz", "chat"), payload, correlation=b"c1")
    err = raw.wait_terminal(correlation=b"c1")[-1]
    assert (err["type"], err["code"], err["status"]) == ("error", "invalid_json", 400), (why, err)
    assert d.stats["completed"] == 0
    raw.close()


def test_retained_requests_are_refused_deleted_and_never_run(serve_model, start_daemon, mosquitto):
    t = Topics("edge", "ret")
    raw = RawClient(mosquitto, client_id="r")
    raw.subscribe(t.inbox("r"))
    body = json.dumps({"request_id": "kept", "prompt": "hi", "max_tokens": 2}).encode()
    # left on the broker before the daemon starts: delivered to it as retained on subscribe
    raw.c.publish(t.request("r", "chat"), body, qos=1, retain=True).wait_for_publish(3)
    d = start_daemon(serve_model(), device_id="ret")
    err = raw.wait_terminal(request_id="kept")[-1]
    assert (err["type"], err["code"]) == ("error", "invalid_request") and "retain" in err["message"]
    # ...and sent live with the retain flag (Retain As Published shows the flag to the daemon)
    raw.c.publish(t.request("r", "chat"), body.replace(b"kept", b"live"), qos=1, retain=True).wait_for_publish(3)
    assert raw.wait_terminal(request_id="live")[-1]["code"] == "invalid_request"
    time.sleep(0.3)
    assert d.stats["completed"] == 0
    d.stop(grace_s=0.1)
    # the retained copies were deleted: a restarted daemon sees nothing
    d2 = start_daemon(serve_model(), device_id="ret")
    time.sleep(0.5)
    assert d2.stats["completed"] == 0
    spy = RawClient(mosquitto)
    spy.subscribe(t.request_filter)
    time.sleep(0.3)
    assert spy.msgs == []  # no retained request left on the broker
    spy.close()
    raw.close()


def test_a_slow_reader_gets_its_final_result(serve_model, start_daemon):
    """One delta per token, a broker queue of 10 and a client that reads nothing for a while:
    deltas (QoS 0) may be lost, the result (QoS 1, the whole answer) is not."""
    broker = Mosquitto(max_queued_messages=10).start()
    try:
        d = start_daemon(serve_model(token_delay_s=0.001), broker=broker, coalesce_ms=0, coalesce_tokens=1)
        t = d.topics
        raw = RawClient(broker, client_id="slow")
        raw.subscribe(t.inbox("slow"))
        _chat(raw, t, "slow", {"request_id": "long", "prompt": "hi", "max_tokens": 300})
        raw.c.loop_stop()  # stop reading and acknowledging
        end = time.monotonic() + 10
        while d.stats["completed"] < 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert d.stats["completed"] == 1
        raw.c.loop_start()
        evs = raw.wait_terminal(request_id="long", timeout=10)
        assert evs[-1]["type"] == "result" and len(evs[-1]["tokens"]) == 300
        raw.close()
    finally:
        broker.cleanup()


# --- the SDK against a device that sends junk ------------------------------------------------------


class _FakeDevice:
    """A 'daemon' that answers every chat request with the events a test gives it."""

    def __init__(self, broker, device_id: str, events):
        self.t = Topics("edge", device_id)
        self.events = events
        self.c = make_client(new_client_id("fake-dev"))
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        self.c.subscribe(self.t.request_filter, qos=1)
        self.c.publish(self.t.status, b"online", qos=1, retain=True).wait_for_publish(3)

    def _on_message(self, client, userdata, msg):
        corr = msg.properties.CorrelationData
        for ev in self.events(json.loads(msg.payload)):
            body = ev if isinstance(ev, bytes) else json.dumps(ev).encode()
            client.publish(msg.properties.ResponseTopic, body, qos=1, properties=publish_props(corr))

    def status(self, payload: bytes) -> None:
        self.c.publish(self.t.status, payload, qos=1, retain=True).wait_for_publish(3)

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def test_error_events_with_junk_fields_map_to_sdk_errors():
    for status in ("oops", None, [], {"a": 1}, True, 1e400, "429"):
        err = error_from_event({"type": "error", "status": status, "code": 7, "message": None})
        assert isinstance(err, EdgeError)
    assert isinstance(error_from_event({"status": "oops"}), ServerError)
    assert isinstance(error_from_event({"status": "400"}), BadRequestError)


@pytest.mark.parametrize("junk, expect", [
    (lambda r: [{"type": "error", "request_id": r, "seq": 1, "status": "bad", "code": 5}], ServerError),
    (lambda r: [{"type": "result", "request_id": r, "seq": 1, "text": 3}], ProtocolError),
    (lambda r: [{"type": "result", "request_id": r, "seq": "one", "text": "x", "tokens": [],
                 "finish_reason": "stop", "usage": {}}], ProtocolError),
    (lambda r: [b"not json", [1, 2], {"type": "delta", "request_id": r, "seq": 1, "text": 5},
                {"type": "result", "request_id": r, "seq": 2, "text": "ok", "tokens": [1], "finish_reason": "stop",
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "time_to_first_token_ms": 1.0,
                           "tokens_per_s": 0.0, "queue_ms": 0.0, "total_ms": 1.0}}], "ok"),
])
def test_sdk_ends_in_its_own_errors_on_junk_events(mosquitto, junk, expect):
    dev = _FakeDevice(mosquitto, "junk", lambda req: junk(req["request_id"]))
    try:
        with Client(mosquitto.host, mosquitto.port, "junk", timeout=3) as c:
            if expect == "ok":
                assert c.chat("hi", stream=True).wait().text == "ok"
            else:
                with pytest.raises(expect):
                    c.chat("hi")
    finally:
        dev.close()


def test_sdk_ignores_unknown_status_values(mosquitto, caplog):
    ok = {"type": "result", "seq": 1, "text": "ok", "tokens": [], "finish_reason": "stop",
          "usage": {"prompt_tokens": 0, "completion_tokens": 0, "time_to_first_token_ms": None, "tokens_per_s": 0.0,
                    "queue_ms": 0.0, "total_ms": 0.0}}
    dev = _FakeDevice(mosquitto, "flaky", lambda req: [{**ok, "request_id": req["request_id"]}])
    try:
        with Client(mosquitto.host, mosquitto.port, "flaky", timeout=3) as c:
            assert c.chat("hi").text == "ok"
            caplog.set_level(logging.WARNING, logger="edge_sdk.client")
            for junk in (b"garbage", b"ONLINE", b"\xff\xfe\x00", b"Offline"):
                dev.status(junk)
                time.sleep(0.1)
                assert c.status == "online"
                assert c.chat("still?").text == "ok"
            assert "ignored status" in caplog.text
            dev.status(b"offline")
            time.sleep(0.2)
            with pytest.raises(DeviceOfflineError):
                c.chat("gone?")
    finally:
        dev.close()


def test_capabilities_junk_is_a_protocol_error(mosquitto):
    dev = _FakeDevice(mosquitto, "caps", lambda req: [])
    dev.c.publish(dev.t.capabilities, b'{"device_id": 5}', qos=1, retain=True).wait_for_publish(3)
    try:
        with Client(mosquitto.host, mosquitto.port, "caps", timeout=3) as c:
            with pytest.raises(ProtocolError):
                c.capabilities(timeout=2)
    finally:
        dev.close()


# --- Nagle on a stock broker --------------------------------------------------------------------------


def test_clients_acknowledge_at_once_after_every_read():
    """A stock mosquitto (no set_tcp_nodelay) holds each small message until the previous one is
    acknowledged; the daemon's and SDK's sockets acknowledge at once (the saving is measured by
    ``edge-sdk bench --mqtt``, see the README)."""
    import socket

    if not hasattr(socket, "TCP_QUICKACK"):
        pytest.skip("TCP_QUICKACK is Linux-only")
    server = socket.create_server(("127.0.0.1", 0))
    c = make_client(new_client_id("q"))
    sock = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    c._sock = sock
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
    peer.sendall(b"x")
    assert c._sock_recv(16) == b"x"
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    c._sock = None
    for s_ in (sock, peer, server):
        s_.close()


def test_bench_compares_broker_configs():
    from edge_sdk.bench_mqtt import bench_round_trip, format_round_trip

    rows = bench_round_trip(make_serve_model(), runs=3)
    assert {(r["broker_tcp_nodelay"], r["quick_ack"]) for r in rows} == {(a, b) for a in (False, True)
                                                                         for b in (False, True)}
    assert all(r["request_ms"] > 0 for r in rows)
    assert "set_tcp_nodelay" in format_round_trip(rows)


def _result(rid, seq, text, tokens):
    return {"type": "result", "request_id": rid, "seq": seq, "text": text, "tokens": tokens, "finish_reason": "stop",
            "usage": {"prompt_tokens": 1, "completion_tokens": len(tokens), "time_to_first_token_ms": 1.0,
                      "tokens_per_s": 0.0, "queue_ms": 0.0, "total_ms": 1.0}}


@pytest.mark.parametrize("sent, want", [
    (["ab", "cd", "ef"], ["ab", "cd", "ef"]),  # all deltas arrived
    (["ab"], ["ab", "cdef"]),                   # the last ones were lost (or overtaken by the result)
    ([], ["abcdef"]),                           # none arrived
    (["ab", "ef"], ["ab", "ef"]),               # a gap in the middle: nothing to mend, the result has it
])
def test_stream_is_completed_from_the_result(mosquitto, sent, want):
    pieces = {"ab": [1], "cd": [2], "ef": [3]}

    def events(req):
        rid = req["request_id"]
        evs = [{"type": "accepted", "request_id": rid, "seq": 0, "queue_position": 0}]
        evs += [{"type": "delta", "request_id": rid, "seq": i + 1, "text": t, "tokens": pieces[t]}
                for i, t in enumerate(sent)]
        return evs + [_result(rid, len(sent) + 1, "abcdef", [1, 2, 3])]

    dev = _FakeDevice(mosquitto, "lossy", events)
    try:
        with Client(mosquitto.host, mosquitto.port, "lossy", timeout=3) as c:
            s = c.chat("hi", stream=True)
            assert [d.text for d in s] == want and s.result.text == "abcdef"
    finally:
        dev.close()
