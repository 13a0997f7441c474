"""What the SDK sends: the JSON of each request, and images turned into protocol parts (one as
the MQTT 5 binary payload, several as base64)."""

from __future__ import annotations

import base64
import binascii
import os
import uuid
from typing import Any, Iterable

from edge_sdk.client.errors import ProtocolError
from edge_sdk.media.mime import sniff_mime
from edge_sdk.mqtt_common import dumps

#: MQTT 5 user properties are UTF-8 strings of at most 65,535 bytes: a bigger JSON request falls
#: back to base64 images in the JSON payload.
MAX_USER_PROPERTY = 60_000


def _set_given(payload: dict, **fields: Any) -> None:
    """Only the fields given go on the wire: the daemon fills in its own defaults."""
    payload.update({k: v for k, v in fields.items() if v is not None})


def _float(x: float | None) -> float | None:
    return None if x is None else float(x)


def build_chat_payload(messages: str | Iterable[Any] | None = None, *, prompt: str | list[int] | None = None,
                       request_id: str | None = None, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                       seed: int | None = None, stop: list[str] | None = None, stream: bool = True,
                       deadline: float | None = None, priority: int | None = None, model: str | None = None) -> dict:
    """The JSON of a chat request (only the fields given; the daemon fills the defaults)."""
    payload: dict[str, Any] = {"v": 1, "request_id": request_id or uuid.uuid4().hex}
    _set_given(payload, model=model)
    if messages is not None:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        payload["messages"] = [m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else dict(m)
                               for m in messages]
    if prompt is not None:
        payload["prompt"] = prompt
    _set_given(payload, max_tokens=max_tokens, top_k=top_k, seed=seed, priority=priority,
               temperature=_float(temperature), top_p=_float(top_p))
    if stop:
        payload["stop"] = list(stop)
    payload["stream"] = bool(stream)
    if deadline is not None:
        payload["deadline_ms"] = max(1, int(deadline * 1000))
    return payload


def _file_bytes(source: Any) -> bytes | None:
    """Bytes as they are, or a file's contents; None for anything else."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read()
    return None


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "shape")


def encode_image_input(image: Any) -> tuple[bytes, str]:
    """An image for a request -> (encoded bytes, MIME type). Paths and bytes are sent as they are
    (the device checks them); an HxWx3 uint8 RGB ndarray (as the runtime takes) becomes a JPEG
    (quality 95), an HxW one a grey JPEG."""
    data = _file_bytes(image)
    if data is not None:
        return data, sniff_mime(data) or "application/octet-stream"
    if not _is_array(image):
        raise TypeError(f"an image must be a path, bytes or a numpy array, not {type(image).__name__}")
    import cv2
    import numpy as np

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"an image array must be HxWx3 (RGB) or HxW uint8, got {arr.shape} {arr.dtype}")
    ok, buf = cv2.imencode(".jpg", arr[:, :, ::-1] if arr.ndim == 3 else arr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise ValueError("cannot encode the image array as JPEG")
    return buf.tobytes(), "image/jpeg"


def encode_audio_input(audio: Any, mime: str | None = None) -> tuple[bytes, str]:
    """Audio for a request -> (bytes, MIME type). Files (paths, bytes) are sent as they are (the
    device decodes them); raw PCM16 bytes need ``mime`` (``audio/pcm;rate=16000``); a float32
    array of 16 kHz samples (what the runtime takes) becomes little-endian PCM16."""
    data = _file_bytes(audio)
    if data is None:
        if not _is_array(audio):
            raise TypeError(f"audio must be a path, bytes or a numpy array, not {type(audio).__name__}")
        import numpy as np

        from edge_sdk.media.audio import to_pcm16

        arr = np.asarray(audio, dtype=np.float32)
        if arr.ndim != 1:
            raise ValueError(f"an audio array must be 1-D samples at 16 kHz, got shape {arr.shape}")
        return to_pcm16(arr), "audio/pcm;rate=16000"
    mime = mime or sniff_mime(data)
    if mime is None or not mime.startswith("audio/"):
        raise ValueError("cannot tell the audio format from its bytes: pass mime (e.g. 'audio/pcm;rate=16000')")
    return data, mime


def prepare_media(payload: dict, *, binary: bool = True) -> tuple[dict, tuple[bytes, str] | None]:
    """Turn ``{"type": "image", "image": ...}`` and ``{"type": "audio", "audio": ...[, "mime"]}``
    parts of a chat payload into protocol parts. With ``binary`` and exactly one such part (and a
    JSON request that fits a user property), its bytes become the MQTT 5 payload (``"payload":
    true``); otherwise base64 ``data``."""
    found: list[tuple[dict, bytes, str]] = []
    for m in payload.get("messages") or []:
        content = m.get("content")
        if not isinstance(content, list):
            continue
        m["content"] = content = list(content)  # never modify the caller's messages
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image", "audio") and kind in part:
                data, mime = (encode_image_input(part["image"]) if kind == "image"
                              else encode_audio_input(part["audio"], part.get("mime")))
                new = {k: v for k, v in part.items() if k not in (kind, "mime")}
                content[i] = new
                found.append((new, data, mime))
    if not found:
        return payload, None
    if binary and len(found) == 1:
        part, data, mime = found[0]
        part["payload"] = True
        if part["type"] == "audio":
            part["mime"] = mime
        if len(dumps(payload)) <= MAX_USER_PROPERTY and mime.startswith(("image/", "audio/")):
            return payload, (data, mime)
        del part["payload"]
    for part, data, mime in found:
        part["data"] = base64.b64encode(data).decode("ascii")
        if mime.startswith(("image/", "audio/")):
            part["mime"] = mime
    return payload, None


def build_transcribe_payload(audio: Any, *, mime: str | None = None, language: str | None = None,
                             request_id: str | None = None, max_tokens: int | None = None, stream: bool = False,
                             deadline: float | None = None, priority: int | None = None, model: str | None = None,
                             binary: bool = True) -> tuple[dict, tuple[bytes, str] | None]:
    """A transcribe request and its binary payload (the audio), or base64 inline when ``binary`` is off."""
    data, mime = encode_audio_input(audio, mime)
    payload: dict[str, Any] = {"v": 1, "request_id": request_id or uuid.uuid4().hex, "stream": bool(stream)}
    _set_given(payload, language=language, max_tokens=max_tokens, priority=priority, model=model)
    if deadline is not None:
        payload["deadline_ms"] = max(1, int(deadline * 1000))
    if binary:
        payload["audio"] = {"payload": True, "mime": mime}
        return payload, (data, mime)
    payload["audio"] = {"data": base64.b64encode(data).decode("ascii"), "mime": mime}
    return payload, None


def build_watch_payload(camera: str, prompt: str, *, every: float, on_change: bool = False,
                        change_threshold: float | None = None, max_tokens: int | None = None,
                        temperature: float | None = None, seed: int | None = None, expires: float | None = None,
                        persistent: bool = False, system: str | None = None, job_id: str | None = None,
                        model: str | None = None) -> dict:
    payload: dict[str, Any] = {"v": 1, "request_id": job_id or f"w{uuid.uuid4().hex[:16]}", "camera": camera,
                               "prompt": prompt, "every_s": float(every), "on_change": bool(on_change),
                               "persistent": bool(persistent)}
    _set_given(payload, change_threshold=change_threshold, max_tokens=max_tokens, seed=seed, system=system,
               temperature=_float(temperature), expires_s=_float(expires), model=model)
    return payload


def build_listen_payload(microphone: str, *, language: str | None = None, end_silence_ms: int | None = None,
                         max_utterance_s: float | None = None, max_tokens: int | None = None,
                         priority: int | None = None, expires: float | None = None, job_id: str | None = None,
                         model: str | None = None) -> dict:
    payload: dict[str, Any] = {"v": 1, "request_id": job_id or f"l{uuid.uuid4().hex[:16]}", "microphone": microphone}
    _set_given(payload, language=language, end_silence_ms=end_silence_ms, max_utterance_s=_float(max_utterance_s),
               max_tokens=max_tokens, priority=priority, expires_s=_float(expires), model=model)
    return payload



def build_snapshot_payload(camera: str, max_side: int | None) -> dict:
    payload: dict[str, Any] = {"v": 1, "request_id": uuid.uuid4().hex, "camera": camera}
    if max_side is not None:
        payload["max_side"] = max_side
    return payload



def snapshot_bytes(ev: dict) -> bytes:
    """The JPEG of a snapshot reply: the binary payload, or the base64 ``data`` of a JSON one."""
    if "bytes" in ev:
        return ev["bytes"]
    data = ev.get("data")
    try:
        return base64.b64decode(data if isinstance(data, str) else "", validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("the device sent a snapshot whose data is not base64", request_id=ev.get("request_id"),
                            code="protocol_error", event=ev) from None

