"""Device profiles and the build-time checks they drive (FP8 on Orin, memory fit)."""

import json
import re

import pytest

from edge_sdk.devices import (
    DeviceError,
    DeviceProfile,
    check_build,
    estimate_memory,
    list_profiles,
    load_profile,
    profile_dirs,
)
from edge_sdk.models.config import ModelConfig, TextConfig, VisionConfig

PROFILES = ["agx-orin-64gb", "agx-thor", "cpu", "orin-nano-8gb", "orin-nx-16gb"]
ORINS = ["orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb"]


def ministral(size: str, vision: bool = True) -> ModelConfig:
    """Published Ministral 3 shapes (MINISTRAL3.md section 1)."""
    hidden, inter, layers, tie = {"3B": (3072, 9216, 26, True), "8B": (4096, 14336, 34, False),
                                  "14B": (5120, 16384, 40, False)}[size]
    text = TextConfig(hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=32, num_kv_heads=8,
                      head_dim=128, vocab_size=131072, tie_word_embeddings=tie)
    return ModelConfig(architecture="Mistral3ForConditionalGeneration", text=text,
                       vision=VisionConfig() if vision else None)


def test_parameter_counts_match_published():
    assert ministral("3B").text.parameter_count() == 3_429_006_336
    assert ministral("8B").text.parameter_count() == 8_489_553_920
    assert ministral("14B").text.parameter_count() == 13_506_073_600


def test_all_profiles_load_and_validate():
    assert set(PROFILES) <= set(list_profiles())
    for name in PROFILES:
        p = load_profile(name)
        assert isinstance(p, DeviceProfile)
        assert p.name == name
        assert 0 < p.usable_memory_fraction <= 1 and p.memory_gb > 0 and p.memory_bandwidth_gbs > 0
        assert p.max_context > 0 and p.max_image_size > 0
        if p.backend == "tensorrt":
            assert p.sm is not None and p.compute_dtype == "float16" and p.tensorrt_version
        else:
            assert p.compute_dtype == "float32"


def test_profile_facts():
    for name in ORINS:
        p = load_profile(name)
        assert p.sm == 87 and not p.supports("fp8") and p.supports("int4")
        assert p.tensorrt_version == "10.3"
    thor = load_profile("agx-thor")
    assert thor.sm == 110 and thor.supports("fp8") and thor.supports("fp4")
    assert tuple(int(x) for x in thor.tensorrt_version.split(".")) >= (10, 13)
    sizes = {n: load_profile(n).max_image_size for n in PROFILES}
    assert sizes == {"orin-nano-8gb": 448, "orin-nx-16gb": 672, "agx-orin-64gb": 1024, "agx-thor": 1540,
                     "cpu": 1540}
    assert load_profile("cpu").backend == "onnxruntime"


def test_profile_files_are_named_after_their_profile():
    repo_dir = [d for d in profile_dirs() if d.name == "profiles"][0]
    for path in repo_dir.glob("*.json"):
        assert json.loads(path.read_text())["name"] == path.stem


@pytest.mark.parametrize("name", ORINS)
def test_fp8_on_orin_is_refused(name):
    with pytest.raises(DeviceError) as exc:
        check_build(load_profile(name), "fp8", ministral("3B"), 1024)
    msg = str(exc.value)
    assert msg == f"{name} (sm_87) has no FP8 tensor cores; use --quant int4"
    assert "\n" not in msg


def test_fp8_on_thor_is_accepted():
    est = check_build(load_profile("agx-thor"), "fp8", ministral("8B"), 8192)
    assert est.fits and est.quant == "fp8"


def test_8b_unquantized_refused_on_orin_nano_with_numbers():
    with pytest.raises(DeviceError) as exc:
        check_build(load_profile("orin-nano-8gb"), "none", ministral("8B"), 4096)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "--quant none" in msg and "orin-nano-8gb" in msg
    needed = float(re.search(r"needs ~([\d.]+) GB", msg).group(1))
    assert 17 < needed < 20  # ~8.9B params (with vision) x 2 bytes + KV
    assert re.search(r"weights [\d.]+ GB \+ KV cache [\d.]+ GB for 4096 tokens", msg)
    assert "allows 4.8 GB of its 8 GB" in msg


def test_int4_3b_fits_on_orin_nano():
    p = load_profile("orin-nano-8gb")
    est = check_build(p, "int4", ministral("3B"))  # default context = profile max_context
    assert est.fits and est.context_len == p.max_context
    assert est.total_bytes < p.usable_memory_gb * 1e9
    # unquantized 3B does not fit and the message suggests int4
    with pytest.raises(DeviceError, match=r"--quant int4 would fit"):
        check_build(p, "none", ministral("3B"))


def test_memory_estimate_arithmetic():
    cfg = ministral("8B", vision=False)
    gpu, cpu = load_profile("agx-orin-64gb"), load_profile("cpu")
    params = cfg.text.parameter_count()
    none_gpu = estimate_memory(gpu, "none", cfg, 1000)
    assert none_gpu.weight_bytes == pytest.approx(2 * params, rel=1e-6)
    assert estimate_memory(cpu, "none", cfg, 1000).weight_bytes == pytest.approx(4 * params, rel=1e-6)
    # KV: 2 x 34 layers x 8 kv heads x 128 x 2 bytes x 1000 tokens
    assert none_gpu.kv_bytes == 2 * 34 * 8 * 128 * 2 * 1000
    int4 = estimate_memory(gpu, "int4", cfg, 1000, int4_block_size=128)
    embed_head = 2 * 131072 * 4096
    assert int4.weight_bytes > 2 * embed_head  # 16-bit embeddings and head dominate a lot
    assert int4.weight_bytes < none_gpu.weight_bytes / 2.5
    assert estimate_memory(gpu, "none", ministral("8B"), 1000).weight_bytes > none_gpu.weight_bytes  # vision


def test_bad_requests():
    p = load_profile("agx-thor")
    with pytest.raises(DeviceError, match="unknown --quant 'int8'"):
        check_build(p, "int8", ministral("3B"), 100)
    with pytest.raises(DeviceError, match="exceeds the model's max_position_embeddings"):
        check_build(p, "none", ministral("3B"), 10**7)
    with pytest.raises(DeviceError) as exc:
        load_profile("orin-nano")
    assert "unknown device profile 'orin-nano'" in str(exc.value)
    for name in PROFILES:
        assert name in str(exc.value)


def test_profile_from_path_and_env(tmp_path, monkeypatch):
    data = json.loads(load_profile("orin-nx-16gb").model_dump_json())
    data["name"] = "my-board"
    (tmp_path / "my-board.json").write_text(json.dumps(data))
    assert load_profile(tmp_path / "my-board.json").name == "my-board"
    monkeypatch.setenv("EDGE_SDK_PROFILES", str(tmp_path))
    assert "my-board" in list_profiles() and load_profile("my-board").sm == 87

    bad = dict(data, backend="vulkan")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DeviceError) as exc:
        load_profile("bad")
    assert str(exc.value).startswith(str(tmp_path / "bad.json")) and "backend" in str(exc.value)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DeviceError, match="cannot read device profile"):
        load_profile("broken")
