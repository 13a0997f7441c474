"""The payloads of the MQTT interface as pydantic models: one source for the daemon's validation
and replies, the SDK's types and the published JSON Schemas. Topic layout and rules: PROTOCOL.md
beside this file.

Requests are strict: unknown fields and wrong JSON types are refused with a 400 error reply,
never coerced. Events the daemon sends are described here too (the SDK parses them leniently
so that a newer daemon adding optional fields does not break an older SDK).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_sdk.protocol.topics import SCHEMA_VERSION

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
    "invalid_image": 400,
    "invalid_audio": 400,
    "unsupported_media": 415,
    "busy": 429,
    "internal": 500,
    "stopping": 503,
    "camera_unavailable": 503,
    "microphone_unavailable": 503,
}
ErrorCode = Literal["invalid_json", "invalid_request", "invalid_reply_topic", "generation_error",
                    "unknown_op", "payload_too_large", "invalid_image", "invalid_audio", "unsupported_media", "busy",
                    "internal", "stopping", "camera_unavailable", "microphone_unavailable"]

CAMERA_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
#: Microphone names follow the camera names' rule: each is a topic level.
MICROPHONE_PATTERN = CAMERA_PATTERN
#: A package name in ``model`` fields (the daemon serves one or several; capabilities.models).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ModelName = Annotated[str | None, Field(default=None, pattern=MODEL_NAME_PATTERN,
                                         description="which of the device's models (capabilities.models[].name); "
                                                     "default: routed by what the request holds")]
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
#: The operations of ``R/req/C/<op>``.
OPS = ("chat", "transcribe", "audio_stream", "cancel", "watch", "watch_cancel", "listen", "listen_cancel", "snapshot")
#: Live audio streams take this format only: what firmware microphones deliver, no resampling.
STREAM_AUDIO_MIME = "audio/pcm;rate=16000"
#: Audio MIME types a request may carry: a file (WAV/FLAC/OGG) or raw PCM16 with its rate
#: (audio/L16: big-endian, RFC 2586; audio/pcm: little-endian).
AUDIO_MIME_PATTERN = r"^audio/[a-zA-Z0-9.+-]{1,32}(\s*;\s*[a-z]{1,16}\s*=\s*[A-Za-z0-9.-]{1,16}){0,4}$"
#: MQTT 5 user property that carries the JSON request of a binary (image or audio) request payload.
REQUEST_PROPERTY = "request"
#: ... or just the text prompt to ask about the image.
PROMPT_PROPERTY = "prompt"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Event(BaseModel):
    # Events: the daemon writes them, so they are exact; readers should ignore unknown fields.
    model_config = ConfigDict(extra="allow")


class _ReplyEvent(_Event):
    # The envelope of every event on a reply topic. Subclasses narrow ``type`` to a literal and may
    # redefine ``request_id``/``seq`` (a redefined field keeps its place, so the schemas keep
    # their field order).
    v: Literal[1] = 1
    type: str
    request_id: str
    seq: int


class _WatchJobEvent(_Event):
    # The envelope of every event on a watch job's events topic (as _ReplyEvent).
    v: Literal[1] = 1
    type: str
    job_id: str
    client: str
    camera: str
    seq: int
    ts: float


class _ListenJobEvent(_Event):
    # The envelope of every event on a listen job's events topic.
    v: Literal[1] = 1
    type: str
    job_id: str
    client: str
    microphone: str
    seq: int = Field(description="per job, from 0")
    ts: float = Field(description="Unix time of the event")


def _require_one(message: str, *given: bool) -> None:
    """A request rule: exactly one of the alternatives is given, else ``ValueError(message)``."""
    if sum(given) != 1:
        raise ValueError(message)


# --- requests -------------------------------------------------------------------------------------


def _check_base64(data: str | None, what: str) -> None:
    if data is not None:
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"{what} data is not valid base64: {e}") from None


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(max_length=1_000_000)


class ImagePart(_Strict):
    """An image in a message. Name a camera the daemon owns (preferred: pixels stay on the device,
    the newest frame is used), inline base64 bytes (up to ``max_image_bytes``), or ``payload: true``:
    the MQTT 5 binary payload of this request (the JSON request then travels in the user property
    ``request``). Needs a model with the 'image' modality."""

    type: Literal["image"]
    camera: str | None = Field(default=None, pattern=CAMERA_PATTERN)
    data: str | None = Field(default=None, description="base64-encoded image file (JPEG/PNG)")
    payload: Literal[True] | None = Field(
        default=None, description="the image is this request's MQTT 5 binary payload (content type image/*)")
    mime: str | None = Field(default=None, pattern=r"^image/[a-z0-9.+-]{1,32}$")

    @model_validator(mode="after")
    def _one_source(self):
        _require_one("an image part names exactly one of 'camera', 'data' or 'payload'",
                     self.camera is not None, self.data is not None, self.payload is not None)
        _check_base64(self.data, "image")
        return self


class AudioSource(_Strict):
    """Audio inline as base64 (``data``), or ``payload: true``: the MQTT 5 binary payload of this
    request (content type audio/*, the JSON request in the user property ``request``). ``mime``
    names the format: a file (audio/wav, audio/flac, audio/ogg: decoded by content) or raw PCM16,
    which needs its rate (``audio/pcm;rate=16000`` little-endian, ``audio/L16;rate=16000``
    big-endian; ``channels`` defaults to 1). At most ``max_audio_bytes`` and ``max_audio_s``."""

    data: str | None = Field(default=None, description="base64-encoded audio")
    payload: Literal[True] | None = Field(
        default=None, description="the audio is this request's MQTT 5 binary payload (content type audio/*)")
    mime: str | None = Field(default=None, pattern=AUDIO_MIME_PATTERN)

    @model_validator(mode="after")
    def _one_source(self):
        _require_one("audio names exactly one of 'data' or 'payload'", self.data is not None, self.payload is not None)
        _check_base64(self.data, "audio")
        return self


class AudioPart(AudioSource):
    """Audio in a user message (speech the model listens to). Needs the 'audio' modality."""

    type: Literal["audio"]


ContentPart = Annotated[Union[TextPart, ImagePart, AudioPart], Field(discriminator="type")]


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
    model: ModelName = None
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
        _require_one("give exactly one of 'messages' or 'prompt'", self.messages is not None, self.prompt is not None)
        return self


class TranscribeRequest(_Strict):
    """Payload on ``R/req/C/transcribe``: speech to text (a model with the 'audio' modality).
    Events as for chat: accepted, deltas when ``stream``, then one result or error."""

    v: Literal[1] = 1
    request_id: RequestId | None = Field(
        default=None, description="Required unless the MQTT 5 Correlation Data carries it.")
    reply_to: str | None = Field(default=None, max_length=512)
    model: ModelName = None
    audio: AudioSource
    language: str | None = Field(default=None, pattern=r"^[a-z]{2}$", description="ISO-639-1; default: the model tells")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    stream: bool = True
    priority: int = Field(default=5, ge=0, le=9)
    deadline_ms: int | None = Field(default=None, ge=1, le=86_400_000)


class AudioStreamRequest(_Strict):
    """Payload on ``R/req/C/audio_stream``: live audio from firmware, transcribed per utterance.
    ``request_id`` names the stream. ``open`` it (options below), send ``chunk``s (each the MQTT 5
    binary payload, content type ``audio/pcm;rate=16000``: 16 kHz mono PCM16 little-endian,
    20-200 ms each, QoS 1, in order, ``seq`` counting up from 0; this JSON in the user property
    ``request``), ``close`` it. Events: stream_opened, voice_started, voice_stopped (each
    utterance then runs as request ``<stream id>-u<n>``: accepted, deltas, result), stream_closed."""

    v: Literal[1] = 1
    request_id: RequestId | None = None
    reply_to: str | None = Field(default=None, max_length=512)
    action: Literal["open", "chunk", "close"]
    model: ModelName = None
    seq: int | None = Field(default=None, ge=0, description="chunks: 0, 1, 2, ...; a repeated seq is ignored")
    language: str | None = Field(default=None, pattern=r"^[a-z]{2}$", description="open: ISO-639-1 of the speech")
    end_silence_ms: int = Field(default=700, ge=100, le=10_000, description="open: silence that ends an utterance")
    max_utterance_s: float = Field(default=15.0, ge=1.0, le=120.0, description="open: longest utterance")
    max_tokens: int | None = Field(default=None, ge=1, description="open: per utterance's transcript")


class StreamEvent(_ReplyEvent):
    """An audio stream's own events (``request_id`` the stream id): stream_opened;
    voice_started (``t_s``: seconds into the stream); voice_stopped (``t_s``, ``utterance``: its
    transcript comes as request ``<stream id>-u<utterance>``); stream_closed (``reason``:
    closed, idle, client_gone, stopping)."""

    type: Literal["stream_opened", "voice_started", "voice_stopped", "stream_closed"]
    t_s: float | None = None
    utterance: int | None = None
    reason: str | None = None


class CancelRequest(_Strict):
    """Payload on ``R/req/C/cancel``: one request of C's, or all of them (optionally only those
    replying to ``reply_to``; the SDK's Last Will uses this)."""

    v: Literal[1] = 1
    request_id: RequestId | None = None
    all: bool = False
    reply_to: str | None = Field(default=None, max_length=512)

    @model_validator(mode="after")
    def _what(self):
        _require_one("give either 'request_id' or 'all': true", self.request_id is not None, self.all)
        return self


class WatchRequest(_Strict):
    """Payload on ``R/req/C/watch``: ask ``prompt`` about camera ``camera`` every ``every_s``
    seconds (or, with ``on_change``, when the scene changed, at most that often). Results go to
    ``R/events/{camera}/watch/{C}/{job_id}`` until cancelled or expired. The job id is
    ``request_id`` (or the Correlation Data); registering the same id again is idempotent."""

    v: Literal[1] = 1
    request_id: str | None = Field(default=None, pattern=JOB_ID_PATTERN,
                                   description="the job id (a topic level); required unless in the Correlation Data")
    reply_to: str | None = Field(default=None, max_length=512)
    camera: str = Field(pattern=CAMERA_PATTERN)
    model: ModelName = None
    prompt: str = Field(min_length=1, max_length=8192)
    system: str | None = Field(default=None, max_length=8192, description="optional system message")
    every_s: float = Field(ge=0.01, le=86_400.0, description="period; at least capabilities.limits.watch_min_every_s")
    on_change: bool = Field(default=False, description="run only when the scene changed (at most every every_s)")
    change_threshold: float | None = Field(default=None, gt=0.0, le=1.0,
                                           description="mean absolute grey difference 0..1 (default: device setting)")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    expires_s: float | None = Field(default=None, gt=0.0, le=10 * 365 * 86_400.0,
                                    description="the job ends this many seconds after registration")
    persistent: bool = Field(default=False, description="survive a daemon restart (needs the watch_store setting)")


class WatchCancelRequest(_Strict):
    """Payload on ``R/req/C/watch_cancel`` (the plain ``cancel`` with the job id works too)."""

    v: Literal[1] = 1
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    request_id: str | None = Field(default=None, pattern=ID_PATTERN)
    reply_to: str | None = Field(default=None, max_length=512)


class ListenRequest(_Strict):
    """Payload on ``R/req/C/listen``: transcribe what the device's microphone ``microphone`` hears,
    one transcript per utterance (voice activity detection finds them), until cancelled or
    expired. Events go to ``R/events/{microphone}/listen/{C}/{job_id}``. The job id is
    ``request_id`` (or the Correlation Data); registering the same id again is idempotent."""

    v: Literal[1] = 1
    request_id: str | None = Field(default=None, pattern=JOB_ID_PATTERN,
                                   description="the job id (a topic level); required unless in the Correlation Data")
    reply_to: str | None = Field(default=None, max_length=512)
    microphone: str = Field(pattern=MICROPHONE_PATTERN)
    model: ModelName = None
    language: str | None = Field(default=None, pattern=r"^[a-z]{2}$", description="ISO-639-1 of the speech")
    end_silence_ms: int = Field(default=700, ge=100, le=10_000, description="silence that ends an utterance")
    max_utterance_s: float = Field(default=15.0, ge=1.0, le=120.0, description="longest utterance")
    max_tokens: int | None = Field(default=None, ge=1, description="per utterance's transcript")
    priority: int = Field(default=5, ge=0, le=9, description="of each transcription in the device's queue")
    expires_s: float | None = Field(default=None, gt=0.0, le=10 * 365 * 86_400.0,
                                    description="the job ends this many seconds after registration")


class ListenCancelRequest(_Strict):
    """Payload on ``R/req/C/listen_cancel`` (the plain ``cancel`` with the job id works too)."""

    v: Literal[1] = 1
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    request_id: str | None = Field(default=None, pattern=ID_PATTERN)
    reply_to: str | None = Field(default=None, max_length=512)


class SnapshotRequest(_Strict):
    """Payload on ``R/req/C/snapshot``: the newest frame of ``camera`` as a JPEG."""

    v: Literal[1] = 1
    request_id: RequestId | None = None
    reply_to: str | None = Field(default=None, max_length=512)
    camera: str = Field(pattern=CAMERA_PATTERN)
    max_side: int | None = Field(default=None, ge=16, le=8192, description="default: the snapshot_max_side setting")
    encoding: Literal["binary", "base64"] = Field(
        default="binary", description="binary: the JPEG is the MQTT payload (metadata in user properties); "
                                      "base64: a JSON 'snapshot' event (MQTT 3.1.1 clients)")


# --- events on the reply topic ----------------------------------------------------------------------


class Accepted(_ReplyEvent):
    type: Literal["accepted"] = "accepted"
    seq: int = 0
    queue_position: int = Field(description="0 = runs next")


class Delta(_ReplyEvent):
    type: Literal["delta"] = "delta"
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


class Result(_ReplyEvent):
    """The one terminal event of a served request: the whole text, even when deltas were lost."""

    type: Literal["result"] = "result"
    text: str
    tokens: list[int]
    finish_reason: FinishReason
    usage: Usage


class Error(_ReplyEvent):
    """The terminal event of a refused or failed request."""

    type: Literal["error"] = "error"
    request_id: str | None
    status: int
    code: ErrorCode
    message: str
    retry_after_ms: int | None = None
    details: list[dict[str, Any]] | None = None


Event = Annotated[Union[Accepted, Delta, Result, Error], Field(discriminator="type")]


class WatchRegistered(_ReplyEvent):
    """The one reply to a ``watch`` request (terminal)."""

    type: Literal["watch_registered"] = "watch_registered"
    seq: int = 0
    job_id: str
    camera: str
    events_topic: str
    every_s: float
    on_change: bool
    persistent: bool
    expires_at: float | None = Field(description="Unix time the job ends, or null")


class ListenRegistered(_ReplyEvent):
    """The one reply to a ``listen`` request (terminal)."""

    type: Literal["listen_registered"] = "listen_registered"
    seq: int = 0
    job_id: str
    microphone: str
    model: str
    events_topic: str
    expires_at: float | None = Field(description="Unix time the job ends, or null")


class Snapshot(_ReplyEvent):
    """A snapshot as JSON (``encoding: base64``). With ``binary`` the payload is the JPEG and these
    fields (except data) are MQTT 5 user properties, as strings."""

    type: Literal["snapshot"] = "snapshot"
    request_id: str | None = None
    seq: int = 0
    camera: str
    mime: Literal["image/jpeg"] = "image/jpeg"
    width: int
    height: int
    frame_seq: int
    frame_ts: float = Field(description="Unix time the frame was captured")
    data: str | None = Field(default=None, description="base64 JPEG (encoding base64 only)")


# --- events on R/events/{camera}/watch/{C}/{job_id} ----------------------------------------------------


class WatchEvent(_WatchJobEvent):
    """One answer of a watch job."""

    type: Literal["watch"] = "watch"
    seq: int = Field(description="per job, from 0; restarts at 0 when the daemon restarts")
    ts: float = Field(description="Unix time of the answer")
    trigger: Literal["interval", "change"]
    change: float | None = Field(default=None, description="scene change that triggered it (on_change jobs)")
    frame_seq: int
    frame_ts: float
    text: str
    finish_reason: FinishReason
    usage: Usage


class WatchError(_WatchJobEvent):
    """A tick that could not produce an answer (camera lost, inference failed); the job goes on."""

    type: Literal["watch_error"] = "watch_error"
    status: int
    code: ErrorCode
    message: str


class WatchEnd(_WatchJobEvent):
    """The last event of a watch job."""

    type: Literal["watch_end"] = "watch_end"
    reason: Literal["cancelled", "expired"]


# --- events on R/events/{microphone}/listen/{C}/{job_id} ----------------------------------------------


class ListenVoice(_ListenJobEvent):
    """Voice activity on the microphone: ``voice_started`` and then ``voice_stopped`` of utterance
    ``utterance``; ``t_s`` is seconds of audio since the daemon opened the microphone."""

    type: Literal["voice_started", "voice_stopped"]
    utterance: int = Field(description="per job, from 0")
    t_s: float


class ListenTranscript(_ListenJobEvent):
    """The transcript of one utterance (after its voice_stopped)."""

    type: Literal["transcript"] = "transcript"
    utterance: int
    start_s: float = Field(description="where the utterance's audio starts, seconds since the microphone opened")
    end_s: float
    text: str
    tokens: list[int]
    finish_reason: FinishReason
    usage: Usage


class ListenError(_ListenJobEvent):
    """Something the job could not do (microphone lost, a transcription failed); the job goes on."""

    type: Literal["listen_error"] = "listen_error"
    utterance: int | None = None
    status: int
    code: ErrorCode
    message: str


class ListenEnd(_ListenJobEvent):
    """The last event of a listen job."""

    type: Literal["listen_end"] = "listen_end"
    reason: Literal["cancelled", "expired", "stopping"]


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
    max_image_bytes: int | None = None
    max_audio_bytes: int | None = None
    max_audio_s: float | None = None
    max_audio_streams: int | None = None
    audio_stream_idle_s: float | None = None
    watch_min_every_s: float | None = None
    max_watch_jobs: int | None = None
    max_listen_jobs: int | None = None


class Capabilities(_Event):
    v: Literal[1] = 1
    schema_version: str = SCHEMA_VERSION
    device_id: str
    daemon_version: str
    model: ModelInfo = Field(description="the default model (the first of ``models``)")
    models: list[ModelInfo] = Field(default_factory=list, description="every model this device serves; a request "
                                                                      "names one in ``model``, or is routed by what "
                                                                      "it holds")
    ops: list[str] = ["chat", "cancel"]
    cameras: list[str] = Field(default_factory=list, description="camera names usable in image parts, watch, snapshot")
    microphones: list[str] = Field(default_factory=list, description="microphone names usable in listen jobs")
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
    watch_jobs: int | None = None
    watch_runs: int | None = None
    watch_skipped: int | None = Field(default=None, description="ticks skipped: queue full, previous run busy, no frame")
    cameras: dict[str, dict[str, Any]] | None = Field(
        default=None, description="per camera: connected, frames, reconnects, last_error")
    listen_jobs: int | None = None
    microphones: dict[str, dict[str, Any]] | None = Field(
        default=None, description="per microphone: connected, seconds heard, dropped chunks, reconnects, last_error")


#: What the retained ``R/status`` topic may say; anything else is not believed (the SDK logs it).
DEVICE_STATUSES = ("online", "stopping", "offline")
