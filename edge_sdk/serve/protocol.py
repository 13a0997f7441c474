"""The payload contract of the MQTT interface, as pydantic models (one source for validation,
the SDK's types and the published JSON Schemas). Topic layout and rules: PROTOCOL.md next to
this file.

Requests are strict: unknown fields and wrong JSON types are refused with a 400 error reply,
never coerced. Events the daemon sends are described here too (the SDK parses them leniently
so that a newer daemon adding optional fields does not break an older SDK).
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_sdk.mqtt_common import SCHEMA_VERSION

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
RequestId = Annotated[str, Field(pattern=ID_PATTERN, description="Caller-chosen id, unique per client name.")]

# --- error codes ----------------------------------------------------------------------------------

#: code -> HTTP-like status. The SDK maps status classes to exceptions.
ERROR_STATUS: dict[str, int] = {
    "invalid_json": 400,
    "invalid_request": 400,
    "invalid_reply_topic": 400,
    "generation_error": 400,
    "unknown_op": 404,
    "payload_too_large": 413,
    "unsupported_media": 415,
    "busy": 429,
    "internal": 500,
    "stopping": 503,
}
ErrorCode = Literal["invalid_json", "invalid_request", "invalid_reply_topic", "generation_error",
                    "unknown_op", "payload_too_large", "unsupported_media", "busy", "internal",
                    "stopping"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Event(BaseModel):
    # Events: the daemon writes them, so they are exact; readers should ignore unknown fields.
    model_config = ConfigDict(extra="allow")


# --- requests -------------------------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(max_length=1_000_000)


class ImagePart(_Strict):
    """An image in a message. Name a camera the daemon owns (preferred: pixels stay on the device)
    or inline base64 bytes (up to the payload limit). Needs a model with the 'image' modality."""

    type: Literal["image"]
    camera: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    data: str | None = Field(default=None, description="base64-encoded image file (JPEG/PNG)")
    mime: str | None = Field(default=None, pattern=r"^image/[a-z0-9.+-]{1,32}$")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.camera is None) == (self.data is None):
            raise ValueError("an image part names exactly one of 'camera' or 'data'")
        if self.data is not None:
            try:
                base64.b64decode(self.data, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"image data is not valid base64: {e}") from None
        return self


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ChatRequest(_Strict):
    """Payload on ``R/req/C/chat``. Give exactly one of ``messages`` or ``prompt``."""

    v: Literal[1] = 1
    request_id: RequestId | None = Field(
        default=None, description="Required unless the MQTT 5 Correlation Data carries it.")
    reply_to: str | None = Field(
        default=None, max_length=512,
        description="Reply topic for MQTT 3.1.1 clients; must lie in the sender's inbox P/v1/clients/C/.")
    messages: list[Message] | None = Field(default=None, min_length=1)
    prompt: str | list[Annotated[int, Field(ge=0)]] | None = None
    max_tokens: int | None = Field(default=None, ge=1, description="Default and cap: see capabilities.limits.")
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default_factory=list, max_length=16)
    stream: bool = Field(default=True, description="Send 'delta' events; the final 'result' always has the whole text.")
    priority: int = Field(default=5, ge=0, le=9, description="Higher runs first; FIFO within a priority.")
    deadline_ms: int | None = Field(
        default=None, ge=1, le=86_400_000,
        description="Milliseconds from arrival at the daemon; the generation stops there (finish_reason 'deadline').")

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        return self


class CancelRequest(_Strict):
    """Payload on ``R/req/C/cancel``: one request of C's, or all of them (optionally only those
    replying to ``reply_to``; the SDK's Last Will uses this)."""

    v: Literal[1] = 1
    request_id: RequestId | None = None
    all: bool = False
    reply_to: str | None = Field(default=None, max_length=512)

    @model_validator(mode="after")
    def _what(self):
        if (self.request_id is None) == (not self.all):
            raise ValueError("give either 'request_id' or 'all': true")
        return self


# --- events on the reply topic ----------------------------------------------------------------------


class Accepted(_Event):
    v: Literal[1] = 1
    type: Literal["accepted"] = "accepted"
    request_id: str
    seq: int = 0
    queue_position: int = Field(description="0 = runs next")


class Delta(_Event):
    v: Literal[1] = 1
    type: Literal["delta"] = "delta"
    request_id: str
    seq: int
    text: str
    tokens: list[int]


class Usage(_Event):
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float | None = Field(description="Arrival at the daemon -> first token (includes queue_ms)")
    tokens_per_s: float = Field(description="Decode speed after the first token")
    queue_ms: float
    total_ms: float = Field(description="Arrival at the daemon -> result")


FinishReason = Literal["stop", "length", "cancelled", "deadline"]


class Result(_Event):
    """The one terminal event of a served request: the whole text, even when deltas were lost."""

    v: Literal[1] = 1
    type: Literal["result"] = "result"
    request_id: str
    seq: int
    text: str
    tokens: list[int]
    finish_reason: FinishReason
    usage: Usage


class Error(_Event):
    """The terminal event of a refused or failed request."""

    v: Literal[1] = 1
    type: Literal["error"] = "error"
    request_id: str | None
    seq: int
    status: int
    code: ErrorCode
    message: str
    retry_after_ms: int | None = None
    details: list[dict[str, Any]] | None = None


Event = Annotated[Union[Accepted, Delta, Result, Error], Field(discriminator="type")]


# --- retained device topics -------------------------------------------------------------------------


class ModelInfo(_Event):
    name: str
    context_length: int | None = None
    modalities: list[str] = ["text"]


class Limits(_Event):
    max_tokens: int
    default_max_tokens: int
    queue_length: int
    max_pending_per_client: int
    max_payload_bytes: int
    max_messages: int


class Capabilities(_Event):
    v: Literal[1] = 1
    schema_version: str = SCHEMA_VERSION
    device_id: str
    daemon_version: str
    model: ModelInfo
    ops: list[str] = ["chat", "cancel"]
    limits: Limits
    topics: dict[str, str] = Field(description="Topic templates; {client} is the requester's client name")
    started_at: float = Field(description="Unix time the daemon started")


class Health(_Event):
    v: Literal[1] = 1
    ts: float
    state: Literal["idle", "busy", "stopping"]
    queue_depth: int
    in_flight: int
    completed: int
    failed: int
    cancelled: int
    rejected_busy: int
    dropped_messages: int
    generated_tokens: int
    tokens_per_s: float = Field(description="Decode speed of the last finished request")
    memory_rss_bytes: int | None
    uptime_s: float


STATUS_VALUES = ("online", "stopping", "offline")

# --- JSON Schemas -----------------------------------------------------------------------------------

SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "chat_request": ChatRequest,
    "cancel_request": CancelRequest,
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
