"""Images over MQTT: camera frames, inline images (MQTT 5 binary and base64 JSON), bad images,
snapshots and watch jobs, against a real mosquitto and the real tiny vision engine. Cameras are
MJPG .avi files written here with OpenCV (no camera device in CI)."""

from __future__ import annotations

import base64
import json
import os
import time

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest

import edge_sdk
from edge_sdk.client import (BadRequestError, CameraUnavailableError, Client, DeviceOfflineError,
                             InvalidImageError, RequestTimeoutError, UnsupportedMediaError, WatchError, WatchEvent, encode_image_input)
from edge_sdk.mqtt_common import publish_props
from edge_sdk.serve.broker import mosquitto_binary
from edge_sdk.protocol.models import Error, WatchEnd

from avi_files import H, W, write_avi
from mqtt_broker import *  # noqa: F401,F403
from mqtt_broker import FakeModel, RawClient

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")


def first_frame_rgb(path) -> np.ndarray:
    cap = cv2.VideoCapture(str(path))
    ok, frame = cap.read()
    cap.release()
    assert ok
    return np.ascontiguousarray(frame[:, :, ::-1])


def png_bytes(h=H, w=W) -> bytes:
    img = (np.arange(h * w * 3) % 251).astype(np.uint8).reshape(h, w, 3)
    ok, buf = cv2.imencode(".png", img)
    return buf.tobytes()


def jpeg_bytes(h=H, w=W, quality=90) -> bytes:
    img = (np.arange(h * w * 3) % 239).astype(np.uint8).reshape(h, w, 3)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes()


@pytest.fixture(scope="module")
def vision_model(tiny_checkpoints, build_package):
    return edge_sdk.load(build_package(tiny_checkpoints["mm_tied"]))


@pytest.fixture
def camera_file(tmp_path):
    p = tmp_path / "front.avi"
    write_avi(p, (30, 160, 220))
    return p


def vision_daemon(start_daemon, model, camera_file, **kw):
    base = dict(cameras={"front": str(camera_file)}, camera_loop=True, camera_timeout_s=0.5,
                camera_reconnect_max_s=0.3, watch_min_every_s=0.1)
    base.update(kw)
    return start_daemon(model, **base)


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def test_camera_snapshot_and_camera_image_parts(vision_model, start_daemon, mosquitto, camera_file):
    d = vision_daemon(start_daemon, vision_model, camera_file)
    raw = RawClient(mosquitto, client_id="viewer")
    raw.subscribe(d.topics.snapshot("front"))
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=20) as c:
        caps = c.capabilities()
        assert caps.cameras == ["front"] and {"watch", "watch_cancel", "snapshot"} <= set(caps.ops)
        assert caps.limits.max_image_bytes == d.s.max_image_bytes

        jpeg = c.snapshot("front")
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (H, W, 3)
        assert np.abs(img.reshape(-1, 3).mean(0) - (30, 160, 220)).max() < 8
        assert cv2.imdecode(np.frombuffer(c.snapshot("front", max_side=32), np.uint8), 1).shape == (24, 32, 3)
        # ... and the retained topic got the default-size one, with metadata in user properties
        msgs = raw.wait_for(lambda ms: any(m.topic == d.topics.snapshot("front") for m in ms))
        m = [m for m in msgs if m.topic == d.topics.snapshot("front")][0]
        assert m.retain or m.properties.ContentType == "image/jpeg"
        assert cv2.imdecode(np.frombuffer(m.payload, np.uint8), 1).shape == (H, W, 3)
        with pytest.raises(UnsupportedMediaError):
            c.snapshot("back")

        # a camera image part gets the newest frame (BGR -> RGB): the same tokens as in process
        want = vision_model.generate(user({"type": "image", "image": first_frame_rgb(camera_file)},
                                          {"type": "text", "text": "What colour?"}), max_tokens=6)
        r = c.chat(user({"type": "image", "camera": "front"}, {"type": "text", "text": "What colour?"}), max_tokens=6)
        assert r.tokens == want.tokens and r.usage.prompt_tokens == want.prompt_tokens
        with pytest.raises(UnsupportedMediaError):
            c.chat(user({"type": "image", "camera": "back"}), max_tokens=2)

    # MQTT 3.1.1: base64 snapshot as JSON
    old = RawClient(mosquitto, protocol=mqtt.MQTTv311, client_id="old")
    inbox = d.topics.inbox("old")
    old.subscribe(inbox)
    old.publish(d.topics.request("old", "snapshot"),
                json.dumps({"request_id": "s1", "camera": "front", "encoding": "base64"}))
    old.wait_for(lambda ms: any(b'"s1"' in m.payload for m in ms))
    ev = old.events()[-1]
    assert ev["type"] == "snapshot" and (ev["width"], ev["height"]) == (W, H)
    assert cv2.imdecode(np.frombuffer(base64.b64decode(ev["data"]), np.uint8), 1).shape == (H, W, 3)
    old.close()
    raw.close()


def test_inline_images_binary_and_base64(vision_model, start_daemon, mosquitto, camera_file):
    d = vision_daemon(start_daemon, vision_model, camera_file)
    png = png_bytes()
    q = {"type": "text", "text": "What is this?"}
    want = vision_model.generate(user({"type": "image", "image": png}, q), max_tokens=6, seed=1)
    arr = (np.arange(H * W * 3) % 200).astype(np.uint8).reshape(H, W, 3)  # RGB
    arr_jpeg, _ = encode_image_input(arr)
    want_arr = vision_model.generate(user({"type": "image", "image": cv2.imdecode(
        np.frombuffer(arr_jpeg, np.uint8), 1)[:, :, ::-1].copy()}, q), max_tokens=6, seed=1)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=20) as c:
        msgs = user({"type": "image", "image": png}, q)
        r = c.chat(msgs, max_tokens=6, seed=1)  # one image: sent as the MQTT 5 binary payload
        assert r.tokens == want.tokens
        assert msgs[0]["content"][0]["image"] is png  # the caller's messages are untouched
        deltas = list(c.chat(user({"type": "image", "image": png}, q), max_tokens=6, seed=1, stream=True))
        assert [t for x in deltas for t in x.tokens] == want.tokens
        assert c.chat(user({"type": "image", "image": arr}, q), max_tokens=6, seed=1).tokens == want_arr.tokens
        two = c.chat(user({"type": "image", "image": png}, {"type": "image", "image": png}, q), max_tokens=4)
        assert two.usage.prompt_tokens > r.usage.prompt_tokens  # two images: base64 in the JSON
        path = camera_file.parent / "x.png"
        path.write_bytes(png)
        assert c.chat(user({"type": "image", "image": str(path)}, q), max_tokens=6, seed=1).tokens == want.tokens

    # raw MQTT 5: image payload + prompt in a user property; 3.1.1: base64 in JSON
    raw = RawClient(mosquitto, client_id="rawv")
    inbox = d.topics.inbox("rawv")
    raw.subscribe(inbox)
    props = publish_props(correlation=b"b1", response_topic=inbox, content_type="image/png",
                          user=[("prompt", "What is this?")])
    raw.c.publish(d.topics.request("rawv", "chat"), png, qos=1, properties=props).wait_for_publish(5)
    want2 = vision_model.generate(user({"type": "image", "image": png}, q), max_tokens=d.s.default_max_tokens)
    ev = raw.wait_terminal(correlation=b"b1", timeout=10)[-1]
    assert ev["type"] == "result" and ev["tokens"] == want2.tokens, ev
    raw.close()
    old = RawClient(mosquitto, protocol=mqtt.MQTTv311, client_id="old")
    oinbox = d.topics.inbox("old")
    old.subscribe(oinbox)
    old.publish(d.topics.request("old", "chat"), json.dumps({"request_id": "o1", "max_tokens": 6, "seed": 1,
                "messages": user({"type": "image", "data": base64.b64encode(png).decode()}, q)}))
    assert old.wait_terminal(request_id="o1", timeout=10)[-1]["tokens"] == want.tokens
    old.close()


BAD = {
    "truncated_jpeg": (lambda: jpeg_bytes()[:-200], "invalid_image", 400),
    "zero_bytes": (lambda: b"", "invalid_image", 400),
    "oversize": (lambda: jpeg_bytes(480, 640, 100), "payload_too_large", 413),
    "not_an_image": (lambda: b"this is plain text, not a picture at all", "unsupported_media", 415),
    "truncated_png": (lambda: png_bytes()[:200], "invalid_image", 400),  # passes the sniff, fails to decode
}


def test_bad_images_get_error_replies_and_the_daemon_keeps_serving(vision_model, start_daemon, mosquitto,
                                                                   camera_file):
    d = vision_daemon(start_daemon, vision_model, camera_file, max_image_bytes=20_000, max_payload_bytes=65_536)
    assert len(jpeg_bytes(480, 640, 100)) > 20_000 and len(jpeg_bytes()) < 20_000
    raw = RawClient(mosquitto, client_id="bad")
    inbox = d.topics.inbox("bad")
    raw.subscribe(inbox)
    topic = d.topics.request("bad", "chat")
    for name, (make, code, status) in BAD.items():
        data = make()
        # MQTT 5 binary payload
        corr = f"{name}-bin".encode()
        props = publish_props(correlation=corr, response_topic=inbox, content_type="image/jpeg",
                              user=[("prompt", "what?")])
        raw.c.publish(topic, data, qos=1, properties=props).wait_for_publish(5)
        err = raw.wait_terminal(correlation=corr, timeout=10)[-1]
        Error.model_validate(err)
        assert (err["type"], err["code"], err["status"]) == ("error", code, status), (name, err)
        assert err["message"] and err["request_id"] == corr.decode()
        # base64 in JSON
        if name == "oversize":
            continue  # (over max_payload_bytes as base64 too; below, through the SDK)
        corr = f"{name}-b64".encode()
        raw.publish(topic, json.dumps({"messages": user({"type": "image", "data": base64.b64encode(data).decode()})}),
                    correlation=corr, response_topic=inbox)
        err = raw.wait_terminal(correlation=corr, timeout=10)[-1]
        assert (err["type"], err["code"], err["status"]) == ("error", code, status), (name, err)
    # a binary payload without a payload image part, and payload: true without a binary payload
    props = publish_props(correlation=b"nopart", response_topic=inbox, content_type="image/png",
                          user=[("request", json.dumps({"messages": user({"type": "text", "text": "hi"})}))])
    raw.c.publish(topic, png_bytes(), qos=1, properties=props).wait_for_publish(5)
    assert raw.wait_terminal(correlation=b"nopart")[-1]["code"] == "invalid_request"
    raw.publish(topic, json.dumps({"messages": user({"type": "image", "payload": True})}), correlation=b"nobin",
                response_topic=inbox)
    assert raw.wait_terminal(correlation=b"nobin")[-1]["code"] == "invalid_request"
    raw.close()

    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=20) as c:
        for exc, data in ((InvalidImageError, BAD["truncated_jpeg"][0]()), (InvalidImageError, b""),
                          (BadRequestError, jpeg_bytes(480, 640, 100)), (UnsupportedMediaError, b"hello world")):
            with pytest.raises(exc) as ei:
                c.chat(user({"type": "image", "image": data}, {"type": "text", "text": "?"}), max_tokens=2)
            assert ei.value.status in (400, 413, 415)
        # the daemon keeps serving
        r = c.chat(user({"type": "image", "image": png_bytes()}, {"type": "text", "text": "ok?"}), max_tokens=3)
        assert r.finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1
        assert c.chat("still there?", max_tokens=2).usage.completion_tokens >= 1


def test_watch_cadence_and_cancel(vision_model, start_daemon, mosquitto, camera_file):
    d = vision_daemon(start_daemon, vision_model, camera_file)
    spy = RawClient(mosquitto, client_id="spy")
    spy.subscribe(d.topics.watch_events_filter)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=20) as c:
        with pytest.raises(BadRequestError, match="watch_min_every_s"):
            c.watch("front", "anything?", every=0.05)
        with pytest.raises(UnsupportedMediaError):
            c.watch("back", "anything?", every=1)
        with pytest.raises(BadRequestError, match="watch_store"):
            c.watch("front", "anything?", every=1, persistent=True)

        h = c.watch("front", "What do you see?", every=0.5, max_tokens=3, event_timeout=5)
        assert h.registration.every_s == 0.5 and h.events_topic == d.topics.watch_events("front", c.client_id, h.job_id)
        evs = []
        for ev in h:
            assert isinstance(ev, WatchEvent), ev
            evs.append(ev)
            if len(evs) == 1:  # an interactive request meanwhile is served (watch runs are lowest priority)
                assert c.chat("hello", max_tokens=2).usage.completion_tokens >= 1
            if len(evs) == 4:
                break
        assert [e.seq for e in evs] == [0, 1, 2, 3]
        assert all(e.camera == "front" and e.trigger == "interval" and e.usage.completion_tokens >= 1 for e in evs)
        assert [e.frame_seq for e in evs] == sorted(e.frame_seq for e in evs)
        gaps = np.diff([e.ts for e in evs])
        assert np.all(np.abs(gaps - 0.5) < 0.2), gaps
        h.cancel()
        with pytest.raises(StopIteration):
            next(h)
        # the spy sees the end, then nothing for 1.5 s
        spy.wait_for(lambda ms: any(json.loads(m.payload).get("type") == "watch_end" for m in ms), timeout=3)
        n = len(spy.msgs)
        time.sleep(1.5)
        assert len(spy.msgs) == n
        end = [json.loads(m.payload) for m in spy.msgs if json.loads(m.payload)["type"] == "watch_end"][0]
        assert WatchEnd.model_validate(end).reason == "cancelled"

        # expiry ends a job by itself; leaving a with-block cancels
        with c.watch("front", "?", every=0.2, max_tokens=2, expires=0.7, event_timeout=5) as h2:
            got = list(h2)
        assert got and h2.end is not None and h2.end.reason == "expired"
        assert d.health()["watch_jobs"] == 0 and d.health()["watch_runs"] >= 5

    # closing a client ends its non-persistent watch jobs
    c2 = Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=20)
    c2.watch("front", "?", every=1.0, max_tokens=2)
    assert len(d.watch.jobs()) == 1
    c2.close()
    deadline = time.monotonic() + 3
    while d.watch.jobs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert d.watch.jobs() == []
    spy.close()


def test_async_watch_and_snapshot(vision_model, start_daemon, mosquitto, camera_file):
    import asyncio

    from edge_sdk.client import AsyncClient

    d = vision_daemon(start_daemon, vision_model, camera_file)

    async def main():
        async with AsyncClient(mosquitto.host, mosquitto.port, d.s.device_id, timeout=20) as c:
            jpeg = await c.snapshot("front")
            assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), 1).shape == (H, W, 3)
            r = await c.chat(user({"type": "image", "image": png_bytes()}, {"type": "text", "text": "?"}), max_tokens=3)
            assert r.usage.completion_tokens >= 1
            async with await c.watch("front", "?", every=0.2, max_tokens=2, event_timeout=5) as h:
                seqs = []
                async for ev in h:
                    seqs.append(ev.seq)
                    if len(seqs) == 2:
                        break
            assert seqs == [0, 1]

    asyncio.run(main())
    deadline = time.monotonic() + 3
    while d.watch.jobs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert d.watch.jobs() == []


def test_watch_on_change(vision_model, start_daemon, mosquitto, tmp_path):
    cam = tmp_path / "still.avi"
    write_avi(cam, (40, 40, 40), frames=5)
    d = vision_daemon(start_daemon, vision_model, cam)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=20) as c:
        with c.watch("front", "Anything new?", every=0.2, on_change=True, max_tokens=2) as h:
            first = h.get(timeout=5)
            assert isinstance(first, WatchEvent) and first.trigger == "change"
            with pytest.raises(RequestTimeoutError):  # a still scene: no event
                h.get(timeout=1.0)
            write_avi(cam, (230, 230, 230), frames=5)  # the reader reopens the file at its end
            ev = h.get(timeout=5)
            assert isinstance(ev, WatchEvent) and ev.trigger == "change" and ev.change > 0.5
            assert ev.frame_seq > first.frame_seq


def test_camera_lost_and_back_is_reconnected(vision_model, start_daemon, mosquitto, camera_file):
    d = vision_daemon(start_daemon, vision_model, camera_file)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=20) as c:
        with c.watch("front", "?", every=0.2, max_tokens=2) as h:
            assert isinstance(h.get(timeout=5), WatchEvent)
            moved = camera_file.with_name("away.avi")
            os.replace(camera_file, moved)
            err = None
            end = time.monotonic() + 5
            while err is None and time.monotonic() < end:
                ev = h.get(timeout=5)
                if isinstance(ev, WatchError):
                    err = ev
            assert err is not None and err.code == "camera_unavailable" and err.status == 503
            with pytest.raises(CameraUnavailableError):
                c.snapshot("front", timeout=5)
            os.replace(moved, camera_file)
            ev = h.get(timeout=5)
            while not isinstance(ev, WatchEvent):
                ev = h.get(timeout=5)
            assert ev.seq > err.seq
            assert c.snapshot("front")[:3] == b"\xff\xd8\xff"
            health = d.health()
            assert health["cameras"]["front"]["reconnects"] >= 1 and health["watch_jobs"] == 1


def test_persistent_watch_job_survives_a_restart(vision_model, start_daemon, mosquitto, camera_file, tmp_path):
    store = tmp_path / "watch.json"
    kw = dict(device_id="persist-dev", watch_store=str(store))
    d1 = vision_daemon(start_daemon, vision_model, camera_file, **kw)
    with Client(mosquitto.host, mosquitto.port, "persist-dev", timeout=20) as c:
        h = c.watch("front", "Still there?", every=0.3, max_tokens=2, persistent=True, job_id="door", event_timeout=5)
        eph = c.watch("front", "temp", every=0.3, max_tokens=2, job_id="temp")  # not persistent
        assert h.registration.persistent and isinstance(next(h), WatchEvent)
        assert [j["job_id"] for j in json.loads(store.read_text())["jobs"]] == ["door"]
        d1.stop(grace_s=0.2)
        with pytest.raises(DeviceOfflineError):  # the non-persistent job's handle learns the device went offline
            while True:
                eph.get(timeout=5)
        d2 = vision_daemon(start_daemon, vision_model, camera_file, **kw)
        assert [s.job_id for s in d2.watch.jobs()] == ["door"]
        ev = next(h)  # the same handle keeps receiving: the restored job publishes on the same topic
        while not isinstance(ev, WatchEvent):
            ev = next(h)
        assert ev.job_id == "door"
        # registering the same id again is idempotent
        again = c.watch("front", "Still there?", every=0.3, persistent=True, job_id="door")
        assert again.registration.job_id == "door" and len(d2.watch.jobs()) == 1
        again.detach()
        h.cancel()
        deadline = time.monotonic() + 3
        while json.loads(store.read_text())["jobs"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(store.read_text())["jobs"] == []


class SlowVisionModel(FakeModel):
    """The fake model, taking images, slow enough to fill the queue."""

    def capabilities(self) -> dict:
        return {**super().capabilities(), "modalities": ["text", "image"]}

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return [len(prompt)] * 8
        return super()._prompt_ids(prompt)


def test_watch_runs_yield_to_interactive_requests(start_daemon, mosquitto, camera_file, serve_model):
    model = SlowVisionModel(token_delay_s=0.05)
    d = vision_daemon(start_daemon, model, camera_file, queue_length=1)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=20) as c:
        with c.watch("front", "?", every=0.1, max_tokens=4) as h:  # each run takes 0.2 s: ticks are skipped
            assert isinstance(h.get(timeout=5), WatchEvent)
            # the queue is never full for a client because of watch runs
            rs = [c.chat("hi", max_tokens=2) for _ in range(3)]
            assert all(r.finish_reason == "length" for r in rs)
            assert d.health()["watch_skipped"] > 0


def test_camera_and_watch_settings_from_flags_env_and_files(tmp_path, monkeypatch):
    import argparse

    from edge_sdk.serve.cli import add_serve_arguments, settings_from_args
    from edge_sdk.serve.config import ServeSettings

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    s = settings_from_args(p.parse_args(["pkg", "--cameras", "front=0,yard=rtsp://u:p@cam/x", "--camera-loop",
                                         "--watch-store", str(tmp_path / "w.json"), "--max-image-bytes", "50000"]))
    assert s.cameras == {"front": "0", "yard": "rtsp://u:p@cam/x"} and s.camera_loop
    assert s.watch_store == tmp_path / "w.json" and s.max_image_bytes == 50000
    monkeypatch.setenv("EDGE_SDK_CAMERAS", '{"door": "/dev/video2"}')
    assert ServeSettings().cameras == {"door": "/dev/video2"}
    cfg = tmp_path / "serve.toml"
    cfg.write_text('[serve]\nwatch_min_every_s = 0.5\n[serve.cameras]\nfront = 0\n')
    monkeypatch.delenv("EDGE_SDK_CAMERAS")
    s = ServeSettings.load(cfg)
    assert s.cameras == {"front": "0"} and s.watch_min_every_s == 0.5
    with pytest.raises(ValueError):
        ServeSettings(cameras={"bad/name": "0"})
