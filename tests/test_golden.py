"""Golden outputs: recorded at build time, replayed on a backend; a wrong engine is caught."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edge_sdk
from edge_sdk.cli import main
from edge_sdk.golden import GOLDEN_TEXTS, STEPS, check_golden
from edge_sdk.package import load_manifest
from edge_sdk.plugins.reference_backend import PluginGraphReference


def test_build_records_golden_outputs(tiny_checkpoints, build_package):
    manifest = load_manifest(build_package(tiny_checkpoints["text"], "int4", block_size=32))
    golden = manifest.extra["golden"]
    assert len(golden["records"]) == len(GOLDEN_TEXTS) and golden["dtype"] == "float32"
    assert all(len(r["tokens"]) == STEPS and len(r["top"]) == STEPS for r in golden["records"])
    assert all(r["top"][s][0][0] == r["tokens"][s] for r in golden["records"] for s in range(STEPS))


@pytest.mark.parametrize("device", ["cpu", "orin-nano-8gb"])
def test_standard_and_plugin_graphs_pass_the_golden_check(tiny_checkpoints, build_package, device):
    pkg = build_package(tiny_checkpoints["mm_tied"], "int4", device=device, block_size=32)
    model = edge_sdk.load(pkg, accuracy_level=0)
    golden = model.manifest.extra["golden"]
    report = check_golden(model.backend, golden)
    assert report.ok, report.summary()
    if device != "cpu":  # GPU profiles ship the plugin graph; it answers the same
        plugin = PluginGraphReference(pkg, model.manifest, max_context=64)
        report = check_golden(plugin, golden)
        assert report.ok, report.summary()


class _Skewed:
    """A backend whose logits are slightly wrong: what a miscompiled engine looks like."""

    def __init__(self, inner, shift: float):
        self.inner, self.shift, self.name = inner, shift, "skewed"

    def embed(self, ids):
        return self.inner.embed(ids)

    def new_cache(self):
        return self.inner.new_cache()

    def forward(self, embeds, positions, cache):
        logits, cache = self.inner.forward(embeds, positions, cache)
        logits = logits.copy()
        logits[::7] += self.shift * np.abs(logits).max()
        return logits, cache


def test_golden_check_catches_a_wrong_engine(tiny_checkpoints, build_package):
    model = edge_sdk.load(build_package(tiny_checkpoints["text"], "int4", block_size=32), accuracy_level=0)
    golden = model.manifest.extra["golden"]
    assert check_golden(_Skewed(model.backend, 1e-4), golden).ok  # well inside the tolerance
    report = check_golden(_Skewed(model.backend, 0.05), golden)
    assert not report.ok and "golden check FAILED: prompt 0 step 0" in report.summary()


def test_golden_check_catches_corrupted_weights(tmp_path, tiny_checkpoints, build_package):
    """Bytes flipped in the weights file (a bad copy, a miscompiled constant): the engine loads and
    runs, and only the golden check notices."""
    pkg = tmp_path / "pkg"
    shutil.copytree(build_package(tiny_checkpoints["text"], "int4", block_size=32), pkg)
    data = bytearray((pkg / "decoder.onnx.data").read_bytes())
    data[4096:4096 + 2048] = bytes(b ^ 0x5A for b in data[4096:4096 + 2048])
    (pkg / "decoder.onnx.data").write_bytes(bytes(data))
    model = edge_sdk.load(pkg, verify=False, accuracy_level=0)
    report = check_golden(model.backend, model.manifest.extra["golden"])
    assert not report.ok and report.worst_error > 1


def test_verify_run_command(tmp_path, tiny_checkpoints, build_package, capsys):
    pkg = tmp_path / "pkg"
    shutil.copytree(build_package(tiny_checkpoints["text"], "int4", block_size=32), pkg)
    assert main(["verify", str(pkg), "--run"]) == 0
    assert "golden check passed" in capsys.readouterr().out
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["extra"]["golden"]["records"][1]["top"][2][0][1] += 1.0  # a recorded logit that no engine gives
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(pkg), "--run"]) == 1
    assert "golden check FAILED: prompt 1 step 2" in capsys.readouterr().out
