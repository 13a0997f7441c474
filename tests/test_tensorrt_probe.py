"""GPU probe and the TensorRT backend's behaviour on a host without a usable GPU.

Nothing here needs a GPU: the probe is driven through fakes of libcuda and tensorrt, and the
backend must fail cleanly (BackendUnavailable with the probe's reason) without importing
tensorrt or pycuda.
"""

import subprocess
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_sdk import compile as trt_compile
from edge_sdk.runtime import gpu_probe
from edge_sdk.runtime import tensorrt as trt_backend
from edge_sdk.runtime.types import BackendUnavailable
from edge_sdk.runtime.gpu_probe import GpuStatus, probe_gpu

UNAVAILABLE = GpuStatus(False, "no NVIDIA GPU driver: test says so")


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    """Each test probes afresh; the cached result is restored afterwards."""
    monkeypatch.setattr(gpu_probe, "_cached", None)
    monkeypatch.delenv("EDGE_SDK_DISABLE_GPU", raising=False)


def test_importing_the_backend_imports_neither_tensorrt_nor_pycuda():
    code = ("import sys, edge_sdk.runtime.tensorrt, edge_sdk.runtime.gpu_probe, edge_sdk.compile\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'tensorrt_lean', 'pycuda')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_probe_here_never_raises_and_says_why():
    status = probe_gpu(refresh=True)
    assert isinstance(status, GpuStatus) and status.reason
    if not status.available:  # this CI host: no driver
        assert status.tensorrt_version is None or "pycuda" in status.reason
    assert probe_gpu() is status  # cached


def test_probe_without_device_nodes(monkeypatch):
    monkeypatch.setattr(gpu_probe, "_device_nodes", lambda: [])
    status = probe_gpu(refresh=True)
    assert not status.available and "no device nodes" in status.reason


def test_probe_without_libcuda(monkeypatch):
    monkeypatch.setattr(gpu_probe, "_device_nodes", lambda: ["/dev/nvidia0"])
    monkeypatch.setattr(gpu_probe, "_LIBCUDA_NAMES", ("libcuda-does-not-exist.so.1",))
    status = probe_gpu(refresh=True)
    assert not status.available and "libcuda.so.1 cannot be loaded" in status.reason


def test_probe_disabled_by_env(monkeypatch):
    monkeypatch.setenv("EDGE_SDK_DISABLE_GPU", "1")
    assert probe_gpu(refresh=True).reason == "GPU disabled by EDGE_SDK_DISABLE_GPU"


def test_probe_swallows_unexpected_errors(monkeypatch):
    def boom():
        raise RuntimeError("weird driver")
    monkeypatch.setattr(gpu_probe, "_probe", boom)
    status = probe_gpu(refresh=True)
    assert not status.available and status.reason == "GPU probe failed: RuntimeError: weird driver"


class FakeCuda:
    """Stands in for ctypes.CDLL('libcuda.so.1'): fills the out-pointers like the driver API does."""

    def __init__(self, init_rc=0, name=b"Orin", cc=(8, 7)):
        self.init_rc, self.name, self.cc = init_rc, name, cc

    def cuInit(self, flags):
        return self.init_rc

    def cuGetErrorName(self, code, out):
        return 1  # unknown: the probe falls back to the number

    def cuDriverGetVersion(self, out):
        out._obj.value = 12060
        return 0

    def cuDeviceGetCount(self, out):
        out._obj.value = 1
        return 0

    def cuDeviceGet(self, out, ordinal):
        out._obj.value = 0
        return 0

    def cuDeviceGetName(self, buf, length, dev):
        buf.value = self.name
        return 0

    def cuDeviceGetAttribute(self, out, attr, dev):
        out._obj.value = self.cc[0] if attr.value == 75 else self.cc[1]
        return 0

    def cuDeviceTotalMem_v2(self, out, dev):
        out._obj.value = 8 * 10**9
        return 0


def fake_driver(monkeypatch, cuda):
    monkeypatch.setattr(gpu_probe, "_device_nodes", lambda: ["/dev/nvhost-ctrl-gpu"])
    monkeypatch.setattr(gpu_probe, "_load_libcuda", lambda: (cuda, ""))


def test_probe_cuinit_failure(monkeypatch):
    fake_driver(monkeypatch, FakeCuda(init_rc=100))
    status = probe_gpu(refresh=True)
    assert not status.available
    assert status.reason == "NVIDIA driver present but unusable: cuInit failed with CUresult 100"


def test_probe_driver_ok_but_no_tensorrt(monkeypatch):
    fake_driver(monkeypatch, FakeCuda())
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    status = probe_gpu(refresh=True)
    assert not status.available
    assert status.device_name == "Orin" and status.sm == 87 and status.driver_version == "12.6"
    assert "GPU found (Orin, sm_87) but the tensorrt Python package cannot be imported" in status.reason


def test_probe_all_present(monkeypatch):
    fake_driver(monkeypatch, FakeCuda(name=b"NVIDIA Thor", cc=(11, 0)))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.3"))
    monkeypatch.setattr(gpu_probe.importlib.util, "find_spec", lambda name: None)
    status = probe_gpu(refresh=True)
    assert not status.available and "pycuda is not installed" in status.reason
    assert status.tensorrt_version == "10.13.3" and status.sm == 110

    monkeypatch.setattr(gpu_probe.importlib.util, "find_spec", lambda name: object())
    status = probe_gpu(refresh=True)
    assert status.available and status.total_memory_gb == 8.0
    assert status.reason == "NVIDIA Thor, sm_110, driver 12.6, TensorRT 10.13.3"


# -- the backend without a GPU -------------------------------------------------------------------

def write_decoder_like(path, with_external=True):
    """A graph with the decoder's input names and dim_params (not a real decoder)."""
    h, kv, hd = 8, 2, 4
    w = numpy_helper.from_array(np.arange(h * 5, dtype=np.float32).reshape(h, 5), "embed_tokens.weight")
    nodes = [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["inputs_embeds_out"], axis=0)]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT16, ["batch", "seq", h]),
         helper.make_tensor_value_info("past_key.0", TensorProto.FLOAT16, ["batch", kv, "past_seq", hd])],
        [helper.make_tensor_value_info("inputs_embeds_out", TensorProto.FLOAT, ["batch", "seq", 5])],
        initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    if with_external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data",
                        size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return w


def test_profile_shapes_from_dim_names(tmp_path):
    write_decoder_like(tmp_path / "d.onnx")
    shapes = trt_compile.profile_shapes(tmp_path / "d.onnx", trt_compile.decoder_dims(4096, max_prefill=256))
    assert shapes["inputs_embeds"] == ((1, 1, 8), (1, 1, 8), (1, 256, 8))
    assert shapes["past_key.0"] == ((1, 2, 0, 4), (1, 2, 2048, 4), (1, 2, 4096, 4))
    assert shapes["input_ids"] == ((1, 1), (1, 1), (1, 256))
    with pytest.raises(trt_compile.BuildError, match="'past_key.0' axis 2 is dynamic \\('past_seq'\\)"):
        trt_compile.profile_shapes(tmp_path / "d.onnx", {"batch": (1, 1, 1), "seq": (1, 1, 8)})


@pytest.mark.parametrize("external", [True, False])
def test_embedding_table_reads_external_rows_without_loading_them(tmp_path, external):
    from edge_sdk.runtime.embedding import EmbeddingTable, FileRows

    w = write_decoder_like(tmp_path / "embed.onnx", with_external=external)
    table = EmbeddingTable.open(tmp_path / "embed.onnx")
    np.testing.assert_array_equal(table.lookup(np.arange(8)), numpy_helper.to_array(w))
    if external:
        assert isinstance(table.table, FileRows)


def test_backend_raises_backend_unavailable_with_probe_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_probe, "_cached", UNAVAILABLE)
    with pytest.raises(BackendUnavailable) as exc:
        trt_backend.TensorRTDecoder(tmp_path, manifest=None)
    assert str(exc.value) == "TensorRT backend unavailable: no NVIDIA GPU driver: test says so"
    with pytest.raises(BackendUnavailable, match="test says so"):
        trt_backend.TensorRTDecoder.from_plans(tmp_path / "decoder.plan")
    write_decoder_like(tmp_path / "d.onnx")
    with pytest.raises(BackendUnavailable, match="test says so"):
        trt_compile.build_engine(tmp_path / "d.onnx", tmp_path / "d.plan", "orin-nano-8gb")
    assert not any(m.split(".")[0] in ("tensorrt", "pycuda") for m in sys.modules if sys.modules[m] is not None)


def test_backend_here_fails_cleanly(tmp_path):
    status = probe_gpu(refresh=True)
    if status.available:
        pytest.skip("a usable GPU is present")
    with pytest.raises(BackendUnavailable) as exc:
        trt_backend.TensorRTDecoder(tmp_path)
    assert status.reason in str(exc.value)


def test_build_engine_refuses_fp8_on_orin_before_touching_the_gpu(tmp_path):
    from edge_sdk.devices import DeviceError

    write_decoder_like(tmp_path / "d.onnx")
    with pytest.raises(DeviceError, match=r"orin-nx-16gb \(sm_87\) has no FP8 support"):
        trt_compile.build_engine(tmp_path / "d.onnx", tmp_path / "d.plan", "orin-nx-16gb", fp8=True)
    with pytest.raises(DeviceError, match="cpu runs onnxruntime"):
        trt_compile.build_engine(tmp_path / "d.onnx", tmp_path / "d.plan", "cpu")


def test_compile_package_without_gpu(monkeypatch, tmp_path, caplog):
    from edge_sdk.models.config import ModelConfig, TextConfig
    from edge_sdk.package import Manifest, graph_entry, load_manifest, write_manifest

    monkeypatch.setattr(gpu_probe, "_cached", UNAVAILABLE)
    write_decoder_like(tmp_path / "decoder.onnx")
    text = TextConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4,
                      vocab_size=5)
    write_manifest(tmp_path, Manifest(model_name="t", model=ModelConfig(architecture="Ministral3ForCausalLM",
                                                                        text=text),
                                      device="orin-nano-8gb", context_length=64,
                                      graphs={"decoder": graph_entry(tmp_path, "decoder.onnx")}))
    assert trt_compile.compile_package(tmp_path) == {}
    assert "TensorRT engines not built (no NVIDIA GPU driver: test says so)" in caplog.text
    assert load_manifest(tmp_path).engines == {}
    with pytest.raises(BackendUnavailable, match="cannot compile TensorRT engines: no NVIDIA GPU driver"):
        trt_compile.compile_package(tmp_path, strict=True)
