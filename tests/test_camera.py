"""Camera: background capture from an MJPG .avi written here (no camera device in CI)."""

from __future__ import annotations

import os
import threading
import time

import cv2
import numpy as np
import pytest

from edge_sdk.media.camera import Camera, CameraClosed, CameraTimeout, parse_source

from avi_files import H, W, write_avi


def colour(frame) -> np.ndarray:
    return frame[10:, :].reshape(-1, 3).mean(axis=0)


def wait_for(pred, timeout=5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_parse_source():
    assert parse_source(0).kind == "device"
    assert parse_source("2").target == 2
    assert parse_source("/dev/video1").kind == "device"
    assert parse_source("rtsp://user:pw@10.0.0.2/stream").kind == "network"
    assert parse_source("videotestsrc ! videoconvert ! appsink").api == cv2.CAP_GSTREAMER
    assert parse_source("clip.avi").kind == "file"


def test_latest_frame_not_a_backlog(tmp_path):
    path = tmp_path / "a.avi"
    write_avi(path, (200, 0, 0), frames=40, fps=50, bar=True)
    with Camera(path, backoff=0.05, backoff_max=0.2) as cam:
        frame, ts, seq = cam.latest(timeout=3.0)
        assert frame.shape == (H, W, 3) and frame.dtype == np.uint8
        assert abs(time.time() - ts) < 1.0
        assert np.allclose(colour(frame), (200, 0, 0), atol=12)
        # a slow consumer: the next frame it sees is the newest, not the next in a queue
        time.sleep(0.3)
        frame2, ts2, seq2 = cam.latest(timeout=1.0)
        assert seq2 >= seq + 5, (seq, seq2)
        assert time.time() - ts2 < 0.5
        # newer_than waits for a frame that was not returned before
        _, _, seq3 = cam.latest(timeout=1.0, newer_than=seq2)
        assert seq3 > seq2


def test_reconnects_when_file_removed_and_back(tmp_path):
    path = tmp_path / "cam.avi"
    write_avi(path, (0, 0, 200), frames=6, fps=30, bar=True)
    cam = Camera(path, backoff=0.05, backoff_max=0.2)
    try:
        frame, _, seq = cam.latest(timeout=3.0)
        assert np.allclose(colour(frame), (0, 0, 200), atol=12)
        os.remove(path)
        assert wait_for(lambda: not cam.connected and cam.last_error == "file not found", 3.0)
        with pytest.raises(CameraTimeout):
            cam.latest(timeout=0.2, newer_than=cam.seq)  # nothing new while the source is gone
        before = cam.reconnects
        write_avi(path, (0, 200, 0), frames=6, fps=30, bar=True)
        frame, _, seq2 = cam.latest(timeout=3.0, newer_than=cam.seq)
        assert seq2 > seq
        assert np.allclose(colour(frame), (0, 200, 0), atol=12)
        assert cam.reconnects >= before >= 1
    finally:
        cam.close()
    assert not cam.running


def test_replaced_file_is_picked_up_when_looping(tmp_path):
    path = tmp_path / "loop.avi"
    write_avi(path, (0, 0, 200), frames=5, fps=50, bar=True)
    with Camera(path, loop=True, backoff=0.05) as cam:
        cam.latest(timeout=3.0)
        assert wait_for(lambda: cam.seq > 12, 3.0)  # played past the 5 frames: it loops
        assert cam.opens >= 2 and cam.reconnects == 0
        write_avi(path, (200, 200, 0), frames=5, fps=50, bar=True)  # replaced on disk (atomic rename)

        def new_colour():
            return np.allclose(colour(cam.latest(timeout=1.0)[0]), (200, 200, 0), atol=12)
        assert wait_for(new_colour, 3.0)


def test_end_without_reconnect_and_close(tmp_path):
    path = tmp_path / "once.avi"
    write_avi(path, (100, 100, 100), frames=3, fps=50, bar=True)
    cam = Camera(path, reconnect=False)
    frame, _, seq = cam.latest(timeout=3.0)
    assert wait_for(lambda: not cam.running, 3.0)
    last = cam.latest(timeout=0.1)  # the last frame stays available
    assert last[2] == cam.seq == 3
    with pytest.raises(CameraClosed):
        cam.latest(timeout=1.0, newer_than=cam.seq)
    cam.close()
    cam.close()  # twice is fine


def test_missing_source_times_out_then_close_wakes_waiter(tmp_path):
    cam = Camera(tmp_path / "nothing.avi", backoff=0.05, backoff_max=0.1)
    try:
        with pytest.raises(CameraTimeout, match="not connected"):
            cam.latest(timeout=0.3)
        errors = []

        def waiter():
            try:
                cam.latest(timeout=10.0)
            except CameraClosed as exc:
                errors.append(exc)

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        cam.close()
        t.join(2.0)
        assert not t.is_alive() and errors and time.monotonic() - t0 < 1.5
    finally:
        cam.close()
    assert not cam.running
