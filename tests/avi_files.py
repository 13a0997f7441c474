"""Test helper: small MJPG .avi files written with OpenCV, standing in for cameras (no camera
device in CI). Used by test_camera and test_serve_vision."""

from __future__ import annotations

import os

import cv2
import numpy as np

W, H = 64, 48


def write_avi(path, color, frames=10, fps=25.0, bar=False) -> None:
    """An MJPG .avi of `color` (BGR) W x H frames, written aside and moved into place (atomic
    rename). `bar`: draw a growing progress bar along the top, so consecutive frames differ."""
    tmp = str(path) + ".part.avi"
    vw = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H))
    assert vw.isOpened()
    for i in range(frames):
        f = np.empty((H, W, 3), np.uint8)
        f[:] = color
        if bar:
            f[:4, : (i + 1) * 4] = 255
        vw.write(f)
    vw.release()
    os.replace(tmp, path)
