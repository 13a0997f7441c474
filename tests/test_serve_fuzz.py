"""Property test: whatever arrives on a request topic, the daemon answers with exactly one
terminal event (a result, or a structured error), and keeps serving afterwards."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edge_sdk.client import Client
from edge_sdk.serve.broker import Mosquitto, mosquitto_binary
from edge_sdk.serve.config import ServeSettings
from edge_sdk.serve.daemon import Daemon
from edge_sdk.protocol.models import ERROR_STATUS, Error, Result

from mqtt_broker import RawClient, make_serve_model

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")


@pytest.fixture(scope="module")
def fuzz_env():
    broker = Mosquitto().start()
    d = Daemon(make_serve_model(), ServeSettings(host=broker.host, port=broker.port, device_id="fuzz",
                                                 max_payload_bytes=2048, max_tokens=64)).start()
    assert d.wait_connected(5)
    raw = RawClient(broker, client_id="fz")
    raw.subscribe("edge/v1/clients/fz/#")
    yield broker, d, raw
    raw.close()
    d.stop(grace_s=0.2)
    broker.cleanup()


anything = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
content_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "audio", "text"])},
                          optional={"camera": st.text(max_size=8), "data": st.text(max_size=12), "text": anything}),
    anything)
message = st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from(["user", "system", "assistant", "robot"]) | anything,
                  "content": st.text(max_size=30) | st.lists(content_part, max_size=3) | anything})
fields = {
    "v": st.just(1) | anything,
    "request_id": st.from_regex(r"\A[a-z0-9]{1,8}\Z") | anything,
    "messages": st.lists(message, min_size=0, max_size=3) | anything,
    "prompt": st.text(max_size=40) | st.lists(st.integers(-3, 3000), max_size=20) | anything,
    "max_tokens": st.integers(-2, 80) | anything,
    "temperature": st.floats(-1, 3) | anything,
    "top_p": st.floats(-0.5, 1.5) | anything,
    "top_k": st.integers(-2, 50) | anything,
    "seed": st.integers(-5, 2**64) | anything,
    "stop": st.lists(st.text(max_size=4), max_size=3) | anything,
    "stream": st.booleans() | anything,
    "priority": st.integers(-1, 10) | anything,
    "deadline_ms": st.integers(-1, 5000) | anything,
    "reply_to": st.sampled_from(["edge/v1/clients/fz/res/fuzz/a", "edge/v1/clients/other/x", "a/+/b"]) | anything,
}
request_like = st.fixed_dictionaries({}, optional=fields).flatmap(
    lambda d: st.dictionaries(st.sampled_from(["colour", "extra", "model"]), anything, max_size=1).map(
        lambda extra: {**d, **extra}))
valid_request = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                  "content": st.text(max_size=30)}), min_size=1, max_size=3)},
    optional={"max_tokens": st.integers(1, 64), "temperature": st.floats(0, 2), "seed": st.integers(0, 2**32),
              "stream": st.booleans(), "priority": st.integers(0, 9), "top_k": st.integers(0, 20),
              "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2), "deadline_ms": st.integers(1, 2000)})
# a valid request with one field replaced by anything
one_bad_field = st.tuples(valid_request, st.sampled_from(sorted(fields)), anything).map(
    lambda t: {**t[0], t[1]: t[2]})
payloads = st.one_of(
    valid_request.map(lambda v: json.dumps(v).encode()),
    one_bad_field.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    anything.map(lambda v: json.dumps(v).encode()),
    request_like.map(lambda v: json.dumps(v).encode()),
    st.just(b'{"prompt": "' + b"x" * 3000 + b'"}'),  # oversize
)
_counter = itertools.count()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(payload=payloads, op=st.sampled_from(["chat", "chat", "chat", "cancel"]))
def test_every_payload_gets_one_terminal_event(fuzz_env, payload, op):
    broker, d, raw = fuzz_env
    corr = f"fz-{next(_counter)}".encode()
    raw.publish(d.topics.request("fz", op), payload, correlation=corr,
                response_topic="edge/v1/clients/fz/res/fuzz")
    if op == "cancel":
        # a cancel answers only when it is malformed; give it a moment, then check the form
        import time
        time.sleep(0.01)
        for ev in raw.events(correlation=corr):
            Error.model_validate(ev)
        return
    evs = raw.wait_terminal(correlation=corr, timeout=5)
    terminal = [e for e in evs if e.get("type") in ("result", "error")]
    assert len(terminal) == 1, evs
    ev = terminal[0]
    event(ev.get("code") or f"result:{ev.get('finish_reason')}")
    if ev["type"] == "error":
        Error.model_validate(ev)
        assert ERROR_STATUS[ev["code"]] == ev["status"] and ev["status"] != 500, ev
    else:
        Result.model_validate(ev)


def test_daemon_still_serves_after_fuzz(fuzz_env):
    broker, d, raw = fuzz_env
    assert all(t.is_alive() for t in d._threads)
    with Client(broker.host, broker.port, "fuzz", timeout=5) as c:
        assert c.chat("hello after fuzz", max_tokens=3).usage.completion_tokens == 3


# --- bulk: thousands of malformed payloads, each built to be invalid in a known way -------------------

VALID = {"request_id": "x", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3,
         "temperature": 0.5, "stop": ["\n"], "priority": 5}
WRONG_VALUES = {  # field -> values its schema refuses
    "max_tokens": ["3", 3.5, True, -1, 0, [3], {"n": 3}],
    "temperature": ["hot", -1, 11, [], {}],
    "top_p": [0, -0.5, 1.5, "1"],
    "top_k": [-1, "2", 1.5],
    "seed": [-1, "7", 2**64, 1.5],
    "stop": ["\n", [1], [""], ["x" * 300], ["a"] * 17],
    "stream": [1, "yes", None, []],
    "priority": [10, -1, "5", 2.5],
    "deadline_ms": [0, -5, "9", 86_400_001],
    "messages": [[], "hi", [{"role": "robot", "content": "x"}], [{"content": "x"}], [{"role": "user"}],
                 [{"role": "user", "content": [{"type": "video"}]}], [{"role": "user", "content": 5}]],
    "v": [2, "1", None],
    "request_id": ["has space", "", "x" * 200, 5],
    "colour": ["red"],  # unknown field
}
BAD_UTF8 = [b"\xed\xa0\x80", b"\xc0\xaf", b"\xff", b"\xfe\xff", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82"]
OPS = ["chat", "watch", "snapshot", "cancel", "watch_cancel"]


def _is_dict_json(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


def malformed_cases(n: int, seed: int = 0, max_payload: int = 2048):
    """(op, payload, properties) triples, every one of which the protocol answers with an error."""
    import random

    rng = random.Random(seed)
    valid = json.dumps(VALID).encode()
    kinds = ["bytes", "truncated", "huge", "deep", "wrong_type", "bad_utf8", "unknown_op", "extra_level",
             "not_object", "image_no_vision", "junk_request_property", "outside_reply_topic", "surrogate_escape"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        op, props = rng.choice(OPS), {}
        if kind == "bytes":
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
            if _is_dict_json(payload):
                payload = b"\xff" + payload
        elif kind == "truncated":
            payload = valid[: rng.randrange(1, len(valid) - 1)]
        elif kind == "huge":
            payload = json.dumps({**VALID, "messages": [{"role": "user", "content": "x" * (max_payload + rng.randrange(1, 5000))}]}).encode()
        elif kind == "deep":
            depth = rng.randrange(1000, max_payload // 2)  # deeper than the parser goes, within the size limit
            payload = b"[" * depth + b"]" * depth if rng.random() < 0.5 else b"{\"a\":" * (depth // 5) + b"1" + b"}" * (depth // 5)
        elif kind == "wrong_type":
            op = "chat"
            field = rng.choice(sorted(WRONG_VALUES))
            payload = json.dumps({**VALID, field: rng.choice(WRONG_VALUES[field])}).encode()
        elif kind == "bad_utf8":
            cut = valid.index(b"hello") + rng.randrange(0, 5)
            payload = valid[:cut] + rng.choice(BAD_UTF8) + valid[cut:]
        elif kind == "unknown_op":
            op = rng.choice(["dance", "CHAT", "chat2", "x" * 40, "stat\u00fcs"])
            payload = valid
        elif kind == "extra_level":
            op = rng.choice(OPS) + "/" + rng.choice(["more", "a/b", "x"])
            payload = valid
        elif kind == "not_object":
            payload = json.dumps(rng.choice([[1, 2], "chat", 42, None, True, 1.5, []])).encode()
        elif kind == "image_no_vision":
            op = "chat"
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            props = {"content_type": rng.choice(["image/jpeg", "image/png", "image/x-junk"])}
        elif kind == "junk_request_property":
            op = "chat"
            payload = b"\xff\xd8\xff" + bytes(rng.randrange(256) for _ in range(50))
            props = {"content_type": "image/jpeg",
                     "user": [("request", rng.choice(["{not json", "[]", '{"v": 2}', '{"prompt": 5}']))]}
        elif kind == "outside_reply_topic":
            payload = valid
            props = {"response_topic": rng.choice(["edge/v1/clients/other/res/fuzz", "elsewhere", "edge/v1/clients/fz",
                                                   "edge/v1/clients/fzz/x", "edge/v1/fuzz/status"])}
        else:  # surrogate_escape
            payload = valid.replace(b"hello", rng.choice([b"\\ud800", b"\\udfff", b"a\\udc80b"]))
        yield kind, op, payload, props


def test_thousands_of_malformed_payloads_each_get_one_error(fuzz_env):
    """EDGE_SDK_FUZZ_N (default 2000) payloads from ``malformed_cases``; each must get exactly one
    terminal event, an error with a protocol code, and the daemon must stay connected and serve."""
    import collections
    import os
    import time

    from edge_sdk.mqtt_common import publish_props

    broker, d, raw = fuzz_env
    n = int(os.environ.get("EDGE_SDK_FUZZ_N", "2000"))
    connects = d.stats["connects"]
    inbox = d.topics.inbox("fz")
    expected = {}
    t0 = time.monotonic()

    def answered(batch):
        def check(_):
            got = {getattr(m.properties, "CorrelationData", None) for m in raw.msgs}
            return all(c in got for c in batch)
        return check

    # In batches: the broker keeps at most max_queued_messages (1000) unacknowledged replies for a
    # subscriber that falls behind, so more outstanding requests than that would lose answers.
    batch: list[bytes] = []
    for i, (kind, op, payload, props) in enumerate(malformed_cases(n, max_payload=d.s.max_payload_bytes)):
        corr = f"bulk-{i}".encode()
        expected[corr] = kind
        batch.append(corr)
        p = publish_props(correlation=corr, response_topic=props.get("response_topic", inbox),
                          content_type=props.get("content_type"), json_payload=False, user=props.get("user"))
        raw.c.publish(d.topics.request("fz", op), payload, qos=1, properties=p)
        if len(batch) == 250:
            raw.wait_for(answered(batch), timeout=60)
            batch = []
    raw.wait_for(answered(batch), timeout=60)
    time.sleep(0.5)  # any second reply would arrive by now
    per_case = collections.defaultdict(list)
    for m in raw.msgs:
        corr = getattr(m.properties, "CorrelationData", None)
        if corr in expected:
            per_case[corr].append(json.loads(m.payload))
    codes = collections.Counter()
    for corr, kind in expected.items():
        evs = per_case[corr]
        assert len(evs) == 1, (kind, evs)
        ev = Error.model_validate(evs[0])
        assert ERROR_STATUS[ev.code] == ev.status and ev.status < 500, (kind, evs[0])
        codes[f"{kind}:{ev.code}"] += 1
    print(f"{n} malformed payloads in {time.monotonic() - t0:.1f} s, all answered once: {dict(codes)}")
    assert d.stats["connects"] == connects and all(t.is_alive() for t in d._threads)
    with Client(broker.host, broker.port, "fuzz", timeout=5) as c:
        assert c.chat("hello after the bulk fuzz", max_tokens=3).usage.completion_tokens == 3
