"""Stage 4: the one thread that runs the model.

It takes the next job from the scheduler, builds its prompt (decoding images here, never on the
network thread), streams it through ``model.stream`` and coalesces token deltas into few
messages (``coalesce_ms`` / ``coalesce_tokens``), then hands the terminal event back to the
scheduler, which sends it.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from typing import Any

from edge_sdk.media.audio import AudioError, load_audio
from edge_sdk.protocol.models import AudioSource, Delta, ImagePart, Result, TranscribeRequest, Usage
from edge_sdk.runtime.types import GenerationError
from edge_sdk.serve.cameras import CameraHub, decode_rgb
from edge_sdk.serve.config import ServeSettings
from edge_sdk.serve.events import empty_result, error_event, ms
from edge_sdk.serve.models import ModelSet
from edge_sdk.serve.scheduler import Job, Scheduler
from edge_sdk.serve.transport import Refusal

log = logging.getLogger("edge_sdk.serve")


class Worker:
    def __init__(self, models: ModelSet, scheduler: Scheduler, settings: ServeSettings, hub: CameraHub,
                 stats: dict, stopped: threading.Event):
        self.models = models
        self.scheduler = scheduler
        self.s = settings
        self.hub = hub
        self.stats = stats
        self.stopped = stopped
        self.last_tokens_per_s = 0.0

    def loop(self) -> None:
        while True:
            job = self.scheduler.next_job(self.stopped)
            if job is None:
                return
            start = time.monotonic()
            try:
                self.scheduler.finish(job, self._run(job))
            except Exception as e:
                self.stats["failed"] += 1
                code, message = _failure(e)
                if code == "internal":
                    log.exception("request %s/%s failed", job.client, job.request_id)
                self.scheduler.finish(job, error_event(job.request_id, job.next_seq(), code, message))
            finally:
                self.scheduler.job_done(time.monotonic() - start)

    def _run(self, job: Job) -> Result:
        """Generate ``job``; returns its result (errors raise)."""
        req = job.req
        start = time.monotonic()
        if job.cancel.is_set() or (job.deadline is not None and start >= job.deadline):
            self.stats["cancelled"] += 1
            return empty_result(job.request_id, job.next_seq(), job.received,
                                "cancelled" if job.cancel.is_set() else "deadline")
        max_tokens = min(req.max_tokens or self.s.default_max_tokens, self.s.max_tokens)
        model = self.models.get(job.model)
        if isinstance(req, TranscribeRequest):
            stream = model.stream_transcription(self._audio(req.audio, job), req.language, max_tokens=max_tokens,
                                                     temperature=req.temperature, cancel=job.cancel,
                                                     deadline=job.deadline)
        else:
            prompt = job.prompt if job.prompt is not None else self._prompt(job)
            stream = model.stream(prompt, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                       top_k=req.top_k, seed=req.seed, stop=tuple(req.stop),
                                       cancel=job.cancel, deadline=job.deadline)
        deltas = _Coalescer(job, self.s.coalesce_ms / 1000, self.s.coalesce_tokens) if req.stream else None
        texts: list[str] = []
        tokens: list[int] = []
        first_t = None
        for d in stream:
            if first_t is None:
                first_t = time.monotonic()
            texts.append(d.text)
            tokens.extend(d.tokens)
            if deltas is not None:
                deltas.add(d.text, d.tokens)
        if deltas is not None:
            deltas.flush()
        end = time.monotonic()
        res = getattr(stream, "result", None)
        if res is not None:
            text, toks, reason = res.text, list(res.tokens), res.finish_reason
            prompt_tokens, completion, tps = res.prompt_tokens, res.completion_tokens, res.tokens_per_second
        else:  # a model without .result: rebuild what we can
            text, toks = "".join(texts), tokens
            reason = "cancelled" if job.cancel.is_set() else "length" if len(tokens) >= max_tokens else "stop"
            prompt_tokens, completion = 0, len(tokens)
            tps = (len(tokens) - 1) / (end - first_t) if first_t and len(tokens) > 1 and end > first_t else 0.0
        self.stats["cancelled" if reason == "cancelled" else "completed"] += 1
        self.stats["generated_tokens"] += completion
        self.last_tokens_per_s = tps
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                      time_to_first_token_ms=ms(first_t - job.received) if first_t else None,
                      tokens_per_s=round(tps, 3), queue_ms=ms(start - job.received), total_ms=ms(end - job.received))
        log.info("%s/%s done: %s, %d+%d tokens, ttft %s ms, %.1f tok/s", job.client, job.request_id, reason,
                 prompt_tokens, completion, usage.time_to_first_token_ms, tps)
        return Result(request_id=job.request_id, seq=job.next_seq(), text=text, tokens=toks, finish_reason=reason,
                      usage=usage)

    def _prompt(self, job: Job) -> Any:
        """A chat request's prompt as the model takes it: text joined, images decoded to RGB,
        audio to 16 kHz samples."""
        req = job.req
        if req.prompt is not None:
            return req.prompt
        out = []
        for m in req.messages:
            if isinstance(m.content, str):
                out.append({"role": m.role, "content": m.content})
            elif all(p.type == "text" for p in m.content):
                out.append({"role": m.role, "content": "".join(p.text for p in m.content)})
            else:
                parts = [{"type": "text", "text": p.text} if p.type == "text"
                         else {"type": "audio", "audio": self._audio(p, job)} if p.type == "audio"
                         else {"type": "image", "image": self._image(p, job)} for p in m.content]
                out.append({"role": m.role, "content": parts})
        return out

    def _image(self, part: ImagePart, job: Job) -> Any:
        """An image part -> uint8 RGB [H, W, 3]; raises ImageRejected."""
        if part.payload:
            return decode_rgb(job.attachment or b"", self.s.max_image_bytes)
        if part.camera is not None:
            return self.hub.latest(part.camera, timeout=self.s.camera_timeout_s).rgb()
        return decode_rgb(base64.b64decode(part.data or ""), self.s.max_image_bytes)


    def _audio(self, source: AudioSource, job: Job) -> Any:
        """Audio (a part or a transcribe request's) -> 16 kHz float32; bad audio is ``invalid_audio``."""
        data = (job.attachment or b"") if source.payload else base64.b64decode(source.data or "")
        try:
            return load_audio(data, source.mime, max_seconds=self.s.max_audio_s, name=source.mime or "audio")
        except AudioError as e:
            raise Refusal("invalid_audio", str(e)) from None


class _Coalescer:
    """Collects a stream's token deltas and sends them as one ``delta`` event per window: the
    first token at once, then every ``window_s`` seconds or ``max_tokens`` tokens."""

    def __init__(self, job: Job, window_s: float, max_tokens: int):
        self.job = job
        self.window_s = window_s
        self.max_tokens = max_tokens
        self.texts: list[str] = []
        self.tokens: list[int] = []
        self.last_flush = 0.0

    def add(self, text: str, tokens: list[int]) -> None:
        self.texts.append(text)
        self.tokens.extend(tokens)
        now = time.monotonic()
        if self.last_flush == 0.0 or now - self.last_flush >= self.window_s or len(self.tokens) >= self.max_tokens:
            self.flush()
            self.last_flush = now

    def flush(self) -> None:
        if not (self.texts or self.tokens):
            return
        job = self.job
        job.send(Delta(request_id=job.request_id, seq=job.next_seq(), text="".join(self.texts), tokens=self.tokens))
        self.texts, self.tokens = [], []
        # paho's network thread writes the message, and it needs the GIL: a CPU-bound decode loop
        # would otherwise hold it for the whole switch interval (5 ms) before the delta leaves.
        time.sleep(0)


def _failure(e: Exception) -> tuple[str, str]:
    """The protocol error code and message for an exception from one job."""
    if isinstance(e, Refusal):  # ImageRejected, CameraUnavailable, invalid_audio
        return e.code, e.message
    if isinstance(e, GenerationError):
        return "generation_error", str(e)
    return "internal", f"{type(e).__name__}: {e}"[:500]
