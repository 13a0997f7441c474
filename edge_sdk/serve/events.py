"""The last stage: build replies from the protocol's models and publish them.

Every topic is checked against MQTT's topic-name rules right before it is published, whatever
the stage that chose it: one PUBLISH the broker refuses would cut the daemon off the broker.
QoS follows PROTOCOL.md: a request's ``delta`` events go at QoS 0, every other event at QoS 1, so
a slow reader's broker queue only ever holds the few events that matter (``accepted`` and the
terminal one, which carries the whole answer).

``publish`` is never called with a scheduler lock held: paho takes its own callback lock inside
``publish``, and the network thread holds it around ``on_message``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import BaseModel

from edge_sdk.mqtt_common import dumps, publish_props
from edge_sdk.protocol.models import ERROR_STATUS, Error, Result, Usage
from edge_sdk.protocol.topics import topic_name_error
from edge_sdk.serve.transport import Refusal, Reply

log = logging.getLogger("edge_sdk.serve")

#: QoS of the events on a reply topic (PROTOCOL.md, rule 6).
DELTA_QOS = 0
EVENT_QOS = 1


def to_wire(event: BaseModel) -> dict:
    """The JSON object of ``event``: every field, except optional ones left unset and None."""
    data = event.model_dump(mode="json")
    fields = type(event).model_fields
    return {k: v for k, v in data.items()
            if v is not None or k in event.model_fields_set or (k in fields and fields[k].is_required())}


def error_event(request_id: str | None, seq: int, code: str, message: str, **extra: Any) -> Error:
    return Error(request_id=request_id, seq=seq, status=ERROR_STATUS[code], code=code, message=message,
                 **{k: v for k, v in extra.items() if v is not None})


def empty_result(request_id: str, seq: int, received: float, reason: str) -> Result:
    """The result of a request that ends before it ran (cancelled, deadline passed in the queue)."""
    waited = ms(time.monotonic() - received)
    return Result(request_id=request_id, seq=seq, text="", tokens=[], finish_reason=reason,
                  usage=Usage(prompt_tokens=0, completion_tokens=0, time_to_first_token_ms=None, tokens_per_s=0.0,
                              queue_ms=waited, total_ms=waited))


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class Publisher:
    """Publishes on the daemon's paho client; counts what it had to drop in ``stats``."""

    def __init__(self, client: mqtt.Client, stats: dict):
        self.client = client
        self.stats = stats

    def event(self, reply: Reply, event: BaseModel) -> None:
        """One event of a request on its reply topic (Correlation Data echoed)."""
        qos = DELTA_QOS if getattr(event, "type", None) == "delta" else EVENT_QOS
        self.send(reply.topic, to_wire(event), qos=qos, correlation=reply.correlation)

    def refuse(self, reply: Reply, refusal: Refusal) -> None:
        """The one ``error`` event of a request refused before it was accepted."""
        log.info("refused request %s -> %s: %s %s", reply.request_id, reply.topic, refusal.code, refusal.message)
        self.event(reply, error_event(reply.request_id, 0, refusal.code, refusal.message, **refusal.extra))

    def send(self, topic: str, payload: Any, *, qos: int = 1, retain: bool = False,
             correlation: bytes | None = None, expiry_s: int | None = None, content_type: str | None = None,
             user: list[tuple[str, str]] | None = None) -> bool:
        """Publish ``payload`` (a model, a JSON-able dict, or bytes) now; False if it was dropped."""
        bad = topic_name_error(topic)
        if bad is not None:
            log.error("not publishing to %r: %s", topic, bad)
            self.stats["dropped_messages"] += 1
            return False
        if isinstance(payload, BaseModel):
            payload = to_wire(payload)
        is_json = not isinstance(payload, bytes)
        try:
            data = dumps(payload) if is_json else payload
            info = self.client.publish(topic, data, qos=qos, retain=retain,
                                       properties=publish_props(correlation, expiry_s=expiry_s, json_payload=is_json,
                                                                content_type=content_type, user=user))
        except Exception:
            log.exception("publish to %s failed", topic)
            self.stats["dropped_messages"] += 1
            return False
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE or (info.rc == mqtt.MQTT_ERR_NO_CONN and qos == 0):
            self.stats["dropped_messages"] += 1
            return False
        return True
