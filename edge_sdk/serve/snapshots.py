"""Camera snapshots: the newest frame as a small JPEG, on request and as the retained
``R/camera/{cam}/snapshot``. JPEG encoding runs on its own media thread, never on paho's."""

from __future__ import annotations

import base64
import concurrent.futures
import logging

from edge_sdk.protocol.models import Snapshot, SnapshotRequest
from edge_sdk.protocol.topics import Topics
from edge_sdk.serve.cameras import CameraHub
from edge_sdk.serve.config import ServeSettings
from edge_sdk.serve.events import Publisher
from edge_sdk.serve.transport import Refusal, Reply, shutting_down

log = logging.getLogger("edge_sdk.serve")


class Snapshots:
    def __init__(self, hub: CameraHub, settings: ServeSettings, topics: Topics, publisher: Publisher):
        self.hub = hub
        self.s = settings
        self.topics = topics
        self.publisher = publisher
        self._media = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-sdk-media")

    def request(self, req: SnapshotRequest, reply: Reply) -> None:
        """Answer a snapshot request from the media thread (network thread: only queues it)."""
        try:
            self._media.submit(self._take, req.camera, req.max_side or self.s.snapshot_max_side, req, reply)
        except RuntimeError:  # executor shut down: stopping
            self.publisher.refuse(reply, shutting_down())

    def refresh(self) -> None:
        """Refresh every camera's retained snapshot (the housekeeper, every snapshot_interval_s)."""
        for cam in self.hub.names:
            try:
                self._media.submit(self._take, cam, self.s.snapshot_max_side, None, None)
            except RuntimeError:
                break

    def close(self) -> None:
        self._media.shutdown(wait=True, cancel_futures=True)

    def _take(self, camera: str, max_side: int, req: SnapshotRequest | None, reply: Reply | None) -> None:
        """Media thread: encode the newest frame; reply (binary or base64 JSON) and refresh the
        retained snapshot when it has the default size."""
        s = self.s
        try:
            jpeg, meta = self.hub.snapshot(camera, max_side=max_side, quality=s.snapshot_quality,
                                           timeout=s.camera_timeout_s)
        except Refusal as e:
            if reply is not None:
                self.publisher.refuse(reply, e)
            return
        except Exception as e:  # pragma: no cover - OpenCV failure
            log.exception("snapshot of %s failed", camera)
            if reply is not None:
                self.publisher.refuse(reply, Refusal("internal", f"{type(e).__name__}: {e}"[:500]))
            return
        user = [("type", "snapshot"), *((k, str(v)) for k, v in meta.items() if k != "mime")]
        if max_side == s.snapshot_max_side:
            self.publisher.send(self.topics.snapshot(camera), jpeg, qos=0, retain=True, content_type="image/jpeg",
                                user=user)
        if reply is None:
            return
        if req.encoding == "base64":
            self.publisher.event(reply, Snapshot(request_id=reply.request_id, **meta,
                                                 data=base64.b64encode(jpeg).decode("ascii")))
        else:
            rid = [("request_id", reply.request_id)] if reply.request_id else []
            self.publisher.send(reply.topic, jpeg, correlation=reply.correlation, content_type="image/jpeg",
                                user=[*user, *rid, ("seq", "0")])
