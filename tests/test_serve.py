"""The daemon on a real mosquitto: same tokens as in-process, malformed payloads, scheduling,
cancel, deadline, dedupe, status/capabilities/health, broker restart, systemd notify."""

from __future__ import annotations

import json
import socket
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from edge_sdk.client import BusyError, Client, DeviceOfflineError
from edge_sdk.protocol.topics import SCHEMA_VERSION, Topics
from edge_sdk.protocol.models import Accepted, Capabilities, Delta, Error, Health, Result

from mqtt_broker import *  # noqa: F401,F403
from mqtt_broker import RawClient

MSGS = [{"role": "system", "content": "You drive a robot."}, {"role": "user", "content": "Where is the red box?"}]


def in_process(model, prompt, **kw):
    s = model.stream(prompt, **kw)
    deltas = [d for d in s]
    return s.result, deltas


def test_sdk_and_raw_paho_match_in_process(serve_model, start_daemon, mosquitto):
    model = serve_model()
    d = start_daemon(model)
    want, _ = in_process(serve_model(), MSGS, max_tokens=24, temperature=0.7, seed=1234)

    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=10) as c:
        r = c.chat(MSGS, max_tokens=24, temperature=0.7, seed=1234)
        assert r.tokens == want.tokens and r.text == want.text
        assert r.finish_reason == want.finish_reason
        assert r.usage.prompt_tokens == want.prompt_tokens
        assert r.usage.completion_tokens == want.completion_tokens
        s = c.chat(MSGS, max_tokens=24, temperature=0.7, seed=1234, stream=True)
        deltas = list(s)
        assert [t for dl in deltas for t in dl.tokens] == want.tokens
        assert "".join(dl.text for dl in deltas) == want.text
        assert [dl.seq for dl in deltas] == list(range(1, len(deltas) + 1))
        assert s.result.tokens == want.tokens and s.result.seq == len(deltas) + 1

    # raw MQTT 5: Response Topic + Correlation Data, request id only in the correlation data
    raw = RawClient(mosquitto, client_id="raw5")
    t = Topics("edge", d.s.device_id)
    inbox = t.inbox("raw5") + "/x"
    raw.subscribe(inbox)
    body = {"messages": MSGS, "max_tokens": 24, "temperature": 0.7, "seed": 1234}
    raw.publish(t.request("raw5", "chat"), json.dumps(body), correlation=b"corr-1", response_topic=inbox)
    evs = raw.wait_terminal(correlation=b"corr-1")
    for e in evs:
        {"accepted": Accepted, "delta": Delta, "result": Result, "error": Error}[e["type"]].model_validate(e)
    assert [e["seq"] for e in evs] == list(range(len(evs)))
    assert evs[0]["type"] == "accepted" and evs[-1]["type"] == "result"
    assert evs[-1]["request_id"] == "corr-1" and evs[-1]["tokens"] == want.tokens
    raw.close()

    # raw MQTT 3.1.1: no properties, reply topic and request id in the payload
    raw3 = RawClient(mosquitto, protocol=mqtt.MQTTv311, client_id="raw3")
    inbox3 = t.inbox("raw3")
    raw3.subscribe(inbox3)
    raw3.publish(t.request("raw3", "chat"), json.dumps({**body, "request_id": "r-311", "reply_to": inbox3}))
    evs = raw3.wait_terminal(request_id="r-311")
    assert evs[-1]["type"] == "result" and evs[-1]["tokens"] == want.tokens
    raw3.close()


def test_prompt_forms_and_defaults(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(), default_max_tokens=7)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=10) as c:
        r = c.chat(prompt="raw text", seed=3)
        assert r.tokens == in_process(serve_model(), "raw text", seed=3, max_tokens=7)[0].tokens
        r = c.chat(prompt=[1, 2, 3], seed=3, max_tokens=4)
        assert r.tokens == in_process(serve_model(), [1, 2, 3], seed=3, max_tokens=4)[0].tokens
        # text-only content parts are joined into one string for the model
        parts = [{"role": "user", "content": [{"type": "text", "text": "Where is "}, {"type": "text", "text": "it?"}]}]
        r1 = c.chat(parts, seed=5, max_tokens=6)
        r2 = c.chat([{"role": "user", "content": "Where is it?"}], seed=5, max_tokens=6)
        assert r1.tokens == r2.tokens


def test_status_capabilities_health_retained(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(), metrics_interval_s=0.2)
    t = d.topics
    raw = RawClient(mosquitto)
    raw.subscribe(f"edge/v1/{d.s.device_id}/#")
    msgs = raw.wait_for(lambda ms: {m.topic for m in ms} >= {t.status, t.capabilities, t.health}, timeout=3)
    by = {m.topic: m for m in msgs}
    assert by[t.status].payload == b"online" and by[t.status].retain
    caps = Capabilities.model_validate_json(by[t.capabilities].payload)
    assert caps.model.name == "fake-tiny" and caps.model.context_length == 512 and caps.model.modalities == ["text"]
    assert caps.schema_version == SCHEMA_VERSION and caps.limits.queue_length == d.s.queue_length
    h = Health.model_validate_json(by[t.health].payload)
    assert h.state == "idle" and h.queue_depth == 0 and (h.memory_rss_bytes or 0) > 0
    assert by[t.health].properties.MessageExpiryInterval >= 1
    raw.close()
    d.stop(grace_s=0.1)
    raw = RawClient(mosquitto)
    raw.subscribe(t.status)
    raw.wait_for(lambda ms: any(m.payload == b"offline" for m in ms), timeout=3)
    raw.close()


def test_last_will_marks_device_offline(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model())
    raw = RawClient(mosquitto)
    raw.subscribe(d.topics.status)
    raw.wait_for(lambda ms: any(m.payload == b"online" for m in ms))
    # crash: drop the TCP connection without DISCONNECT -> the broker publishes the Will
    d.client.loop_stop()
    d.client.socket().shutdown(socket.SHUT_RDWR)
    d.client.socket().close()
    raw.wait_for(lambda ms: any(m.payload == b"offline" for m in ms), timeout=5)
    raw.close()
    d._stopped.set()  # the fixture's stop() has nothing left to do


def _raw_chat(raw, topics, client, body, rid):
    inbox = topics.inbox(client)
    raw.publish(topics.request(client, "chat"), json.dumps({**body, "request_id": rid}), response_topic=inbox)


def test_malformed_payloads_get_error_replies(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(), max_payload_bytes=4096)
    t = d.topics
    raw = RawClient(mosquitto, client_id="bad")
    inbox = t.inbox("bad")
    raw.subscribe(inbox + "/#")
    raw.subscribe(inbox)
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    cases = {
        "notjson": (b"{not json", "invalid_json", 400),
        "binary": (b"\xff\xfe\x00", "invalid_json", 400),
        "array": (b"[1,2]", "invalid_request", 400),
        "wrongtype": (json.dumps({**good, "max_tokens": "3"}).encode(), "invalid_request", 400),
        "wrongtype2": (json.dumps({**good, "stream": 1}).encode(), "invalid_request", 400),
        "unknownfield": (json.dumps({**good, "colour": "red"}).encode(), "invalid_request", 400),
        "noprompt": (json.dumps({"max_tokens": 3}).encode(), "invalid_request", 400),
        "badrole": (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "invalid_request", 400),
        "oversize": (json.dumps({**good, "pad": "x" * 5000}).encode(), "payload_too_large", 413),
        "toomanytokens": (json.dumps({**good, "max_tokens": 10**6}).encode(), "invalid_request", 400),
        "image": (json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image", "data": "aGVsbG8="}]}]}).encode(), "unsupported_media", 415),
        "overflow": (json.dumps({"prompt": "x" * 1000}).encode(), "generation_error", 400),
    }
    for corr, (payload, code, status) in cases.items():
        raw.publish(t.request("bad", "chat"), payload, correlation=corr.encode(), response_topic=inbox)
        evs = raw.wait_terminal(correlation=corr.encode())
        err = evs[-1]
        Error.model_validate(err)
        assert (err["type"], err["code"], err["status"]) == ("error", code, status), (corr, err)
        assert err["request_id"] == corr
        assert err["message"]

    # the request id from the payload wins and is echoed; no correlation data at all
    raw.publish(t.request("bad", "chat"), json.dumps({"request_id": "p-1", "max_tokens": 1}).encode())
    evs = raw.wait_terminal(request_id="p-1")
    assert evs[-1]["code"] == "invalid_request" and evs[-1]["status"] == 400

    # neither a request id nor correlation data: an error with request_id null, on the default inbox
    raw.publish(t.request("bad", "chat"), json.dumps(good).encode())
    raw.wait_for(lambda ms: any(m.topic == inbox and json.loads(m.payload).get("request_id") is None for m in ms))

    # a reply topic outside the sender's inbox is refused, the error goes to the default inbox
    raw.publish(t.request("bad", "chat"), json.dumps({**good, "request_id": "rt-1"}).encode(),
                response_topic=t.inbox("victim"))
    evs = raw.wait_terminal(request_id="rt-1")
    assert evs[-1]["code"] == "invalid_reply_topic"
    raw.publish(t.request("bad", "chat"), json.dumps({**good, "request_id": "rt-2", "reply_to": "elsewhere/x"}).encode())
    assert raw.wait_terminal(request_id="rt-2")[-1]["code"] == "invalid_reply_topic"

    # missing reply topic: MQTT 3.1.1 style without reply_to -> served on the default inbox
    raw.publish(t.request("bad", "chat"), json.dumps({**good, "request_id": "noreply"}).encode())
    evs = raw.wait_terminal(request_id="noreply")
    assert evs[-1]["type"] == "result"

    # unknown op, extra topic levels, bad cancel
    raw.publish(t.request("bad", "dance"), json.dumps(good).encode(), correlation=b"op1")
    assert raw.wait_terminal(correlation=b"op1")[-1]["code"] == "unknown_op"
    raw.publish(t.request("bad", "chat") + "/more", json.dumps(good).encode(), correlation=b"op2")
    assert raw.wait_terminal(correlation=b"op2")[-1]["code"] == "unknown_op"
    raw.publish(t.request("bad", "cancel"), b'{"nothing": 1}', correlation=b"c1")
    assert raw.wait_terminal(correlation=b"c1")[-1]["code"] == "invalid_request"

    # no client level at all: logged and dropped (nowhere to reply), the daemon keeps serving
    raw.publish(f"{t.root}/req/chat", json.dumps(good).encode())

    # and a valid request still works
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=5) as c:
        assert c.chat("still alive?", max_tokens=3).usage.completion_tokens >= 1
    raw.close()


def test_busy_queue_and_concurrent_clients(serve_model, start_daemon, mosquitto):
    model = serve_model(token_delay_s=0.01)
    d = start_daemon(model, queue_length=3, max_pending_per_client=8)
    n = 10
    results: dict[int, object] = {}

    def one(i):
        try:
            with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=15) as c:
                results[i] = c.chat(f"question {i}", max_tokens=8, seed=i)
        except Exception as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    assert len(results) == n
    busy = [i for i, r in results.items() if isinstance(r, BusyError)]
    ok = [i for i, r in results.items() if not isinstance(r, Exception)]
    assert busy, "expected some requests to be refused as busy"
    assert len(ok) >= 4  # one running + three queued at least
    assert set(busy) | set(ok) == set(range(n)), results
    for i in ok:
        assert results[i].tokens == in_process(serve_model(), [{"role": "user", "content": f"question {i}"}], max_tokens=8, seed=i)[0].tokens
    for i in busy:
        e = results[i]
        assert e.status == 429 and e.code == "busy" and e.retry_after_ms > 0


def test_per_client_limit(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(token_delay_s=0.02), queue_length=10, max_pending_per_client=2)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=10) as c:
        s1 = c.chat("a", max_tokens=20, stream=True)
        s2 = c.chat("b", max_tokens=20, stream=True)
        with pytest.raises(BusyError):
            c.chat("c", max_tokens=2)
        s1.cancel()
        s2.cancel()
        assert s1.wait().finish_reason in ("cancelled", "stop", "length")
        s2.wait()
        assert c.chat("d", max_tokens=2).usage.completion_tokens == 2


def test_cancel_running_and_queued(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(token_delay_s=0.02), queue_length=4)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=10) as c:
        running = c.chat("long one", max_tokens=200, stream=True)
        first = next(iter(running))
        assert first.tokens
        queued = c.chat("waiting", max_tokens=200, stream=True)
        time.sleep(0.05)
        t0 = time.monotonic()
        queued.cancel()
        r = queued.wait()
        assert r.finish_reason == "cancelled" and r.tokens == [] and time.monotonic() - t0 < 1.0
        running.cancel()
        r = running.wait()
        assert r.finish_reason == "cancelled" and 0 < len(r.tokens) < 100
        assert r.text.startswith(first.text)
        # cancel is idempotent and cancelling unknown ids is harmless
        c.cancel(running.request_id)
        c.cancel("never-existed")
        assert c.chat("after", max_tokens=2).usage.completion_tokens == 2
    h = d.health()
    assert h["cancelled"] >= 2 and h["queue_depth"] == 0


def test_deadline_stops_generation(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(token_delay_s=0.02))
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=10) as c:
        t0 = time.monotonic()
        r = c.chat("slow", max_tokens=500, deadline=0.2)
        assert r.finish_reason == "deadline" and 0 < len(r.tokens) < 50
        assert time.monotonic() - t0 < 2
        # a queued request whose deadline passes before it starts ends with 'deadline' too
        blocker = c.chat("blocker", max_tokens=40, stream=True)
        next(iter(blocker))
        r = c.chat("late", max_tokens=5, deadline=0.1)
        assert r.finish_reason == "deadline" and r.tokens == []
        blocker.close()


def test_priority_order(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(token_delay_s=0.01), queue_length=8)
    order = []
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=10) as c:
        blocker = c.chat("blocker", max_tokens=30, stream=True)
        next(iter(blocker))
        streams = [(p, c.chat(f"p{p}", max_tokens=2, priority=p, stream=True)) for p in (1, 5, 9, 5)]
        for p, s in streams:
            s.wait()
            order.append((s.result.usage.queue_ms, p))
        blocker.wait()
    by_start = [p for _, p in sorted(order)]
    assert by_start == [9, 5, 5, 1]


def test_duplicate_request_id_runs_once(serve_model, start_daemon, mosquitto):
    model = serve_model(token_delay_s=0.01)
    d = start_daemon(model)
    raw = RawClient(mosquitto, client_id="dup")
    inbox = d.topics.inbox("dup")
    raw.subscribe(inbox)
    body = {"prompt": "same", "max_tokens": 10, "seed": 1}
    _raw_chat(raw, d.topics, "dup", body, "same-id")
    _raw_chat(raw, d.topics, "dup", body, "same-id")  # while in progress: ignored
    evs = raw.wait_terminal(request_id="same-id")
    time.sleep(0.1)
    assert sum(e["type"] == "result" for e in raw.events()) == 1
    _raw_chat(raw, d.topics, "dup", body, "same-id")  # finished: its final event is sent again
    raw.wait_for(lambda ms: sum(json.loads(m.payload)["type"] == "result" for m in ms) == 2)
    results = [e for e in raw.events() if e["type"] == "result"]
    assert results[0] == results[1] == evs[-1]
    assert model.calls == 1
    raw.close()


def test_stream_false_sends_no_deltas_and_coalescing(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(), coalesce_ms=1000, coalesce_tokens=5)
    raw = RawClient(mosquitto, client_id="co")
    raw.subscribe(d.topics.inbox("co"))
    _raw_chat(raw, d.topics, "co", {"prompt": "p", "max_tokens": 12, "stream": False}, "ns")
    evs = raw.wait_terminal(request_id="ns")
    assert [e["type"] for e in evs] == ["accepted", "result"] and len(evs[-1]["tokens"]) == 12
    _raw_chat(raw, d.topics, "co", {"prompt": "p", "max_tokens": 12}, "co1")
    evs = raw.wait_terminal(request_id="co1")
    deltas = [e for e in evs if e["type"] == "delta"]
    # first token at once, then at most 5 tokens per message
    assert len(deltas[0]["tokens"]) == 1 and all(len(x["tokens"]) <= 5 for x in deltas)
    assert len(deltas) == 4  # 1 + 5 + 5 + 1
    assert "".join(x["text"] for x in deltas) == evs[-1]["text"]
    raw.close()


def test_broker_restart_mid_stream(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(token_delay_s=0.01))
    c = Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=8, status_wait=5)
    want = in_process(serve_model(), [{"role": "user", "content": "survive"}], max_tokens=150, seed=9)[0]
    s = c.chat("survive", max_tokens=150, seed=9, stream=True)
    it = iter(s)
    got = [next(it) for _ in range(3)]
    assert got
    mosquitto.kill()
    time.sleep(0.3)
    mosquitto.start()
    # the in-flight request ends: here with the whole result (the SDK re-sends, the daemon
    # answers from its table or keeps streaming); never hangs
    for _ in it:
        pass
    assert s.result.tokens == want.tokens
    assert d.wait_connected(5) and d.stats["connects"] >= 2
    # the daemon resubscribed: a new request works, through the same SDK client
    assert c.chat("after restart", max_tokens=3).usage.completion_tokens == 3
    c.close()


def test_daemon_stop_fails_pending_requests(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(token_delay_s=0.05), queue_length=4)
    c = Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=10)
    running = c.chat("run", max_tokens=400, stream=True)
    next(iter(running))
    queued = c.chat("queued", max_tokens=5, stream=True)
    threading.Thread(target=d.stop, kwargs={"grace_s": 0.2}).start()
    with pytest.raises(DeviceOfflineError):
        queued.wait()
    r = running.wait()  # cancelled at the end of the grace period
    assert r.finish_reason == "cancelled"
    time.sleep(0.3)
    with pytest.raises(DeviceOfflineError):
        c.chat("nobody home", max_tokens=2, timeout=2)
    c.close()


def test_no_daemon_is_device_offline(mosquitto):
    t0 = time.monotonic()
    with Client(mosquitto.host, mosquitto.port, "ghost", status_wait=0.3) as c:
        with pytest.raises(DeviceOfflineError):
            c.chat("anyone?")
    assert time.monotonic() - t0 < 3


def test_vanished_client_is_cancelled_by_its_will(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(token_delay_s=0.02))
    c = Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=10, keepalive=5)
    s = c.chat("forever", max_tokens=1000, stream=True)
    next(iter(s))
    c._core.client.loop_stop()
    c._core.client.socket().shutdown(socket.SHUT_RDWR)
    c._core.client.socket().close()
    end = time.monotonic() + 5
    while time.monotonic() < end and (d.stats["cancelled"] == 0 or d.scheduler.running is not None):
        time.sleep(0.02)
    assert d.stats["cancelled"] == 1 and d.scheduler.running is None


def test_sd_notify_ready_and_watchdog(serve_model, start_daemon, mosquitto, tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(3)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    start_daemon(serve_model())
    got = set()
    end = time.monotonic() + 3
    while time.monotonic() < end and not {"READY=1", "WATCHDOG=1"} <= got:
        got.update(sock.recv(1024).decode().split("\n"))
    assert {"READY=1", "WATCHDOG=1"} <= got
    sock.close()


def test_model_exception_is_internal_error_and_daemon_survives(serve_model, start_daemon, mosquitto):
    class Flaky:
        def __init__(self):
            self.inner = serve_model()
            self.n = 0

        def stream(self, prompt, **kw):
            self.n += 1
            if self.n == 1:
                raise RuntimeError("kaboom")
            return self.inner.stream(prompt, **kw)

    d = start_daemon(Flaky())
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=5) as c:
        from edge_sdk.client import ServerError
        with pytest.raises(ServerError) as ei:
            c.chat("x", max_tokens=2)
        assert ei.value.status == 500 and "kaboom" in ei.value.message
        assert c.chat("y", max_tokens=2).usage.completion_tokens == 2
        assert c.capabilities().model.name == "Flaky"


def test_slow_client_does_not_block_others(serve_model, start_daemon, mosquitto):
    """A client that stops reading its socket only fills its own queue in the broker."""
    d = start_daemon(serve_model(), coalesce_ms=0, coalesce_tokens=1, queue_length=8)
    slow = RawClient(mosquitto, client_id="slow")
    slow.subscribe(d.topics.inbox("slow"))
    slow.c.loop_stop()  # stops reading: the broker queues for it, TCP buffers fill
    slow.c.publish(d.topics.request("slow", "chat"),
                   json.dumps({"request_id": "s1", "prompt": "flood", "max_tokens": 2000}), qos=1)
    time.sleep(0.05)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=10) as c:
        t0 = time.monotonic()
        for i in range(3):
            assert c.chat(f"fast {i}", max_tokens=5).usage.completion_tokens == 5
        assert time.monotonic() - t0 < 3
    end = time.monotonic() + 5
    while d.stats["completed"] < 4 and time.monotonic() < end:
        time.sleep(0.02)
    assert d.stats["completed"] == 4  # the slow client's request finished too, nobody waited on it
    slow.c.loop_start()
    slow.close()


def test_restart_with_running_and_queued_requests(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(token_delay_s=0.01), queue_length=4)
    c = Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=8, status_wait=5)
    a = c.chat("first", max_tokens=60, seed=1, stream=True)
    next(iter(a))
    b = c.chat("second", max_tokens=10, seed=2, stream=True)
    mosquitto.kill()
    time.sleep(0.2)
    mosquitto.start()
    ra, rb = a.wait(), b.wait()
    assert ra.tokens == in_process(serve_model(), [{"role": "user", "content": "first"}], max_tokens=60, seed=1)[0].tokens
    assert rb.tokens == in_process(serve_model(), [{"role": "user", "content": "second"}], max_tokens=10, seed=2)[0].tokens
    c.close()


def test_daemon_and_sdk_do_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, edge_sdk.serve.daemon, edge_sdk.serve.cli, edge_sdk.bench_mqtt, edge_sdk.client; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
