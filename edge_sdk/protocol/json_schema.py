"""The JSON Schemas of every payload, generated from the models (``edge-sdk schema``); the
committed copies in schemas/ beside this file are what firmware authors read."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from edge_sdk.protocol.models import (Accepted, AudioStreamRequest, CancelRequest, Capabilities, ChatRequest, Delta, Error, Health,
                                      ListenCancelRequest, ListenEnd, ListenError, ListenRegistered, ListenRequest,
                                      ListenTranscript, ListenVoice, Result, Snapshot, SnapshotRequest, StreamEvent,
                                      TranscribeRequest, WatchCancelRequest, WatchEnd, WatchError, WatchEvent,
                                      WatchRegistered, WatchRequest)
from edge_sdk.protocol.topics import SCHEMA_VERSION

SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "chat_request": ChatRequest,
    "transcribe_request": TranscribeRequest,
    "audio_stream_request": AudioStreamRequest,
    "stream_event": StreamEvent,
    "cancel_request": CancelRequest,
    "watch_request": WatchRequest,
    "watch_cancel_request": WatchCancelRequest,
    "listen_request": ListenRequest,
    "listen_cancel_request": ListenCancelRequest,
    "snapshot_request": SnapshotRequest,
    "watch_registered": WatchRegistered,
    "snapshot": Snapshot,
    "watch_event": WatchEvent,
    "watch_error": WatchError,
    "watch_end": WatchEnd,
    "listen_registered": ListenRegistered,
    "listen_voice": ListenVoice,
    "listen_transcript": ListenTranscript,
    "listen_error": ListenError,
    "listen_end": ListenEnd,
    "accepted": Accepted,
    "delta": Delta,
    "result": Result,
    "error": Error,
    "capabilities": Capabilities,
    "health": Health,
}


def json_schemas() -> dict[str, dict]:
    """name -> JSON Schema (draft 2020-12) of every payload, with the schema version stamped in."""
    out = {}
    for name, model in SCHEMA_MODELS.items():
        s = model.model_json_schema()
        s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        s["$id"] = f"edge_sdk/v1/{name}.json"
        s["x-schema-version"] = SCHEMA_VERSION
        out[name] = s
    return out


def write_schemas(out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, s in json_schemas().items():
        p = out_dir / f"{name}.schema.json"
        p.write_text(json.dumps(s, indent=2, sort_keys=True) + "\n")
        paths.append(p)
    return paths


SCHEMA_DIR = Path(__file__).with_name("schemas")
