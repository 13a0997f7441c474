"""`edge-sdk compile`'s decisions, with TensorRT's builder and the GPU run stood in for: which
graphs it compiles, that a plan with an unchanged key is not rebuilt, that an engine failing the
golden check is never activated, and that the standard graph serves when the plugins cannot be
built. (The builder and the plans themselves need a Jetson; the plugin library's build is real
where nvcc and TensorRT headers are present, see test_plugins_build.py.)"""

from __future__ import annotations

import shutil

import pytest

from edge_sdk import compile as trt_compile
from edge_sdk.golden import GoldenReport
from edge_sdk.package import load_manifest
from edge_sdk.plugins.library import PluginBuildError
from edge_sdk.runtime import gpu_probe
from edge_sdk.runtime.gpu_probe import GpuStatus

ORIN = GpuStatus(True, "ok", tensorrt_version="10.3.0", device_name="Orin (fake)", sm=87)
REAL_PLUGIN_LIBRARY = trt_compile._plugin_library


@pytest.fixture
def orin_package(tmp_path, tiny_checkpoints, build_package, monkeypatch):
    """A copy of an Orin package, a GPU that answers, and a builder that writes a stand-in plan."""
    pkg = tmp_path / "pkg"
    shutil.copytree(build_package(tiny_checkpoints["text"], "int4", device="orin-nano-8gb", block_size=32), pkg)
    monkeypatch.setattr(gpu_probe, "_cached", ORIN)
    built = []

    def fake_build(onnx_path, plan_path, *args, plugin_library=None, dims=None, **kwargs):
        built.append((onnx_path.name, plugin_library is not None, len(dims)))
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_bytes(b"plan of " + onnx_path.name.encode())
        return plan_path

    monkeypatch.setattr(trt_compile, "build_engine", fake_build)
    monkeypatch.setattr(trt_compile, "_plugin_library", lambda pkg_dir, status, strict: _fake_library(pkg_dir))
    return pkg, built


def _fake_library(pkg_dir):
    lib = pkg_dir / "trt" / "plugins" / "key" / "libedge_sdk_plugins.so"
    lib.parent.mkdir(parents=True, exist_ok=True)
    lib.write_bytes(b"")
    return lib


def _golden(results: dict[str, bool]):
    def check(pkg_dir, manifest, plan, plugin_lib):
        ok = results[plan]
        return GoldenReport(ok=ok, worst_error=0.1 if ok else 9.0,
                            mismatches=[] if ok else [{"prompt": 0, "step": 0, "why": "top logits off by 9.0x"}])
    return check


def test_compiles_plugin_and_standard_decoders_with_two_profiles_and_skips_unchanged(orin_package, monkeypatch):
    pkg, built = orin_package
    monkeypatch.setattr(trt_compile, "_golden_check", _golden({"trt/decoder_plugins.plan": True,
                                                                 "trt/decoder.plan": True}))
    engines = trt_compile.compile_package(pkg)
    assert engines == {"decoder_plugins": "trt/decoder_plugins.plan", "decoder": "trt/decoder.plan"}
    assert ("decoder.plugins.onnx", True, 2) in built and ("decoder.onnx", False, 2) in built
    manifest = load_manifest(pkg, verify=False)
    assert manifest.extra["plugin_library"] == "trt/plugins/key/libedge_sdk_plugins.so"
    assert set(manifest.extra["engine_keys"]) == {"decoder_plugins", "decoder"}
    assert all("passed" in s for s in manifest.extra["golden_checks"].values())
    built.clear()
    trt_compile.compile_package(pkg)  # nothing changed: nothing rebuilt
    assert built == []


def test_an_engine_failing_the_golden_check_is_not_activated(orin_package, monkeypatch, caplog):
    pkg, _ = orin_package
    monkeypatch.setattr(trt_compile, "_golden_check", _golden({"trt/decoder_plugins.plan": False,
                                                                 "trt/decoder.plan": True}))
    engines = trt_compile.compile_package(pkg)
    assert "decoder_plugins" not in engines and engines["decoder"] == "trt/decoder.plan"
    assert not (pkg / "trt" / "decoder_plugins.plan").exists()
    assert "golden check FAILED" in caplog.text and "not activated" in caplog.text


def test_no_decoder_passing_the_golden_check_is_an_error(orin_package, monkeypatch):
    pkg, _ = orin_package
    monkeypatch.setattr(trt_compile, "_golden_check", _golden({"trt/decoder_plugins.plan": False,
                                                                 "trt/decoder.plan": False}))
    with pytest.raises(trt_compile.BuildError, match="no TensorRT decoder engine passed the golden check"):
        trt_compile.compile_package(pkg)
    assert load_manifest(pkg, verify=False).engines == {}


def test_without_plugins_the_standard_graph_serves(orin_package, monkeypatch, caplog):
    pkg, built = orin_package

    def failing_build(*args, **kwargs):
        raise PluginBuildError("CUDA toolkit not found (test)")

    monkeypatch.setattr("edge_sdk.plugins.library.build_library", failing_build)
    monkeypatch.setattr(trt_compile, "_plugin_library", REAL_PLUGIN_LIBRARY)
    monkeypatch.setattr(trt_compile, "_golden_check", _golden({"trt/decoder.plan": True}))
    engines = trt_compile.compile_package(pkg)
    assert "decoder_plugins" not in engines and "decoder" in engines
    assert "TensorRT plugins unavailable (CUDA toolkit not found (test))" in caplog.text
    assert [b for b in built if b[0] == "decoder.plugins.onnx"] == []



def test_the_plugin_engine_key_covers_the_weights_it_reads(orin_package):
    """decoder.plugins.onnx has no weights file of its own: it reads decoder.onnx.data."""
    pkg, _ = orin_package
    manifest = load_manifest(pkg, verify=False)
    before = trt_compile.engine_key(pkg, manifest.graphs["decoder_plugins"].file, ORIN, {}, "src")
    data = pkg / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    assert trt_compile.engine_key(pkg, manifest.graphs["decoder_plugins"].file, ORIN, {}, "src") != before
