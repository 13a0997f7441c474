"""PROTOCOL.md's access rules (A1-A7), tried as an attacker would under the shipped password
file and ACL on a real mosquitto: users named like topic levels ("req", "res", "clients", "v1",
"status", "events", "camera") try to read and write each other's replies, forge requests and
spoof device topics. Every attempt must fail; every user's own traffic must still work."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from edge_sdk.mqtt_common import new_client_id
from edge_sdk.serve.broker import mosquitto_binary
from edge_sdk.serve.config import ServeSettings
from edge_sdk.serve.daemon import Daemon

from mqtt_broker import RawClient, make_serve_model
from test_serve_acl import ADD_USER, start_shipped_broker

DEVICE = "jetson"
LEVEL_NAMES = ["req", "res", "clients", "v1", "status", "events", "camera", "alice"]
PASSWORDS = {name: f"pw-{name}" for name in ["edge-daemon", *LEVEL_NAMES]}

pytestmark = pytest.mark.skipif(mosquitto_binary() is None or shutil.which("mosquitto_passwd") is None,
                                reason="mosquitto / mosquitto_passwd not installed")


@pytest.fixture
def broker(tmp_path):
    b = start_shipped_broker(tmp_path, PASSWORDS)
    d = Daemon(make_serve_model(), ServeSettings(host=b.host, port=b.port, device_id=DEVICE, username="edge-daemon",
                                                 password=PASSWORDS["edge-daemon"])).start()
    assert d.wait_connected(5), b.read_log()
    yield b, d
    d.stop(grace_s=0.2)
    b.cleanup()


def _login(b, user: str) -> RawClient:
    return RawClient(b, client_id=new_client_id(user), username=user, password=PASSWORDS[user])


def test_add_user_refuses_names_that_are_not_one_topic_level(tmp_path):
    passwd = tmp_path / "p"
    for bad in ["+", "#", "a/b", "a+b", "x#", "$SYS", "a b", "-lead", ""]:
        r = subprocess.run([str(ADD_USER), str(passwd), bad, "pw"], capture_output=True, text=True, timeout=10)
        assert r.returncode != 0 and ("not a single topic level" in r.stderr or "usage" in r.stderr), (bad, r.stderr)
    assert not passwd.exists()
    subprocess.run([str(ADD_USER), str(passwd), "req", "pw"], check=True, capture_output=True, timeout=10)
    assert passwd.read_text().startswith("req:")


def test_a1_anonymous_and_wrong_password_refused(broker):
    b, _ = broker
    from edge_sdk.client import BrokerConnectionError, Client

    for kw in ({}, {"username": "req", "password": "wrong"}):
        with pytest.raises(BrokerConnectionError):
            Client(b.host, b.port, DEVICE, connect_timeout=2, **kw)


def test_a2_to_a6_nobody_reads_or_writes_another_users_replies(broker):
    b, d = broker
    t = d.topics
    users = {u: _login(b, u) for u in LEVEL_NAMES}
    # Everyone tries to see everything.
    for c in users.values():
        for pattern in ("#", "edge/v1/#", "edge/v1/clients/#", "edge/v1/+/req/#", "edge/v1/+/events/#"):
            c.subscribe(pattern)

    # A3: every user tries to write into every other user's inbox, directly and through the '+'
    # that matches "clients" (edge/v1/clients/req/<me>/... is user "req"'s inbox), and to spoof
    # the device's public topics.
    for me, c in users.items():
        targets = [f"edge/v1/clients/{other}/res/{DEVICE}" for other in LEVEL_NAMES if other != me]
        targets += [f"edge/v1/clients/req/{me}/x", f"edge/v1/clients/events/front/watch/{me}/j",
                    "edge/v1/clients/camera/front/snapshot", "edge/v1/clients/status", t.status, t.capabilities,
                    t.health, t.snapshot("front"), t.watch_events("front", me, "j")]
        for topic in targets:
            c.publish(topic, json.dumps({"attack": me}).encode())

    # A2: requests under someone else's name are dropped by the broker (the daemon never sees them).
    users["res"].publish(t.request("alice", "chat"), b'{"request_id":"forged","prompt":"hi","max_tokens":2}')

    # Each user's own request, with reply topics shaped to collide with the read patterns that hold
    # a '+' (which also matches "clients").
    reply_to = {"status": "edge/v1/clients/status/x", "events": "edge/v1/clients/events/front/watch/alice/j",
                "camera": "edge/v1/clients/camera/front/snapshot"}
    for me, c in users.items():
        body = {"request_id": f"own-{me}", "prompt": "hi", "max_tokens": 2}
        if me in reply_to:
            body["reply_to"] = reply_to[me]
        c.publish(t.request(me, "chat"), json.dumps(body).encode())
    for me, c in users.items():
        if me == "camera":  # its reply topic has the shape of a snapshot topic: denied to all, itself too
            continue
        evs = c.wait_terminal(request_id=f"own-{me}")
        assert evs[-1]["type"] == "result", (me, evs[-1])
    time.sleep(0.3)
    assert not any(b"own-camera" in m.payload for c in users.values() for m in c.msgs)

    for me, c in users.items():
        for m in list(c.msgs):
            assert b'"attack"' not in m.payload, (me, m.topic, m.payload)  # A3: no write got through
            if m.topic.startswith("edge/v1/clients/"):
                owner = m.topic.split("/")[3]
                assert owner == me, f"{me} read {m.topic} from {owner}'s inbox"  # A4
            elif m.topic.startswith(f"edge/v1/{DEVICE}/"):
                leaf = m.topic[len(f"edge/v1/{DEVICE}/"):]
                assert leaf in ("status", "capabilities", "health"), (me, m.topic)  # A5: no one's requests
    assert d.stats["completed"] == len(users)  # the forged request never ran
    online = [m for m in users["alice"].msgs if m.topic == t.status]
    assert online and all(m.payload == b"online" for m in online)  # A7: status not spoofed
    for c in users.values():
        c.close()


def test_a6_daemon_replies_only_inside_the_requesters_inbox(broker):
    b, d = broker
    t = d.topics
    req, alice = _login(b, "req"), _login(b, "alice")
    alice.subscribe("edge/v1/clients/alice/#")
    for rid, topic in (("r1", "edge/v1/clients/alice/res/jetson"), ("r2", "edge/v1/clients/req"),
                       ("r3", "edge/v1/clients/reqx/a"), ("r4", "edge/v1/clients/req/\u0001"),
                       ("r5", "edge/v1/clients/req/\ufffe"), ("r6", "edge/v1/clients/req/+"),
                       ("r7", "edge/v1/clients/req/#")):
        req.subscribe(t.inbox("req"))
        req.publish(t.request("req", "chat"), json.dumps({"request_id": rid, "prompt": "hi", "reply_to": topic}).encode())
        err = req.wait_terminal(request_id=rid)[-1]
        assert (err["type"], err["code"]) == ("error", "invalid_reply_topic"), (rid, err)
    assert alice.msgs == []
    assert d.stats["connects"] == 1  # no publish knocked the daemon off the broker
    req.close()
    alice.close()
