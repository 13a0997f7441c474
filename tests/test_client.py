"""The Python SDK: sync and asyncio clients, typed errors, timeouts, discovery."""

from __future__ import annotations

import asyncio
import time

import pytest

from edge_sdk.client import (AsyncClient, BadRequestError, BrokerConnectionError, BusyError, Client,
                             DeviceOfflineError, RequestTimeoutError, UnsupportedMediaError, build_chat_payload,
                             discover, error_from_event)
from edge_sdk.serve.broker import free_port
from edge_sdk.protocol.models import ChatRequest

from mqtt_broker import *  # noqa: F401,F403


def um(text):
    return [{"role": "user", "content": text}]


def ref(model, prompt, **kw):
    s = model.stream(prompt, **kw)
    for _ in s:
        pass
    return s.result


def test_payload_builder_matches_schema():
    p = build_chat_payload("hi", max_tokens=3, temperature=1, seed=2, stop=["x"], deadline=0.5, priority=7)
    req = ChatRequest.model_validate(p)
    assert req.messages[0].content == "hi" and req.deadline_ms == 500 and req.temperature == 1.0
    assert isinstance(p["temperature"], float)
    assert ChatRequest.model_validate(build_chat_payload(prompt=[1, 2])).prompt == [1, 2]


def test_error_mapping():
    assert isinstance(error_from_event({"status": 429, "code": "busy", "retry_after_ms": 5}), BusyError)
    assert isinstance(error_from_event({"status": 415, "code": "unsupported_media"}), UnsupportedMediaError)
    assert isinstance(error_from_event({"status": 413, "code": "payload_too_large"}), BadRequestError)
    assert isinstance(error_from_event({"status": 503, "code": "stopping"}), DeviceOfflineError)
    assert isinstance(RequestTimeoutError("x"), TimeoutError)


def test_no_broker_is_a_connection_error():
    with pytest.raises(BrokerConnectionError):
        Client("127.0.0.1", free_port(), "x", connect_timeout=1)


def test_sync_errors_are_typed(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(), max_tokens=50)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=5) as c:
        with pytest.raises(BadRequestError) as ei:
            c.chat("x", max_tokens=51)
        assert ei.value.status == 400 and ei.value.code == "invalid_request" and ei.value.request_id
        with pytest.raises(UnsupportedMediaError):
            c.chat([{"role": "user", "content": [{"type": "image", "camera": "front"}]}])
        with pytest.raises(BadRequestError) as ei:
            c.chat(prompt="y" * 2000)  # context overflow in the model
        assert ei.value.code == "generation_error"
        with pytest.raises(BadRequestError):
            c.chat("x", temperature=-1)


def test_timeout_cancels_on_device(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(token_delay_s=0.02))
    with Client(mosquitto.host, mosquitto.port, d.s.device_id) as c:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            c.chat("slow", max_tokens=1000, timeout=0.3)
        assert time.monotonic() - t0 < 1.0
        end = time.monotonic() + 3
        while d.scheduler.running is not None and time.monotonic() < end:
            time.sleep(0.02)
        assert d.scheduler.running is None and d.stats["cancelled"] == 1
        # closing a stream early cancels too
        with c.chat("slow", max_tokens=1000, stream=True) as s:
            next(iter(s))
        end = time.monotonic() + 3
        while d.stats["cancelled"] < 2 and time.monotonic() < end:
            time.sleep(0.02)
        assert d.stats["cancelled"] == 2


def test_discovery_and_default_device(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(), device_id="orin-1")
    found = discover(mosquitto.host, mosquitto.port, timeout=0.5)
    assert found["orin-1"]["status"] == "online" and found["orin-1"]["model"]["name"] == "fake-tiny"
    with Client(mosquitto.host, mosquitto.port, status_wait=0.5) as c:
        assert c.device_id == "orin-1" and c.wait_status(1.0) == "online" and c.status == "online"
        caps = c.capabilities()
        assert caps.limits.max_tokens == d.s.max_tokens and caps.topics["status"] == d.topics.status
    start_daemon(serve_model(), device_id="orin-2")
    with pytest.raises(DeviceOfflineError):
        Client(mosquitto.host, mosquitto.port, status_wait=0.5)


def test_client_threads_share_one_connection(serve_model, start_daemon, mosquitto):
    import threading
    d = start_daemon(serve_model(token_delay_s=0.002), queue_length=16)
    out = {}
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=10) as c:
        def one(i):
            out[i] = c.chat(f"t{i}", max_tokens=6, seed=i)
        ts = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
    for i in range(6):
        assert out[i].tokens == ref(serve_model(), um(f"t{i}"), max_tokens=6, seed=i).tokens


def test_async_client(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(token_delay_s=0.002), queue_length=16)

    async def main():
        async with AsyncClient(mosquitto.host, mosquitto.port, d.s.device_id, timeout=10) as c:
            caps = await c.capabilities()
            assert caps.device_id == d.s.device_id
            r = await c.chat("hello", max_tokens=8, seed=3)
            assert r.tokens == ref(serve_model(), um("hello"), max_tokens=8, seed=3).tokens
            s = await c.chat("hello", max_tokens=8, seed=3, stream=True)
            deltas = [x async for x in s]
            assert [t for x in deltas for t in x.tokens] == r.tokens and s.result.text == r.text
            # many at once on one event loop
            rs = await asyncio.gather(*(c.chat(f"q{i}", max_tokens=5, seed=i) for i in range(8)))
            for i, x in enumerate(rs):
                assert x.tokens == ref(serve_model(), um(f"q{i}"), max_tokens=5, seed=i).tokens
            with pytest.raises(BadRequestError):
                await c.chat("x", max_tokens=10**9)
            with pytest.raises(RequestTimeoutError):
                await c.chat("slow", max_tokens=2000, timeout=0.05, seed=1)
            # cancel
            s = await c.chat("long", max_tokens=2000, stream=True)
            async for _ in s:
                s.cancel()
            assert s.result.finish_reason == "cancelled"

    asyncio.run(asyncio.wait_for(main(), 20))


def test_async_device_offline(mosquitto):
    async def main():
        async with AsyncClient(mosquitto.host, mosquitto.port, "ghost", status_wait=0.2) as c:
            with pytest.raises(DeviceOfflineError):
                await c.chat("anyone?")

    asyncio.run(asyncio.wait_for(main(), 10))


def test_async_busy(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model(token_delay_s=0.01), queue_length=1, max_pending_per_client=10)

    async def main():
        async with AsyncClient(mosquitto.host, mosquitto.port, d.s.device_id, timeout=10) as c:
            res = await asyncio.gather(*(c.chat(f"b{i}", max_tokens=5) for i in range(5)), return_exceptions=True)
            assert any(isinstance(r, BusyError) for r in res)
            assert sum(not isinstance(r, Exception) for r in res) >= 1  # 2 unless the burst beats the worker
            assert all(isinstance(r, BusyError) or not isinstance(r, Exception) for r in res)

    asyncio.run(asyncio.wait_for(main(), 15))
