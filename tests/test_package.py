"""Engine package manifest: round trip, hashes, and one-line errors."""

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.models.config import ModelConfig, TextConfig
from edge_sdk.package import (
    FORMAT_VERSION,
    Manifest,
    PackageError,
    graph_entry,
    graph_io,
    load_manifest,
    verify_package,
    write_manifest,
)


def tiny_config() -> ModelConfig:
    text = TextConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      vocab_size=4096, tie_word_embeddings=False)
    return ModelConfig(architecture="Ministral3ForCausalLM", text=text)


def write_graph(path):
    """inputs_embeds [batch, seq, 64] @ W (external data) -> logits [batch, seq, 32]."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["inputs_embeds", "W"], ["logits"])],
        "decoder",
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", 64]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 32])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data",
                    size_threshold=0)


@pytest.fixture
def pkg(tmp_path):
    d = tmp_path / "engines" / "x"
    (d / "plans").mkdir(parents=True)
    write_graph(d / "decoder.onnx")
    (d / "plans" / "decoder.plan").write_bytes(b"\x00plan" * 1000)
    (d / "tekken.json").write_text('{"config": {}}')
    manifest = Manifest(model_name="tiny", model=tiny_config(), quant={"method": "int4", "block_size": 32},
                        device="orin-nano-8gb", graphs={"decoder": graph_entry(d, "decoder.onnx")},
                        context_length=128, engines={"decoder": "plans/decoder.plan"}, tokenizer="tekken.json",
                        extra={"note": "test"})
    write_manifest(d, manifest)
    return d


def test_manifest_round_trip(pkg):
    m = load_manifest(pkg)
    assert m.format_version == FORMAT_VERSION == 1
    assert sorted(m.files) == ["decoder.onnx", "decoder.onnx.data", "plans/decoder.plan", "tekken.json"]
    assert all(len(h) == 64 for h in m.files.values())
    assert m.model == tiny_config() and m.quant == {"method": "int4", "block_size": 32}
    assert m.device == "orin-nano-8gb" and m.engines == {"decoder": "plans/decoder.plan"} and m.context_length == 128
    assert m.created_at.tzinfo is not None and m.edge_sdk_version
    again = Manifest.model_validate_json((pkg / "manifest.json").read_text())
    assert again == m
    dec = m.graphs["decoder"]
    assert dec.file == "decoder.onnx"
    assert [(t.name, t.dtype, t.shape) for t in dec.inputs] == [
        ("inputs_embeds", "float32", ["batch", "seq", 64]), ("position_ids", "int64", ["batch", "seq"])]
    assert [(t.name, t.shape) for t in dec.outputs] == [("logits", ["batch", "seq", 32])]
    assert verify_package(pkg) == sorted(m.files)


def test_graph_io_skips_external_data(pkg):
    (pkg / "decoder.onnx.data").unlink()  # never read
    inputs, outputs = graph_io(pkg / "decoder.onnx")
    assert [t.name for t in inputs] == ["inputs_embeds", "position_ids"]  # initializer W not listed
    assert outputs[0].dtype == "float32"
    with pytest.raises(PackageError, match="cannot read ONNX graph"):
        graph_io(pkg / "tekken.json")


def test_tampered_byte_gives_one_line_sha_error(pkg):
    data = bytearray((pkg / "decoder.onnx.data").read_bytes())
    data[100] ^= 0x01
    (pkg / "decoder.onnx.data").write_bytes(bytes(data))
    with pytest.raises(PackageError) as exc:
        load_manifest(pkg)
    assert str(exc.value) == f"{pkg}/decoder.onnx.data: sha256 mismatch (file changed after build)"
    with pytest.raises(PackageError, match="sha256 mismatch"):
        verify_package(pkg)
    assert load_manifest(pkg, verify=False).model_name == "tiny"  # verify=False does not hash


def test_missing_file(pkg):
    (pkg / "plans" / "decoder.plan").unlink()
    with pytest.raises(PackageError) as exc:
        load_manifest(pkg)
    assert str(exc.value) == f"{pkg}/plans/decoder.plan: listed in manifest.json but missing"


def edit_manifest(pkg, **changes):
    data = json.loads((pkg / "manifest.json").read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    (pkg / "manifest.json").write_text(json.dumps(data))


def test_bad_format_version(pkg):
    edit_manifest(pkg, format_version=2)
    with pytest.raises(PackageError) as exc:
        load_manifest(pkg)
    msg = str(exc.value)
    assert msg.startswith(f"{pkg}/manifest.json: format_version 2 is not supported")
    assert "reads format_version 1" in msg and "\n" not in msg
    edit_manifest(pkg, format_version=None)
    with pytest.raises(PackageError, match="has no format_version"):
        load_manifest(pkg)


def test_missing_and_invalid_manifest(pkg, tmp_path):
    with pytest.raises(PackageError, match=r"manifest.json: missing"):
        load_manifest(tmp_path)
    with pytest.raises(PackageError, match="not a directory"):
        load_manifest(tmp_path / "nope")
    (pkg / "manifest.json").write_text('{"format_version": 1,')
    with pytest.raises(PackageError) as exc:
        load_manifest(pkg)
    assert "manifest.json: invalid JSON (line 1" in str(exc.value)


def test_schema_errors_are_one_line(pkg):
    edit_manifest(pkg, model=None, graphs={"decoder": {"inputs": []}})
    with pytest.raises(PackageError) as exc:
        load_manifest(pkg)
    msg = str(exc.value)
    assert msg.startswith(f"{pkg}/manifest.json: invalid manifest (") and "\n" not in msg
    assert "model" in msg and "graphs.decoder.file" in msg


def test_paths_must_stay_inside_the_package(pkg):
    data = json.loads((pkg / "manifest.json").read_text())
    data["files"]["../outside"] = "0" * 64
    (pkg / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match="not a relative path inside the package"):
        load_manifest(pkg)


def test_referenced_file_must_be_listed(pkg):
    edit_manifest(pkg, engines={"decoder": "plans/other.plan"})
    with pytest.raises(PackageError, match="plans/other.plan: referenced by the manifest but not listed"):
        load_manifest(pkg)


def test_unlisted_extra_file_is_fine_but_logged(pkg, caplog):
    (pkg / "bench.log").write_text("42 tok/s")
    with caplog.at_level(logging.INFO, logger="edge_sdk.package"):
        m = load_manifest(pkg)
    assert "bench.log" not in m.files
    assert "bench.log" in caplog.text and "not listed" in caplog.text


def test_write_manifest_rehashes_and_checks_references(pkg):
    (pkg / "tekken.json").write_text('{"config": {"v": 2}}')
    m = write_manifest(pkg, load_manifest(pkg, verify=False))
    assert load_manifest(pkg) == m
    (pkg / "tekken.json").unlink()
    with pytest.raises(PackageError, match="tekken.json: referenced by the manifest but not in the package"):
        write_manifest(pkg, m)
