"""`make flash` end to end, against a test device: a real sshd in its own network and mount
namespaces (tests/flash_host.py says which parts of a Jetson it stands in for). Slow (a venv is
built on the device from the wheels the flash sends): `make test-flash`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from edge_sdk.flash.flow import FlashError, FlashOptions, flash, rollback, unflash
from edge_sdk.package import load_manifest, write_manifest

sys.path.insert(0, str(Path(__file__).parent))
from flash_host import FlashHost, missing_tools  # noqa: E402

pytestmark = [pytest.mark.flash,
              pytest.mark.skipif(missing_tools() is not None, reason=f"no test device: {missing_tools()}")]

ROOT = "/opt/edge-sdk"


@pytest.fixture(scope="module")
def orin_package(tiny_checkpoints, build_package):
    return build_package(tiny_checkpoints["mm_tied"], "int4", device="orin-nano-8gb", block_size=32)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    return tmp_path_factory.mktemp("wheels")  # one download for every flash of the module


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    with FlashHost(tmp_path_factory.mktemp("device")) as host:
        yield host
        print(host.run(f"tail -n 60 {ROOT}/log/daemon.log {ROOT}/log/mosquitto.log").stdout)  # shown on failure


def _options(host, package, wheels, **kw) -> FlashOptions:
    return FlashOptions(target=host.target(), package=Path(package), wheelhouse=wheels, health_timeout=60, **kw)


def _sh(host, command: str) -> str:
    proc = host.run(command)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _ask(host) -> dict:
    """A chat request through the device's broker, as an app on the device would send it."""
    code = ("import json, os; from edge_sdk.client import Client; "
            "c = Client('127.0.0.1', 1883, device_id='jetson', username='flash-check', "
            "password=os.environ['CHECK_PASSWORD'], timeout=30); "
            "r = c.chat('Where is the dock?', max_tokens=4); print(json.dumps({'tokens': r.usage.completion_tokens})); "
            "c.close()")
    out = _sh(host, f". /etc/edge-sdk/check.env && CHECK_PASSWORD=$CHECK_PASSWORD {ROOT}/current/venv/bin/python "
                    f"-c \"{code}\"")
    return json.loads(out.splitlines()[-1])


def test_preflight_refuses_a_wrong_l4t_before_any_change(tmp_path, orin_package, wheels):
    with FlashHost(tmp_path, l4t="# R35 (release), REVISION: 5.0, GCID: 1, BOARD: t186ref") as host:
        with pytest.raises(FlashError, match="(?s)preflight failed.*L4T R35.5.0 is JetPack 5, but orin-nano-8gb "
                                             "needs JetPack 6.2") as err:
            flash(_options(host, orin_package, wheels), progress=False)
        assert "nothing was changed" in str(err.value)
        assert _sh(host, 'test -z "$(ls -A /opt)" && test ! -e /etc/edge-sdk && echo clean') == "clean"


def test_preflight_refuses_a_full_disk(tmp_path, orin_package, wheels):
    with FlashHost(tmp_path, opt_size="64m") as host:
        with pytest.raises(FlashError, match=r"0\.1 GB free where the release goes, needs 1\.\d GB"):
            flash(_options(host, orin_package, wheels), progress=False)
        assert _sh(host, "ls -A /opt | wc -l") == "0"


def test_flash_serves_and_a_second_flash_changes_nothing(device, orin_package, wheels):
    first = flash(_options(device, orin_package, wheels), progress=False)
    assert first.changed and first.files_sent > 100 and first.venv == "built"
    # the release is source: its CPU kernels were compiled on the device, and load there
    assert first.kernel.startswith(f"built {ROOT}/releases/{first.release}/src/edge_sdk/runtime/_kernels")
    assert _sh(device, f"{ROOT}/current/venv/bin/python -c 'import os; from edge_sdk.runtime import kernels; "
                       f"print(os.path.realpath(kernels.load()._name))'") == first.kernel.split()[1]
    assert _ask(device)["tokens"] >= 1  # the daemon answers through its broker
    # credentials were made on the device, readable by root alone; none came from the repository
    assert _sh(device, "stat -c %a /etc/edge-sdk/serve.env /etc/edge-sdk/check.env /etc/mosquitto/edge-sdk.passwd") \
        == "600\n600\n600"
    daemon_pid = _sh(device, f"cat {ROOT}/run/edge-sdk.pid")

    second = flash(_options(device, orin_package, wheels), progress=False)
    assert (second.changed, second.files_sent, second.bytes_sent, second.venv) == (False, 0, 0, "reused")
    assert second.kernel.startswith("kept ")
    assert second.release == first.release
    assert _sh(device, f"cat {ROOT}/run/edge-sdk.pid") == daemon_pid  # not restarted
    # the daemon died (or the device rebooted without systemd): the same flash brings it back
    _sh(device, f"kill -KILL $(cat {ROOT}/run/edge-sdk.pid)")
    third = flash(_options(device, orin_package, wheels), progress=False)
    assert (third.changed, third.files_sent) == (False, 0) and _ask(device)["tokens"] >= 1
    log = [json.loads(line) for line in _sh(device, f"cat {ROOT}/log/releases.log").splitlines()]
    assert [(e["event"], e["changed"], e["files_sent"]) for e in log[-3:]] == [("flash", True, first.files_sent),
                                                                               ("flash", False, 0), ("flash", False, 0)]


def test_a_package_failing_its_hashes_is_refused_and_the_old_release_keeps_serving(device, orin_package, wheels,
                                                                                    tmp_path):
    current = _sh(device, f"readlink {ROOT}/current")
    bad = tmp_path / "bad"
    shutil.copytree(orin_package, bad)
    data = bytearray((bad / "decoder.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (bad / "decoder.onnx.data").write_bytes(bytes(data))
    with pytest.raises(Exception, match="sha256"):
        flash(_options(device, bad, wheels), progress=False)  # refused here, before anything is sent

    # A package damaged on the device's disk (an earlier, interrupted copy; a flipped bit): same
    # size and time, so rsync does not resend it, and the device's own hash check refuses it.
    other = orin_package.parent / "other"
    if not other.exists():
        shutil.copytree(orin_package, other)
        manifest = json.loads((other / "manifest.json").read_text())
        manifest["model_name"] = "other"
        (other / "manifest.json").write_text(json.dumps(manifest))
    from edge_sdk.flash.flow import package_key

    key = package_key(other)
    target = device.target()
    target.step("prepare", ROOT, "x")
    target.push(other, f"{ROOT}/packages/{key}")
    _sh(device, f"f={ROOT}/packages/{key}/decoder.onnx.data; t=$(stat -c %Y $f); "
                f"printf 'X' | dd of=$f bs=1 seek=100 conv=notrunc 2>/dev/null; touch -d @$t $f")
    with pytest.raises(FlashError) as err:
        flash(_options(device, other, wheels), progress=False)
    assert "`verify` failed" in str(err.value) and "decoder.onnx.data" in str(err.value)
    assert _sh(device, f"readlink {ROOT}/current") == current
    assert _ask(device)["tokens"] >= 1


def test_a_release_that_never_answers_is_rolled_back(device, orin_package, wheels, tmp_path):
    good = _sh(device, f"readlink {ROOT}/current")
    broken = tmp_path / "broken"
    shutil.copytree(orin_package, broken)
    (broken / "decoder.onnx").write_bytes(b"not an onnx graph")
    write_manifest(broken, load_manifest(broken, verify=False))  # hashes that match: it passes verify
    with pytest.raises(FlashError, match=rf"(?s)did not pass the health check .*rolled back to {Path(good).name} "
                                         "which serves again"):
        flash(_options(device, broken, wheels), progress=False)
    assert _sh(device, f"readlink {ROOT}/current") == good
    assert _ask(device)["tokens"] >= 1
    last = json.loads(_sh(device, f"tail -n1 {ROOT}/log/releases.log"))
    assert last["event"] == "failed" and last["rolled_back_to"] == Path(good).name


def test_rollback_then_unflash(device, tiny_checkpoints, build_package, wheels):
    first = _sh(device, f"readlink {ROOT}/current")
    float16 = build_package(tiny_checkpoints["mm_tied"], "none", device="orin-nano-8gb")  # another model
    newer = flash(_options(device, float16, wheels), progress=False)
    assert newer.changed and newer.venv == "reused"
    assert rollback(_options(device, float16, wheels)) == Path(first).name
    assert _ask(device)["tokens"] >= 1
    unflash(_options(device, float16, wheels))
    assert _sh(device, f"test ! -e {ROOT} && test ! -e /etc/edge-sdk && test ! -e /etc/mosquitto/conf.d/edge-sdk.conf "
                       "&& echo gone") == "gone"
