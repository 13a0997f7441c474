"""Stage 2: an envelope -> a validated request of its op, or one Refusal.

``Admission.check`` is the one place a request is judged: the payload against its protocol
model (strict: nothing coerced), then this device's limits, models and cameras. Nothing here
decodes an image or touches the model: it runs on paho's network thread.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from edge_sdk.protocol.models import (JOB_ID_PATTERN, AudioStreamRequest, CancelRequest, ChatRequest, ListenCancelRequest,
                                      ListenRequest, SnapshotRequest, TranscribeRequest, WatchCancelRequest,
                                      WatchRequest)
from edge_sdk.serve.cameras import CameraHub, check_image_bytes
from edge_sdk.serve.config import ServeSettings
from edge_sdk.serve.models import ModelSet
from edge_sdk.serve.scheduler import Job
from edge_sdk.serve.transport import Envelope, Refusal

_JOB_ID_RE = re.compile(JOB_ID_PATTERN)

REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "chat": ChatRequest,
    "transcribe": TranscribeRequest,
    "audio_stream": AudioStreamRequest,
    "cancel": CancelRequest,
    "watch": WatchRequest,
    "watch_cancel": WatchCancelRequest,
    "listen": ListenRequest,
    "listen_cancel": ListenCancelRequest,
    "snapshot": SnapshotRequest,
}


class Admission:
    """Judges requests against ``settings``, the ``models`` (and routes each to one of them: the
    request's ``model`` is set to its name), the cameras in ``hub`` and the ``microphones``."""

    def __init__(self, settings: ServeSettings, models: ModelSet, hub: CameraHub, microphones: Any):
        self.s = settings
        self.models = models
        self.hub = hub
        self.microphones = microphones

    def check(self, env: Envelope) -> Any:
        """The request model of ``env.op``, checked against this device; raises Refusal. Sets
        ``env.reply.request_id`` to the id the events will carry."""
        try:
            req = REQUEST_MODELS[env.op].model_validate(env.data)
        except ValidationError as e:
            raise Refusal("invalid_request", _summarize(e), details=_details(e)) from None
        check = getattr(self, f"_check_{env.op}", None)
        if check is not None:
            check(env, req)
        return req

    def job(self, env: Envelope, req: ChatRequest | TranscribeRequest, send: Callable[[BaseModel], None]) -> Job:
        """The job of an admitted chat or transcribe request."""
        now = time.monotonic()
        deadline_ms = req.deadline_ms or self.s.max_deadline_ms
        return Job(env.client, env.reply.request_id, req, send, now, now + deadline_ms / 1000 if deadline_ms else None,
                   req.priority, reply=env.reply, attachment=env.attachment, model=req.model)

    # --- per op -------------------------------------------------------------------------------

    def _check_chat(self, env: Envelope, req: ChatRequest) -> None:
        self._take_request_id(env, req)
        s = self.s
        self._check_max_tokens(req.max_tokens)
        if req.messages is not None and len(req.messages) > s.max_messages:
            raise Refusal("invalid_request", f"{len(req.messages)} messages exceed the limit {s.max_messages}")
        parts = [p for m in (req.messages or []) if not isinstance(m.content, str) for p in m.content]
        images = [p for p in parts if p.type == "image"]
        audio = [p for p in parts if p.type == "audio"]
        needs = {"text"} | ({"image"} if images else set()) | ({"audio"} if audio else set())
        self._route(req, needs, " and ".join(w for w, p in (("images", images), ("audio", audio)) if p) or "text")
        self._check_payload_use(images + audio, env.attachment)
        self._check_images(images, env.attachment if any(p.payload for p in images) else None)
        self._check_audio(audio, env.attachment if any(p.payload for p in audio) else None)

    def _check_transcribe(self, env: Envelope, req: TranscribeRequest) -> None:
        self._take_request_id(env, req)
        self._check_max_tokens(req.max_tokens)
        self._route(req, {"audio"}, "audio")
        self._check_payload_use([req.audio], env.attachment)
        self._check_audio([req.audio], env.attachment)

    def _check_audio_stream(self, env: Envelope, req: AudioStreamRequest) -> None:
        self._take_request_id(env, req)
        if req.action == "open":
            self._route(req, {"audio"}, "audio")
            self._check_max_tokens(req.max_tokens)
            self._check_vad("audio streams")
        self._check_audio([], env.attachment)

    def _check_listen(self, env: Envelope, req: ListenRequest) -> None:
        self._take_job_id(env, req)
        if req.microphone not in self.microphones:
            raise Refusal("unsupported_media", f"no microphone {req.microphone!r} on this device (microphones: "
                                               f"{', '.join(self.microphones.names) or 'none'})")
        self._route(req, {"audio"}, "audio")
        self._check_max_tokens(req.max_tokens)
        self._check_vad("listen jobs")

    def _check_watch(self, env: Envelope, req: WatchRequest) -> None:
        self._take_job_id(env, req)
        s = self.s
        self._check_camera(req.camera)
        self._route(req, {"image"}, "images")
        if req.every_s < s.watch_min_every_s:
            raise Refusal("invalid_request", f"every_s {req.every_s} is below this device's minimum "
                                             f"watch_min_every_s ({s.watch_min_every_s})")
        self._check_max_tokens(req.max_tokens)
        if req.persistent and s.watch_store is None:
            raise Refusal("invalid_request", "persistent watch jobs are off on this device (no watch_store set)")

    def _check_snapshot(self, env: Envelope, req: SnapshotRequest) -> None:
        env.reply.request_id = req.request_id or env.reply.request_id
        self._check_camera(req.camera)

    # --- shared rules -------------------------------------------------------------------------

    def _check_max_tokens(self, max_tokens: int | None) -> None:
        if max_tokens is not None and max_tokens > self.s.max_tokens:
            raise Refusal("invalid_request", f"max_tokens {max_tokens} exceeds this device's limit {self.s.max_tokens}")

    @staticmethod
    def _take_request_id(env: Envelope, req: ChatRequest | TranscribeRequest | AudioStreamRequest) -> None:
        rid = req.request_id or env.reply.request_id
        if rid is None:
            raise Refusal("invalid_request", "request_id missing: put it in the payload or in the MQTT 5 Correlation Data")
        env.reply.request_id = rid

    @staticmethod
    def _take_job_id(env: Envelope, req: WatchRequest | ListenRequest) -> None:
        """A job's id is a topic level of its events topic."""
        job_id = req.request_id or env.reply.request_id
        if job_id is None or not _JOB_ID_RE.match(job_id):
            raise Refusal("invalid_request", f"job id {job_id!r} (request_id or Correlation Data) "
                                             f"must match {JOB_ID_PATTERN}: it is a topic level")
        env.reply.request_id = job_id

    def _route(self, req: Any, needs: set[str], what: str) -> None:
        """Pick the model the request runs on: it is written into ``req.model``."""
        req.model = self.models.route(req.model, needs, what)

    def _check_vad(self, what: str) -> None:
        from edge_sdk.media.vad import VadUnavailable, silero_model_path

        try:
            silero_model_path(self.s.vad_model)
        except VadUnavailable as e:
            raise Refusal("unsupported_media", f"{what} need voice activity detection: {e}") from None

    def _check_camera(self, camera: str) -> None:
        if camera not in self.hub:
            raise Refusal("unsupported_media", f"no camera {camera!r} on this device "
                                               f"(cameras: {', '.join(self.hub.names) or 'none'})")

    @staticmethod
    def _check_payload_use(parts: list, attachment: bytes | None) -> None:
        """A binary payload belongs to exactly one part (or the audio) marked ``payload: true``."""
        users = sum(1 for p in parts if p.payload)
        if attachment is not None and users == 0:
            raise Refusal("invalid_request", "the request has a binary payload but no part with \"payload\": true")
        if attachment is None and users:
            raise Refusal("invalid_request", "a part has \"payload\": true but the request's payload is not "
                                             "binary media (MQTT 5 content type image/* or audio/*)")
        if users > 1:
            raise Refusal("invalid_request", f"{users} parts say \"payload\": true; one request carries one payload")

    def _check_audio(self, parts: list, attachment: bytes | None) -> None:
        """Sizes only (decoding is the worker's): base64 data and the binary payload."""
        limit = self.s.max_audio_bytes
        sizes = ([len(attachment)] if attachment is not None else []) + \
            [len(base64.b64decode(p.data)) for p in parts if p.data is not None]
        for size in sizes:
            if size > limit:
                raise Refusal("payload_too_large", f"audio of {size} bytes exceeds max_audio_bytes ({limit})")

    def _check_images(self, parts: list, attachment: bytes | None) -> None:
        """Cheap checks of every image part (size, magic bytes, JPEG end marker; no decoding).
        ImageRejected is a Refusal."""
        if attachment is not None:
            check_image_bytes(attachment, self.s.max_image_bytes)
        for p in parts:
            if p.camera is not None:
                self._check_camera(p.camera)
            if p.data is not None:
                check_image_bytes(base64.b64decode(p.data), self.s.max_image_bytes)


def _summarize(e: ValidationError) -> str:
    errs = e.errors()
    first = errs[0]
    loc = ".".join(str(x) for x in first["loc"]) or "(payload)"
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"invalid request: {loc}: {first['msg']}{more}"


def _details(e: ValidationError) -> list[dict]:
    return [{"loc": ".".join(str(x) for x in err["loc"]), "msg": err["msg"], "type": err["type"]}
            for err in e.errors()[:10]]
