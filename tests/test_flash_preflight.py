"""`make flash`'s preflight and unit, without a device: facts as a Jetson's device.sh reports them."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from edge_sdk.flash.flow import render_unit
from edge_sdk.flash.preflight import detect_profile, run_preflight
from edge_sdk.package import load_manifest

ORIN_NANO = {
    "uid": "0", "arch": "aarch64", "l4t_release": "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic",
    "l4t_core": "36.4.3-20250107174145", "model": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
    "tensorrt": "10.3.0.30-1+cuda12.5", "cuda": "12.6.68", "power_mode": "MAXN_SUPER", "python": "3.10",
    "mem_total_kb": str(7_800_000), "disk_free_bytes": str(40 * 10**9), "mosquitto": "installable", "current": "none",
    "python_venv": "yes", "rsync": "yes", "sudo": "root",
}


@pytest.fixture
def orin_manifest(tiny_checkpoints, build_package):
    return load_manifest(build_package(tiny_checkpoints["text"], "int4", device="orin-nano-8gb", block_size=32))


def test_a_healthy_orin_nano_passes(orin_manifest):
    assert detect_profile(ORIN_NANO) == "orin-nano-8gb"
    pf = run_preflight(ORIN_NANO, orin_manifest, package_bytes=10**8)
    assert pf.ok, pf.failures
    assert any("L4T R36.4.3 (JetPack 6)" in n for n in pf.notes)


@pytest.mark.parametrize("change,expected", [
    ({"l4t_release": "# R35 (release), REVISION: 5.0"}, "L4T R35.5.0 is JetPack 5, but orin-nano-8gb needs JetPack 6.2"),
    ({"l4t_release": ""}, "no L4T release (/etc/nv_tegra_release)"),
    ({"tensorrt": "8.6.2"}, "TensorRT 8.6.2 is older than the 10.3 orin-nano-8gb needs"),
    ({"tensorrt": ""}, "TensorRT not found"),
    ({"python": "3.8"}, "python3 3.8: needs 3.10+"),
    ({"mosquitto": "missing"}, "mosquitto is neither installed nor installable"),
    ({"python_venv": "no"}, "apt install python3-venv"),
    ({"rsync": "no"}, "rsync is not installed on the device"),
    ({"uid": "1000", "sudo": "no"}, "`sudo -n` asks for a password"),
    ({"disk_free_bytes": str(10**9)}, "1.0 GB free where the release goes, needs 1.6 GB"),
    ({"model": "NVIDIA Jetson AGX Orin Developer Kit"}, "package was built for orin-nano-8gb but the device is agx-orin-64gb"),
])
def test_each_failure_is_one_line(orin_manifest, change, expected):
    pf = run_preflight({**ORIN_NANO, **change}, orin_manifest, package_bytes=10**8)
    assert not pf.ok
    assert any(expected in f for f in pf.failures), pf.failures
    assert all("\n" not in f for f in pf.failures)


def test_a_model_too_big_for_the_device_is_refused(orin_manifest):
    pf = run_preflight({**ORIN_NANO, "mem_total_kb": str(2_000_000)}, orin_manifest, package_bytes=3 * 10**9)
    assert any(f.startswith("model needs ~3.") and "orin-nano-8gb may use 1.2 GB of its 2.0 GB" in f
               for f in pf.failures), pf.failures


def test_power_mode_below_maxn_is_noted_not_refused(orin_manifest):
    pf = run_preflight({**ORIN_NANO, "power_mode": "15W"}, orin_manifest, package_bytes=10**8)
    assert pf.ok and any("power mode 15W: decode speed follows memory clocks" in n for n in pf.notes)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_rendered_unit_passes_systemd_analyze_verify(tmp_path):
    root = tmp_path / "edge-sdk"
    python = root / "current" / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    unit = tmp_path / "edge-sdk.service"
    unit.write_text(render_unit(str(root)))
    text = unit.read_text()
    assert f"ExecStart={python} -m edge_sdk.cli serve {root}/current/package" in text
    assert "Type=notify" in text and "WatchdogSec=" in text and "NoNewPrivileges=yes" in text
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0 and "Unknown" not in proc.stderr, proc.stderr
    # and verify does fail a unit that cannot start: the check above is not vacuous
    python.unlink()
    assert subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True).returncode != 0
