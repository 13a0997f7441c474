"""The SDK's exceptions: every call ends in its normal result or one of these, never in an
exception from paho, pydantic or json. ``error_from_event`` maps the daemon's error events."""

from __future__ import annotations

from typing import Any


class EdgeError(Exception):
    """Base of every SDK error; carries the daemon's status, code and the request id."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 request_id: str | None = None, event: dict | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.event = event


class BadRequestError(EdgeError):
    """The daemon refused the request as malformed or impossible (400, 404, 413, 415)."""


class UnsupportedMediaError(BadRequestError):
    """An image (or other part) the device's model cannot take, or an unknown camera (415)."""


class InvalidImageError(BadRequestError):
    """An image that does not decode: empty, truncated, corrupt (400 invalid_image)."""


class InvalidAudioError(BadRequestError):
    """Audio that does not decode or is out of bounds: not audio, truncated, a rate outside
    8-192 kHz, longer than max_audio_s (400 invalid_audio)."""


class CameraUnavailableError(EdgeError):
    """The device's camera has no fresh frame right now (503 camera_unavailable); retry later."""


class BusyError(EdgeError):
    """The device's queue is full (429); retry after ``retry_after_ms``."""

    def __init__(self, message: str, *, retry_after_ms: int | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after_ms = retry_after_ms


class DeviceOfflineError(EdgeError):
    """The device is offline, stopping, or has never said it is online."""


class RequestTimeoutError(EdgeError, TimeoutError):
    """No final answer within the timeout (the SDK cancels the request on the device)."""


class ServerError(EdgeError):
    """The daemon failed while running the request (500)."""


class ProtocolError(ServerError):
    """The device sent an event the SDK cannot read (malformed JSON, wrong types, missing fields)."""


class BrokerConnectionError(EdgeError, ConnectionError):
    """The MQTT broker cannot be reached or refused the connection."""


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (str, float)):
        try:
            return int(value)
        except (ValueError, OverflowError):
            return None
    return None


def error_from_event(ev: dict) -> EdgeError:
    """The EdgeError an ``error`` event stands for, whatever junk its fields hold (a status that is
    not a number counts as 500)."""
    status = _int_or_none(ev.get("status")) or 500
    code = ev.get("code") if isinstance(ev.get("code"), str) else None
    rid = ev.get("request_id") if isinstance(ev.get("request_id"), str) else None
    kw = dict(status=status, code=code, request_id=rid, event=ev)
    msg = f"[{status} {code}] {ev.get('message')}"
    if status == 429:
        return BusyError(msg, retry_after_ms=_int_or_none(ev.get("retry_after_ms")), **kw)
    if status == 415:
        return UnsupportedMediaError(msg, **kw)
    if code == "invalid_image":
        return InvalidImageError(msg, **kw)
    if code == "invalid_audio":
        return InvalidAudioError(msg, **kw)
    if code == "camera_unavailable":
        return CameraUnavailableError(msg, **kw)
    if status == 503:
        return DeviceOfflineError(msg, **kw)
    if 400 <= status < 500:
        return BadRequestError(msg, **kw)
    return ServerError(msg, **kw)


def read_event(model: type, ev: dict, request_id: str | None = None) -> Any:
    """``model.model_validate(ev)``, with a malformed event turned into ProtocolError."""
    from pydantic import ValidationError

    try:
        return model.model_validate(ev)
    except ValidationError as e:
        raise ProtocolError(f"the device sent a malformed {model.__name__.lower()} event: {e.errors()[0]['msg']} "
                            f"at {'.'.join(map(str, e.errors()[0]['loc'])) or '(event)'}",
                            request_id=request_id, code="protocol_error", event=ev) from None
