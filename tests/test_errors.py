"""Bad checkpoints, tampered packages and impossible builds give one clear line naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import edge_sdk
from edge_sdk.build import build
from edge_sdk.devices import DeviceError
from edge_sdk.models.checkpoint import open_checkpoint
from edge_sdk.models.config import CheckpointError
from edge_sdk.package import PackageError
from edge_sdk.quant import QuantRecipe
from layouts import to_shards


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_sdk.cli", *args], capture_output=True, text=True, timeout=120)


def test_tampered_engine_file_is_named(tiny_checkpoints, build_package, tmp_path):
    pkg = shutil.copytree(build_package(tiny_checkpoints["text"]), tmp_path / "pkg")
    data = pkg / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(PackageError, match=r"decoder\.onnx\.data: sha256 mismatch"):
        edge_sdk.load(pkg)
    out = cli("verify", str(pkg))
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert "decoder.onnx.data" in line and "sha256" in line


def test_missing_shard_is_named(tiny_checkpoints, tmp_path):
    sharded = to_shards(tiny_checkpoints["text"], tmp_path / "sharded")
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors.*missing"):
        open_checkpoint(sharded)
    out = cli("build", str(sharded), "--quant", "none", "-o", str(tmp_path / "out"))
    assert out.returncode == 2 and "model-00002-of-00003.safetensors" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unknown_architecture(tiny_checkpoints, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoints["text"], tmp_path / "gpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown architecture 'GPT2LMHeadModel'"):
        open_checkpoint(ckpt)


def test_truncated_weights_file(tiny_checkpoints, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoints["text"], tmp_path / "trunc")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        open_checkpoint(ckpt).get("lm_head.weight")


@pytest.mark.parametrize("device", ["orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb"])
def test_fp8_for_orin_is_refused_before_any_work(tiny_checkpoints, tmp_path, device):
    with pytest.raises(DeviceError, match=r"sm_87.*FP8"):
        build(tiny_checkpoints["text"], QuantRecipe(method="fp8"), device=device, out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    out = cli("build", str(tiny_checkpoints["text"]), "--quant", "fp8", "--device", device, "-o", str(tmp_path / "y"))
    assert out.returncode == 2 and "FP8" in out.stderr and len(out.stderr.strip().splitlines()) == 1
