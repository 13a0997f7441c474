"""The engine package: one directory with `manifest.json`, the ONNX graphs, the TensorRT plans,
the tokenizer, and a sha256 of every file.

```
engines/<name>/
  manifest.json        Manifest (below); written last, by write_manifest
  decoder.onnx(.data)  embed.onnx  vision.onnx ...
  trt/<role>.plan      TensorRT engines for the package's device profile, built on the device by
                       `edge-sdk compile` (absent until then)
  tekken.json
```

`load_manifest` checks the format version and, with `verify=True`, every file's hash, and raises
`PackageError` with one line naming the file and the reason. Files present but not listed are
allowed (logged): a package can carry notes or benchmark logs without being rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_sdk import __version__
from edge_sdk.models.config import ModelConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


class PackageError(ValueError):
    """An engine package we cannot use; the one-line message names the file and the reason."""


class TensorSpec(BaseModel):
    """One graph input or output. Dynamic dimensions are strings (the ONNX dim_param, or "?")."""

    model_config = ConfigDict(frozen=True)

    name: str
    dtype: str
    shape: list[int | str]


class GraphEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    file: str
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)


def _check_relpath(path: str) -> str:
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path:
        raise ValueError(f"{path!r} is not a relative path inside the package")
    return path


class Manifest(BaseModel):
    """Everything the runtime needs to know about a package, and the hashes that prove it intact."""

    model_config = ConfigDict(frozen=True)

    format_version: int = FORMAT_VERSION
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    edge_sdk_version: str = __version__
    model_name: str
    model: ModelConfig
    # The quant recipe as the quant module serialises it ({"method": "none"} when unquantized).
    quant: dict[str, Any] = Field(default_factory=dict)
    device: str
    # Longest prompt + generation the package serves (the device profile's budget, capped by the model).
    context_length: int = Field(gt=0)
    graphs: dict[str, GraphEntry] = Field(default_factory=dict)
    engines: dict[str, str] = Field(default_factory=dict)
    tokenizer: str | None = None
    # What the package takes in: "text", plus "image" (vision.onnx) and/or "audio" (audio.onnx).
    modalities: list[str] = Field(default_factory=lambda: ["text"])
    # relative POSIX path -> sha256 hex, for every file in the package except manifest.json
    files: dict[str, str] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _files_ok(cls, v: dict[str, str]) -> dict[str, str]:
        for path, digest in v.items():
            _check_relpath(path)
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{path}: {digest!r} is not a sha256 hex digest")
        return v

    def referenced_files(self) -> list[str]:
        """Files the manifest points at (graphs, engines, tokenizer)."""
        refs = [g.file for g in self.graphs.values()] + list(self.engines.values())
        if self.tokenizer:
            refs.append(self.tokenizer)
        return refs


# -- hashing and writing ------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _package_files(pkg_dir: Path) -> list[str]:
    """Every regular file under pkg_dir as a relative POSIX path, manifest.json excluded."""
    out = []
    for root, dirs, files in os.walk(pkg_dir):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            rel = full.relative_to(pkg_dir).as_posix()
            if rel == MANIFEST_NAME or rel.startswith(MANIFEST_NAME + ".tmp") or not full.is_file():
                continue
            out.append(rel)
    return out


def write_manifest(pkg_dir: str | Path, manifest: Manifest) -> Manifest:
    """Hash every file in `pkg_dir` into `manifest.files` and write `manifest.json` atomically.

    Any `files` already in `manifest` are replaced. Returns the manifest as written.
    """
    pkg_dir = Path(pkg_dir)
    if not pkg_dir.is_dir():
        raise PackageError(f"{pkg_dir}: not a directory")
    files = {rel: sha256_file(pkg_dir / rel) for rel in _package_files(pkg_dir)}
    for ref in manifest.referenced_files():
        if ref not in files:
            raise PackageError(f"{pkg_dir / ref}: referenced by the manifest but not in the package")
    final = manifest.model_copy(update={"files": files})
    # Validate the final object once more (model_copy does not), so a bad path never gets written.
    final = Manifest.model_validate(final.model_dump())
    tmp = pkg_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(final.model_dump_json(indent=2) + "\n")
    os.replace(tmp, pkg_dir / MANIFEST_NAME)
    return final


# -- ONNX graph I/O -----------------------------------------------------------------------------

_ONNX_DTYPES = {
    "FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "DOUBLE": "float64",
    "INT64": "int64", "INT32": "int32", "INT16": "int16", "INT8": "int8", "UINT8": "uint8",
    "BOOL": "bool", "FLOAT8E4M3FN": "float8_e4m3fn", "INT4": "int4", "UINT4": "uint4",
}


def _value_info_spec(vi) -> TensorSpec:
    import onnx

    tt = vi.type.tensor_type
    name = onnx.TensorProto.DataType.Name(tt.elem_type)
    shape: list[int | str] = []
    if tt.HasField("shape"):
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            else:
                shape.append(d.dim_param or "?")
    return TensorSpec(name=vi.name, dtype=_ONNX_DTYPES.get(name, name.lower()), shape=shape)


def graph_io(onnx_path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph, read without loading external weight data."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, OSError
        raise PackageError(f"{onnx_path}: cannot read ONNX graph ({exc})") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [_value_info_spec(vi) for vi in model.graph.input if vi.name not in initializers]
    outputs = [_value_info_spec(vi) for vi in model.graph.output]
    return inputs, outputs


def graph_entry(pkg_dir: str | Path, file: str) -> GraphEntry:
    """A GraphEntry for `file` (relative to pkg_dir) with its inputs/outputs read from the graph."""
    inputs, outputs = graph_io(Path(pkg_dir) / file)
    return GraphEntry(file=file, inputs=inputs, outputs=outputs)


# -- loading and verifying ----------------------------------------------------------------------

def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def load_manifest(pkg_dir: str | Path, verify: bool = True) -> Manifest:
    """Read `pkg_dir/manifest.json`; with `verify`, check that every listed file exists and hashes right."""
    pkg_dir = Path(pkg_dir)
    path = pkg_dir / MANIFEST_NAME
    if not pkg_dir.is_dir():
        raise PackageError(f"{pkg_dir}: not a directory (expected an engine package)")
    if not path.is_file():
        raise PackageError(f"{path}: missing (not an engine package, or its build did not finish)")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise PackageError(f"{path}: invalid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise PackageError(f"{path}: invalid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise PackageError(f"{path}: invalid manifest (expected a JSON object, got {type(data).__name__})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        what = "has no format_version" if version is None else f"format_version {version!r} is not supported"
        raise PackageError(f"{path}: {what} (this edge_sdk {__version__} reads format_version {FORMAT_VERSION}; "
                           f"rebuild the package or upgrade edge_sdk)")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise PackageError(f"{path}: invalid manifest ({_one_line(exc)})") from None
    for ref in manifest.referenced_files():
        if ref not in manifest.files:
            raise PackageError(f"{pkg_dir / ref}: referenced by the manifest but not listed in its files")
    if verify:
        _verify_files(pkg_dir, manifest)
    return manifest


def _verify_files(pkg_dir: Path, manifest: Manifest) -> list[str]:
    for rel, digest in sorted(manifest.files.items()):
        full = pkg_dir / rel
        if not full.is_file():
            raise PackageError(f"{full}: listed in {MANIFEST_NAME} but missing")
        if sha256_file(full) != digest:
            raise PackageError(f"{full}: sha256 mismatch (file changed after build)")
    unlisted = sorted(set(_package_files(pkg_dir)) - set(manifest.files))
    if unlisted:
        log.info("%s: %d file(s) not listed in %s (ignored): %s", pkg_dir, len(unlisted), MANIFEST_NAME,
                 ", ".join(unlisted[:10]) + (" ..." if len(unlisted) > 10 else ""))
    return sorted(manifest.files)


def verify_package(pkg_dir: str | Path) -> list[str]:
    """`edge-sdk verify`: load the manifest, check every hash, return the checked relative paths."""
    pkg_dir = Path(pkg_dir)
    manifest = load_manifest(pkg_dir, verify=False)
    return _verify_files(pkg_dir, manifest)
