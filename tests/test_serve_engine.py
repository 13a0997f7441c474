"""The daemon serving a real (tiny) engine package: tokens through the broker, via the SDK and
via raw paho, equal the model's own in-process tokens with the same seed; images over MQTT."""

from __future__ import annotations

import base64
import io
import json

import pytest

import edge_sdk
from edge_sdk.client import Client, UnsupportedMediaError
from edge_sdk.serve.broker import mosquitto_binary

from mqtt_broker import *  # noqa: F401,F403
from mqtt_broker import RawClient

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")

MSGS = [{"role": "system", "content": "You are a robot."}, {"role": "user", "content": "Where is the red box?"}]


@pytest.fixture(scope="module")
def engine_model(tiny_checkpoints, build_package):
    return edge_sdk.load(build_package(tiny_checkpoints["text"]))


def test_engine_tokens_match_in_process(engine_model, start_daemon, mosquitto):
    kw = dict(max_tokens=12, temperature=0.8, seed=7)
    want = engine_model.generate(MSGS, **kw)
    greedy = engine_model.generate("Hello", max_tokens=8)
    d = start_daemon(engine_model)
    caps_info = engine_model.capabilities()
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
        caps = c.capabilities()
        assert caps.model.name == caps_info["model"] and caps.model.context_length == caps_info["context_length"]
        r = c.chat(MSGS, **kw)
        assert r.tokens == want.tokens and r.text == want.text and r.finish_reason == want.finish_reason
        assert r.usage.prompt_tokens == want.prompt_tokens
        s = c.chat(MSGS, stream=True, **kw)
        deltas = list(s)
        assert "".join(x.text for x in deltas) == want.text
        assert [t for x in deltas for t in x.tokens] == want.tokens
        # a plain string is one user turn for both
        assert c.chat("Hello", max_tokens=8).tokens == greedy.tokens
        with pytest.raises(UnsupportedMediaError):
            c.chat([{"role": "user", "content": [{"type": "image", "data": base64.b64encode(b"x").decode()}]}])

    raw = RawClient(mosquitto, client_id="eng")
    inbox = d.topics.inbox("eng")
    raw.subscribe(inbox)
    raw.publish(d.topics.request("eng", "chat"), json.dumps({"messages": MSGS, **kw}), correlation=b"e1",
                response_topic=inbox)
    assert raw.wait_terminal(correlation=b"e1", timeout=10)[-1]["tokens"] == want.tokens
    raw.close()


def test_engine_image_over_mqtt(tiny_checkpoints, build_package, start_daemon, mosquitto):
    """An inline image part reaches a vision engine through the daemon's image seam."""
    import numpy as np
    from PIL import Image

    model = edge_sdk.load(build_package(tiny_checkpoints["mm_tied"]))
    assert "image" in model.capabilities()["modalities"]
    buf = io.BytesIO()
    Image.fromarray((np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)).save(buf, format="PNG")
    png = buf.getvalue()
    content = [{"type": "text", "text": "What is this?"}, {"type": "image", "data": base64.b64encode(png).decode()}]
    want = model.generate([{"role": "user", "content": [content[0], {"type": "image", "image": png}]}],
                          max_tokens=6, seed=1)
    d = start_daemon(model)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
        assert c.capabilities().model.modalities == ["text", "image"]
        r = c.chat([{"role": "user", "content": content}], max_tokens=6, seed=1)
        assert r.tokens == want.tokens and r.usage.prompt_tokens == want.prompt_tokens
