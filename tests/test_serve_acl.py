"""The shipped broker config (devices/mosquitto/): anonymous clients are refused, a client can
only read its own inbox and write its own request topics, and the daemon works under it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from edge_sdk.client import BrokerConnectionError, Client
from edge_sdk.mqtt_common import make_client, new_client_id
from edge_sdk.serve.broker import Mosquitto, mosquitto_binary
from edge_sdk.serve.config import ServeSettings
from edge_sdk.serve.daemon import Daemon

from mqtt_broker import RawClient, make_serve_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "devices" / "mosquitto"
USERS = {"edge-daemon": "d-secret", "alice": "a-secret", "bob": "b-secret"}

pytestmark = pytest.mark.skipif(mosquitto_binary() is None or shutil.which("mosquitto_passwd") is None,
                                reason="mosquitto / mosquitto_passwd not installed")


def shipped_conf(port: int, passwd: Path, acl: Path) -> str:
    """The shipped edge-sdk.conf with the test's port and file paths, nothing else changed."""
    text = (SHIPPED / "edge-sdk.conf").read_text()
    text = re.sub(r"^listener 1883 127.0.0.1$", f"listener {port} 127.0.0.1", text, flags=re.M)
    text = re.sub(r"^password_file .*$", f"password_file {passwd}", text, flags=re.M)
    text = re.sub(r"^acl_file .*$", f"acl_file {acl}", text, flags=re.M)
    assert f"listener {port}" in text and str(acl) in text
    # as root, mosquitto would drop to the 'mosquitto' user, who cannot read pytest's tmp dirs
    run_as = "user root\n" if os.geteuid() == 0 else ""
    return text + "\npersistence false\nlog_dest stderr\n" + run_as


ADD_USER = ROOT / "devices" / "mosquitto" / "add_user.sh"


def start_shipped_broker(tmp_path: Path, users: dict[str, str]) -> Mosquitto:
    """mosquitto with the shipped config, ACL and a password file of ``users`` (added with the
    shipped add_user.sh)."""
    passwd = tmp_path / "edge-sdk.passwd"
    for user, pw in users.items():
        subprocess.run([str(ADD_USER), str(passwd), user, pw], check=True, capture_output=True, timeout=10)
    acl = tmp_path / "edge-sdk.acl"
    shutil.copy(SHIPPED / "edge-sdk.acl", acl)
    for p in (passwd, acl):
        p.chmod(0o644)
    tmp_path.chmod(0o755)
    b = Mosquitto(workdir=tmp_path / "broker")
    conf = shipped_conf(b.port, passwd, acl)
    b.write_conf = lambda: (b.conf.write_text(conf), b.conf)[1]
    return b.start()


@pytest.fixture
def secured(tmp_path):
    b = start_shipped_broker(tmp_path, USERS)
    d = Daemon(make_serve_model(), ServeSettings(host=b.host, port=b.port, device_id="jetson",
                                                 username="edge-daemon", password=USERS["edge-daemon"])).start()
    assert d.wait_connected(5), b.read_log()
    yield b, d
    d.stop(grace_s=0.2)
    b.cleanup()


def test_anonymous_refused(secured):
    b, d = secured
    with pytest.raises(BrokerConnectionError):
        Client(b.host, b.port, "jetson", connect_timeout=2)
    with pytest.raises(BrokerConnectionError):
        Client(b.host, b.port, "jetson", username="alice", password="wrong", connect_timeout=2)


def test_users_chat_and_cannot_read_each_other(secured):
    b, d = secured
    alice = Client(b.host, b.port, "jetson", username="alice", password=USERS["alice"], timeout=5)
    assert alice.capabilities().device_id == "jetson"

    # bob's eavesdropping attempts: alice's inbox, every inbox
    spy = RawClient(b, client_id=new_client_id("spy"), username="bob", password=USERS["bob"])
    codes = [spy.subscribe("edge/v1/clients/alice/#"), spy.subscribe("edge/v1/clients/+/res/#"),
             spy.subscribe("edge/v1/#")]
    own = spy.subscribe("edge/v1/clients/bob/#")
    assert not own[0].is_failure

    r = alice.chat("secret plans", max_tokens=6, seed=1)
    assert r.usage.completion_tokens == 6
    time.sleep(0.2)
    leaked = [m.topic for m in spy.msgs if "/clients/alice/" in m.topic]
    assert leaked == [], (codes, leaked)

    # bob cannot post requests under alice's name (the daemon would reply into alice's inbox)
    spy.c.publish(d.topics.request("alice", "chat"), b'{"request_id":"x","prompt":"hi"}', qos=1)
    # ...but can under his own
    spy.publish(d.topics.request("bob", "chat"), b'{"request_id":"b1","prompt":"hi","max_tokens":2}')
    evs = spy.wait_terminal(request_id="b1")
    assert evs[-1]["type"] == "result"
    time.sleep(0.2)
    assert d.stats["completed"] == 2  # alice's and bob's own, never the forged one
    # and cannot name a reply topic in alice's inbox (the daemon refuses, the reply goes to bob)
    spy.publish(d.topics.request("bob", "chat"), b'{"request_id":"b2","prompt":"hi","max_tokens":2}',
                response_topic="edge/v1/clients/alice/res/jetson")
    assert spy.wait_terminal(request_id="b2")[-1]["code"] == "invalid_reply_topic"
    spy.close()
    alice.close()


def test_watch_events_are_private_and_snapshots_public(secured, tmp_path):
    from test_serve_vision import SlowVisionModel, write_avi

    b, _ = secured
    cam = tmp_path / "cam.avi"
    write_avi(cam, (0, 0, 200))
    d = Daemon(SlowVisionModel(), ServeSettings(host=b.host, port=b.port, device_id="cam", username="edge-daemon",
                                                password=USERS["edge-daemon"], cameras={"front": str(cam)},
                                                camera_loop=True, watch_min_every_s=0.1)).start()
    try:
        assert d.wait_connected(5)
        spy = RawClient(b, client_id=new_client_id("spy"), username="bob", password=USERS["bob"])
        spy.subscribe("edge/v1/cam/events/#")
        with Client(b.host, b.port, "cam", username="alice", password=USERS["alice"], timeout=5) as alice:
            with alice.watch("front", "?", every=0.2, max_tokens=2, event_timeout=5) as h:
                assert next(h).job_id == h.job_id and next(h).seq >= 1
            assert spy.msgs == []  # bob never sees alice's watch events
            assert alice.snapshot("front")[:3] == b"\xff\xd8\xff"
        assert not spy.subscribe(d.topics.snapshot("front"))[0].is_failure
        msgs = spy.wait_for(lambda ms: any(m.topic == d.topics.snapshot("front") for m in ms))
        assert msgs[-1].payload[:3] == b"\xff\xd8\xff"  # the retained snapshot
        spy.close()
    finally:
        d.stop(grace_s=0.2)


def test_cannot_spoof_device_status(secured):
    b, d = secured
    c = make_client(new_client_id("x"), username="bob", password=USERS["bob"])
    c.connect(b.host, b.port)
    c.loop_start()
    c.publish(d.topics.status, b"offline", qos=1, retain=True).wait_for_publish(3)
    c.disconnect()
    c.loop_stop()
    watcher = RawClient(b, username="alice", password=USERS["alice"])
    watcher.subscribe(d.topics.status)
    msgs = watcher.wait_for(lambda ms: len(ms) >= 1)
    assert msgs[0].payload == b"online"
    watcher.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")
def test_tls_listener(tmp_path):
    """The optional TLS listener of the shipped config: daemon and SDK both over TLS."""
    def run(*args):
        subprocess.run(args, check=True, capture_output=True, timeout=30, cwd=tmp_path)

    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=edge-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "san.ext")
    from edge_sdk.serve.broker import free_port
    tls_port = free_port()
    text = (SHIPPED / "edge-sdk.conf").read_text()
    tls_block = text[text.index("#listener 8883"):]
    tls_conf = "\n".join(line[1:] for line in tls_block.splitlines() if line.startswith("#"))
    tls_conf = (tls_conf.replace("listener 8883 0.0.0.0", f"listener {tls_port} 127.0.0.1")
                .replace("/etc/mosquitto/certs/", f"{tmp_path}/"))
    b = Mosquitto(workdir=tmp_path / "broker", extra_conf=tls_conf)
    b.start()
    try:
        d = Daemon(make_serve_model(), ServeSettings(host="127.0.0.1", port=tls_port, device_id="tls",
                                                     tls_ca=tmp_path / "ca.crt")).start()
        assert d.wait_connected(5), b.read_log()
        with Client("127.0.0.1", tls_port, "tls", tls_ca=str(tmp_path / "ca.crt"), timeout=5) as c:
            assert c.chat("over tls", max_tokens=3).usage.completion_tokens == 3
        with pytest.raises(BrokerConnectionError):  # wrong CA: the handshake fails
            Client("127.0.0.1", tls_port, "tls", tls_ca="/etc/ssl/certs/ca-certificates.crt", connect_timeout=2)
        d.stop(grace_s=0.1)
    finally:
        b.cleanup()


def test_listen_events_are_private(secured):
    """What a daemon publishes on alice's listen job reaches alice and no one else, whatever bob
    subscribes to (the wildcard over devices included, and the inbox level 'clients')."""
    b, d = secured
    topic = d.topics.listen_events("desk", "alice", "j1")
    spy = RawClient(b, client_id=new_client_id("spy"), username="bob", password=USERS["bob"])
    for pattern in ("edge/v1/+/events/#", "edge/v1/jetson/events/desk/listen/alice/#", "edge/v1/clients/events/#"):
        spy.subscribe(pattern)
    alice = RawClient(b, client_id=new_client_id("alice"), username="alice", password=USERS["alice"])
    assert not alice.subscribe("edge/v1/+/events/+/listen/alice/#")[0].is_failure
    daemon = RawClient(b, client_id=new_client_id("d"), username="edge-daemon", password=USERS["edge-daemon"])
    daemon.publish(topic, b'{"type":"transcript"}')
    assert alice.wait_for(lambda ms: any(m.topic == topic for m in ms))
    time.sleep(0.3)
    assert spy.msgs == []
    for c in (spy, alice, daemon):
        c.close()
