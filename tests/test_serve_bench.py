"""`edge-sdk bench --mqtt`'s measuring function, on a private mosquitto."""

from __future__ import annotations

import pytest

from edge_sdk.bench_mqtt import bench_mqtt, format_bench
from edge_sdk.serve.broker import mosquitto_binary

from mqtt_broker import make_serve_model


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
def test_bench_mqtt_reports_both_paths():
    r = bench_mqtt(make_serve_model(token_delay_s=0.002), max_tokens=16, runs=2, warmup=1)
    assert r["same_tokens"] is True
    for side in ("in_process", "mqtt"):
        assert r[side]["completion_tokens"] == 16
        assert r[side]["ttft_ms"]["median"] > 0 and r[side]["tokens_per_s"]["median"] > 0
    assert r["mqtt"]["ttft_ms"]["median"] >= r["mqtt"]["daemon_ttft_ms"]["median"] * 0.5
    assert r["overhead"]["ttft_ms"] is not None and 0 < r["overhead"]["tokens_per_s_ratio"] < 5
    text = format_bench(r)
    assert "in-process" in text and "MQTT" in text and "same tokens: True" in text
