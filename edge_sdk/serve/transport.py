"""Stage 1 of a request: an MQTT message -> an ``Envelope`` (who asked, which op, the JSON, where
to reply) or a ``Refusal`` (with where to send it), or nothing when there is nowhere to reply.

Runs on paho's network thread, so it only reads the message: no model, no decoding of images.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from edge_sdk.mqtt_common import dumps, prop, user_props
from edge_sdk.protocol.models import ID_PATTERN, OPS, PROMPT_PROPERTY, REQUEST_PROPERTY
from edge_sdk.protocol.topics import NAME_RE, Topics, topic_name_error

log = logging.getLogger("edge_sdk.serve")

_ID_RE = re.compile(ID_PATTERN)


@dataclass
class Reply:
    """Where a request's events go: the validated reply topic and the Correlation Data to echo."""

    topic: str
    correlation: bytes | None
    request_id: str | None = None


class Refusal(Exception):
    """A request answered at once with one ``error`` event: a protocol error ``code``, a message
    and optional fields of the event (``retry_after_ms``, ``details``)."""

    def __init__(self, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = {k: v for k, v in extra.items() if v is not None}
        self.reply: Reply | None = None  # where to send it, when transport refused the message


def shutting_down() -> Refusal:
    """The refusal every stage gives once the daemon is stopping (503)."""
    return Refusal("stopping", "the daemon is shutting down")


@dataclass
class Envelope:
    """A request as it arrived: the client name C of ``R/req/C/op``, the op, the JSON object and
    the MQTT 5 binary image payload (if the request came as one)."""

    client: str
    op: str
    data: dict
    reply: Reply
    attachment: bytes | None = None


def reply_topic_error(topic: str, topics: Topics, client: str) -> str | None:
    """Why ``topic`` cannot be client ``client``'s reply topic, or None: it must lie strictly
    inside C's inbox and be a topic name the broker accepts."""
    prefix = topics.inbox_prefix(client)
    if not isinstance(topic, str) or not topic.startswith(prefix) or len(topic) <= len(prefix):
        return f"is not inside {prefix!r}"
    bad = topic_name_error(topic)
    return f"is not a valid topic name: {bad}" if bad else None


def read_message(msg: mqtt.MQTTMessage, topics: Topics, max_payload_bytes: int) -> Envelope | Refusal | None:
    """The envelope of ``msg``; a Refusal (its ``reply`` attribute says where to send it); None
    when the topic has no client level to reply to (logged: nothing can be answered)."""
    parsed = topics.parse_request(msg.topic)
    if parsed is None or not NAME_RE.match(parsed[0]):
        log.warning("dropped a message on %r: no valid client name level to reply to", msg.topic)
        return None
    client, op, extra = parsed
    corr = prop(msg, "CorrelationData")
    corr = bytes(corr) if corr is not None else None
    reply = Reply(topics.inbox(client), corr, _rid_from_correlation(corr))
    try:
        env = _read(msg, topics, client, op, extra, reply, max_payload_bytes)
    except Refusal as refusal:
        refusal.reply = reply
        return refusal
    return env


def _read(msg, topics: Topics, client: str, op: str, extra: list[str], reply: Reply,
          max_payload_bytes: int) -> Envelope:
    bad_topic = None
    resp_topic = prop(msg, "ResponseTopic")
    if resp_topic is not None:
        why = reply_topic_error(resp_topic, topics, client)
        if why is None:
            reply.topic = resp_topic
        else:
            bad_topic = (resp_topic, why)
    payload, attachment = _split_binary(msg)
    if len(payload) > max_payload_bytes:
        raise Refusal("payload_too_large", f"payload of {len(payload)} bytes exceeds {max_payload_bytes}")
    data = decode_json(payload)
    if isinstance(data, dict):
        rid = data.get("request_id")
        if isinstance(rid, str) and _ID_RE.match(rid):
            reply.request_id = rid
        rt = data.get("reply_to")
        if resp_topic is None and isinstance(rt, str):
            why = reply_topic_error(rt, topics, client)
            if why is None:
                reply.topic = rt
            else:
                bad_topic = (rt, why)
    if bad_topic is not None:
        raise Refusal("invalid_reply_topic", f"reply topic {bad_topic[0]!r} {bad_topic[1]}")
    if extra or op not in OPS:
        raise Refusal("unknown_op", f"unknown operation {'/'.join([op, *extra])!r}; ops: {', '.join(OPS)}")
    if msg.retain:
        raise Refusal("invalid_request", "a request must not carry the retain flag (it would run again on "
                                         "every daemon restart); it was not run")
    if not isinstance(data, dict):
        raise Refusal("invalid_request", f"payload must be a JSON object, not {type(data).__name__}")
    if attachment is not None and op not in BINARY_OPS:
        raise Refusal("invalid_request", f"a binary payload is only accepted on {' and '.join(BINARY_OPS)}, not {op!r}")
    return Envelope(client, op, data, reply, attachment)


BINARY_OPS = ("chat", "transcribe", "audio_stream")


def _split_binary(msg: mqtt.MQTTMessage) -> tuple[bytes, bytes | None]:
    """(JSON bytes, media bytes). An MQTT 5 binary request carries an image or audio as the
    payload (content type image/* or audio/*) and the JSON request in the user property 'request'
    (or, for an image, just the text in 'prompt')."""
    ctype = prop(msg, "ContentType")
    kind = ctype.lower().split("/", 1)[0] if isinstance(ctype, str) else ""
    if kind not in ("image", "audio"):
        return msg.payload, None
    up = user_props(msg)
    if REQUEST_PROPERTY in up:
        return up[REQUEST_PROPERTY].encode("utf-8", "surrogatepass"), bytes(msg.payload)
    if kind == "audio":
        raise Refusal("invalid_request", "a binary audio payload needs its JSON request in the 'request' user property")
    content: list[dict] = [{"type": "image", "payload": True}]
    if PROMPT_PROPERTY in up:
        content.append({"type": "text", "text": up[PROMPT_PROPERTY]})
    try:
        body = dumps({"v": 1, "messages": [{"role": "user", "content": content}]})
    except UnicodeEncodeError:
        raise Refusal("invalid_json", "the 'prompt' user property is not well-formed UTF-8") from None
    return body, bytes(msg.payload)


def decode_json(payload: bytes) -> Any:
    """Strict UTF-8 JSON: ill-formed UTF-8, lone surrogate escapes and nesting too deep for the
    parser are all ``invalid_json`` (Python's own json accepts the first two)."""
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as e:
        raise Refusal("invalid_json", f"payload is not UTF-8: {e}") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise Refusal("invalid_json", "payload is nested too deeply") from None
    except ValueError as e:
        raise Refusal("invalid_json", f"payload is not JSON: {e}") from None
    if _has_surrogate(data):
        raise Refusal("invalid_json", "payload holds a lone surrogate escape (\\ud800-\\udfff): not Unicode text")
    return data


def _has_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _rid_from_correlation(corr: bytes | None) -> str | None:
    if not corr:
        return None
    try:
        s = corr.decode("utf-8")
        if _ID_RE.match(s):
            return s
    except UnicodeDecodeError:
        pass
    return corr.hex()[:128]
