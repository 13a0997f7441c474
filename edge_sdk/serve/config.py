"""Daemon configuration: one pydantic settings model read from (highest first) CLI flags,
environment variables ``EDGE_SDK_<FIELD>`` and a TOML or JSON file (``--config FILE``)."""

from __future__ import annotations

import contextvars
import json
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from edge_sdk.protocol.topics import DEFAULT_PREFIX, check_device_id, check_prefix, sanitize_device_id
from edge_sdk.runtime.types import KVCacheDtype

_SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("edge_sdk_config_file", default=None)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (.toml) or JSON (.json) file; a ``[serve]`` table in TOML is used if present."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings")
    if isinstance(data.get("serve"), dict):
        data = data["serve"]
    return {k.replace("-", "_"): v for k, v in data.items()}


class _FileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        return read_config_file(path) if path else {}


class ServeSettings(BaseSettings):
    """Everything ``edge-sdk serve`` can be told. Field names are also the TOML keys, the CLI
    flags (``--queue-length``) and, upper-cased, the env vars (``EDGE_SDK_QUEUE_LENGTH``)."""

    model_config = SettingsConfigDict(env_prefix="EDGE_SDK_", extra="forbid", validate_default=True)

    # broker connection
    host: str = Field(default="localhost", description="MQTT broker host (or socket path with transport=unix)")
    port: int = Field(default=1883, ge=0, le=65535)
    transport: Literal["tcp", "unix", "websockets"] = "tcp"
    username: str | None = None
    password: SecretStr | None = None
    tls_ca: Path | None = Field(default=None, description="CA file; setting it (or tls_cert) turns TLS on")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_insecure: bool = Field(default=False, description="skip the broker host-name check (tests only)")
    keepalive: int = Field(default=30, ge=5, le=3600)
    client_id: str | None = Field(default=None, description="default: edge-sdk-daemon-<device_id>")
    reconnect_min_delay_s: float = Field(default=0.2, gt=0)
    reconnect_max_delay_s: float = Field(default=5.0, gt=0)

    # identity and topics
    device_id: str = Field(default_factory=lambda: sanitize_device_id(socket.gethostname()))
    topic_prefix: str = DEFAULT_PREFIX

    # scheduling and limits
    queue_length: int = Field(default=16, ge=1, description="requests waiting (besides the running one)")
    max_pending_per_client: int = Field(default=8, ge=1, description="queued + running per client name")
    max_tokens: int = Field(default=2048, ge=1, description="cap on a request's max_tokens")
    default_max_tokens: int = Field(default=256, ge=1)
    max_payload_bytes: int = Field(default=262_144, ge=1024)
    max_messages: int = Field(default=64, ge=1)
    max_deadline_ms: int | None = Field(default=None, ge=1, description="applied when a request has none")
    stop_grace_s: float = Field(default=5.0, ge=0, description="on shutdown, how long running work may finish")
    recent_requests: int = Field(default=512, ge=0, description="finished request ids remembered for de-duplication")
    max_queued_messages: int = Field(default=20_000, ge=0, description="paho's outgoing buffer while the broker is away")

    # streaming and metrics
    coalesce_ms: float = Field(default=25.0, ge=0, description="collect token deltas this long per message")
    coalesce_tokens: int = Field(default=32, ge=1, description="... or this many tokens")
    metrics_interval_s: float = Field(default=10.0, gt=0)
    log_level: str = "INFO"

    # the models' runtime (edge_sdk.load)
    kv_cache: KVCacheDtype = Field(
        default="float16", description="KV cache of the CPU backend: int8 halves a long context's memory for "
                                       "a small loss of accuracy; float32 is the exact one")

    # images and cameras (edge_sdk/serve/cameras.py)
    cameras: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="named camera sources: JSON object or 'name=source,name2=source' (source: device index, "
                    "/dev/videoN, GStreamer pipeline ending in appsink, rtsp:// URL or a video file)")
    camera_loop: bool = Field(default=False, description="rewind video-file camera sources at their end")
    camera_reconnect_max_s: float = Field(default=5.0, gt=0, description="longest wait between camera reopen attempts")
    camera_timeout_s: float = Field(default=2.0, gt=0, description="how long a request waits for a camera frame")
    max_image_bytes: int = Field(default=3_145_728, ge=1024,
                                 description="largest encoded image (MQTT 5 binary payload or decoded base64); "
                                             "keep it below the broker's max_packet_size")
    max_audio_bytes: int = Field(default=4_194_304, ge=1024,
                                 description="largest audio (MQTT 5 binary payload or decoded base64): 4 MiB is "
                                             "2 min of 16 kHz PCM16; keep it below the broker's max_packet_size")
    max_audio_s: float = Field(default=120.0, gt=0, description="longest audio a request may carry, in seconds")
    max_audio_streams: int = Field(default=4, ge=0, description="live audio streams open at once (all clients)")
    audio_stream_idle_s: float = Field(default=10.0, gt=0, description="a stream with no chunk for this long is closed")
    vad_model: str | None = Field(default=None, description="Silero VAD .onnx for audio streams (default: the "
                                                             "silero-vad wheel's, or EDGE_SDK_VAD_MODEL)")
    snapshot_max_side: int = Field(default=640, ge=16, description="snapshot JPEGs are scaled to fit this side")
    snapshot_quality: int = Field(default=80, ge=10, le=100, description="snapshot JPEG quality")
    snapshot_interval_s: float = Field(default=0.0, ge=0,
                                       description="also publish retained snapshots every N s (0: only on request)")

    # microphones and listen jobs (edge_sdk/serve/listen.py)
    microphones: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="named microphone sources: JSON object or 'name=source,name2=source' (source: alsa:DEVICE, "
                    "gst:PIPELINE, or an audio file played in real time)")
    microphone_loop: bool = Field(default=False, description="replay audio-file microphone sources at their end")
    microphone_timeout_s: float = Field(default=2.0, gt=0,
                                        description="a microphone silent (no samples at all) this long is unavailable")
    max_listen_jobs: int = Field(default=8, ge=0, description="listen jobs at once, all clients together")

    # watch jobs (edge_sdk/serve/watch.py)
    watch_min_every_s: float = Field(default=1.0, gt=0, description="smallest every_s a watch job may ask for")
    max_watch_jobs: int = Field(default=16, ge=0, description="watch jobs at once, all clients together")
    watch_change_threshold: float = Field(default=0.08, gt=0, le=1,
                                          description="default scene-change threshold (mean abs grey diff, 0..1)")
    watch_store: Path | None = Field(default=None, description="JSON file for persistent watch jobs "
                                                               "(restored on start); unset: persistence off")

    @field_validator("device_id")
    @classmethod
    def _dev(cls, v: str) -> str:
        return check_device_id(v)

    @field_validator("cameras", "microphones", mode="before")
    @classmethod
    def _sources(cls, v: Any) -> Any:
        if isinstance(v, str):  # CLI flag / env var: JSON, or name=source pairs
            text = v.strip()
            if not text:
                return {}
            if text.startswith("{"):
                return json.loads(text)
            out = {}
            for item in text.split(","):
                name, sep, source = item.partition("=")
                if not sep or not name.strip() or not source.strip():
                    raise ValueError(f"{item!r}: expected name=source")
                out[name.strip()] = source.strip()
            return out
        if isinstance(v, dict):
            return {k: str(x) if isinstance(x, int) and not isinstance(x, bool) else x for k, x in v.items()}
        return v

    @field_validator("cameras", "microphones")
    @classmethod
    def _source_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not _SOURCE_NAME_RE.match(name):
                raise ValueError(f"name {name!r} must match [A-Za-z0-9_-]{{1,64}} (it is a topic level)")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return check_prefix(v)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> "ServeSettings":
        """Settings from ``overrides`` (CLI; None values are ignored) > env > ``config_file`` > defaults."""
        token = _config_file.set(Path(config_file) if config_file else None)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _config_file.reset(token)

    @property
    def effective_client_id(self) -> str:
        return self.client_id or f"edge-sdk-daemon-{self.device_id}"
