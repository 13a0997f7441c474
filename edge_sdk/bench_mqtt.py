"""``edge-sdk bench --mqtt``: time to first token and decode speed through the broker versus
in-process, on the same model, prompt and seed.

In-process: iterate ``model.stream`` directly. Through MQTT: a daemon (in this process, on its
own threads) serves the model on a broker, the SDK client asks with ``stream=True``; times are
taken where the SDK sees the first delta and the result. Without ``host``/``port`` a private
mosquitto is started on a free loopback port (as the tests do). Report medians over ``runs``.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

DEFAULT_PROMPT = [{"role": "user", "content": "Describe what a mobile robot should do when its camera sees a red box."}]


def _stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}


def _speed(n_tokens: int, t_first: float | None, t_end: float) -> float | None:
    if t_first is None or n_tokens < 2 or t_end <= t_first:
        return None
    return (n_tokens - 1) / (t_end - t_first)


def _measure(start: Callable[[], Any], completion_tokens: Callable[[Any], int]) -> tuple[dict, Any]:
    """Time one streamed generation: ``start()`` returns the stream, iterated to its end here;
    ``completion_tokens(result)`` reads the token count off the stream's result. Returns the
    timings row and the result."""
    t0 = time.perf_counter()
    s = start()
    first = None
    for _ in s:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    r = s.result
    n = completion_tokens(r)
    return {"ttft_ms": (first - t0) * 1000 if first else None, "tokens_per_s": _speed(n, first, end),
            "total_ms": (end - t0) * 1000, "tokens": n}, r


def _in_process(model, prompt, kw) -> tuple[dict, list[int]]:
    row, r = _measure(lambda: model.stream(prompt, **kw), lambda r: r.completion_tokens)
    return row, list(r.tokens)


def _over_mqtt(client, prompt, kw) -> tuple[dict, list[int]]:
    row, r = _measure(lambda: client.chat(prompt, stream=True, **kw), lambda r: r.usage.completion_tokens)
    row.update(daemon_ttft_ms=r.usage.time_to_first_token_ms, daemon_queue_ms=r.usage.queue_ms)
    return row, list(r.tokens)


def bench_mqtt(model: Any, *, prompt: Any = None, max_tokens: int = 64, runs: int = 5, warmup: int = 1,
               seed: int = 0, temperature: float = 0.0, host: str | None = None, port: int | None = None,
               device_id: str = "bench", username: str | None = None, password: str | None = None,
               coalesce_ms: float | None = None) -> dict:
    """Measure ``model`` in-process and through MQTT; returns a JSON-able report.

    ``model``: a loaded model (``edge_sdk.load(path)``). ``host``/``port``: an existing broker
    (default: start a private mosquitto). The daemon always runs in this process so that both
    sides use the very same model object; ``coalesce_ms`` overrides the daemon's delta coalescing.
    """
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    kw = dict(max_tokens=max_tokens, seed=seed, temperature=temperature)
    overrides = {"coalesce_ms": coalesce_ms} if coalesce_ms is not None else {}
    with _served(model, host=host, port=port, device_id=device_id, username=username, password=password,
                 timeout=600, max_tokens=max(max_tokens, 1), **overrides) as (daemon, client, broker):
        local, remote, same = [], [], True
        for i in range(warmup + runs):
            a, ta = _in_process(model, prompt, kw)
            b, tb = _over_mqtt(client, prompt, kw)
            if i >= warmup:
                local.append(a)
                remote.append(b)
                same = same and ta == tb
        summary = {}
        for name, rows in (("in_process", local), ("mqtt", remote)):
            summary[name] = {k: _stats([r.get(k) for r in rows]) for k in rows[0] if k != "tokens"}
            summary[name]["completion_tokens"] = rows[0]["tokens"]
        li, mq = summary["in_process"], summary["mqtt"]

        def diff(key):
            a, b = li[key]["median"], mq[key]["median"]
            return None if a is None or b is None else round(b - a, 3)

        tps_a, tps_b = li["tokens_per_s"]["median"], mq["tokens_per_s"]["median"]
        return {
            **summary,
            "overhead": {"ttft_ms": diff("ttft_ms"), "total_ms": diff("total_ms"),
                         "tokens_per_s_ratio": round(tps_b / tps_a, 4) if tps_a and tps_b else None},
            "same_tokens": same, "runs": runs, "max_tokens": max_tokens, "seed": seed,
            "model": daemon.models.default.name, "coalesce_ms": daemon.s.coalesce_ms,
            "broker": f"{_mosquitto_version() if broker else 'external'} at {daemon.s.host}:{daemon.s.port}",
        }


@contextmanager
def _served(model: Any, *, host: str | None = None, port: int | None = None, device_id: str = "bench",
            username: str | None = None, password: str | None = None, timeout: float = 600,
            broker_options: dict | None = None, **settings: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(daemon, SDK client, private broker or None): a daemon serving ``model`` in this process on
    ``host:port``, or on a private mosquitto (``broker_options``) when ``host`` is None."""
    from edge_sdk.client import Client
    from edge_sdk.serve.broker import Mosquitto
    from edge_sdk.serve.config import ServeSettings
    from edge_sdk.serve.daemon import Daemon

    broker = None
    if host is None:
        broker = Mosquitto(port=port, **(broker_options or {})).start()
        host, port = broker.host, broker.port
    port = port or 1883
    daemon = Daemon(model, ServeSettings(host=host, port=port, device_id=device_id, username=username,
                                         password=password, metrics_interval_s=60, **settings)).start()
    try:
        if not daemon.wait_connected(10):
            raise RuntimeError(f"the benchmark daemon could not connect to {host}:{port}")
        with Client(host, port, device_id, username=username, password=password, timeout=timeout) as client:
            yield daemon, client, broker
    finally:
        daemon.stop(grace_s=1.0)
        if broker is not None:
            broker.cleanup()


def bench_round_trip(model: Any, runs: int = 20) -> list[dict]:
    """A 1-token request through a private mosquitto, median wall time, for each of: the broker's
    ``set_tcp_nodelay`` off (mosquitto's default) or on, and the daemon's and SDK's quick ACKs
    (``mqtt_common.set_quickack``) on or off."""
    from edge_sdk import mqtt_common

    rows = []
    for nodelay in (False, True):
        for quick in (True, False):
            mqtt_common.QUICK_ACK = quick
            try:
                with _served(model, device_id="rtt", timeout=30,
                             broker_options={"tcp_nodelay": nodelay}) as (_, client, _):
                    client.chat("hi", max_tokens=1)
                    times = []
                    for _ in range(runs):
                        t0 = time.perf_counter()
                        client.chat("hi", max_tokens=1)
                        times.append((time.perf_counter() - t0) * 1000)
            finally:
                mqtt_common.QUICK_ACK = True
            rows.append({"broker_tcp_nodelay": nodelay, "quick_ack": quick,
                         "request_ms": round(statistics.median(times), 3)})
    return rows


def format_round_trip(rows: list[dict]) -> str:
    lines = ["1-token request through mosquitto (median):",
             f"{'broker set_tcp_nodelay':>24}{'quick ACKs':>12}{'request':>12}"]
    for r in rows:
        lines.append(f"{str(r['broker_tcp_nodelay']).lower():>24}{'on' if r['quick_ack'] else 'off':>12}"
                     f"{r['request_ms']:>9.2f} ms")
    return "\n".join(lines)


def _mosquitto_version() -> str:
    from edge_sdk.serve.broker import mosquitto_binary

    try:
        out = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=5).stdout
        return out.splitlines()[0].strip()
    except Exception:  # noqa: BLE001
        return "mosquitto"


def format_bench(report: dict) -> str:
    """A short human-readable table of ``bench_mqtt``'s report."""
    li, mq, ov = report["in_process"], report["mqtt"], report["overhead"]

    def f(x, unit=""):
        return "-" if x is None else f"{x:.2f}{unit}"

    lines = [
        f"model {report['model']}, {report['max_tokens']} tokens, {report['runs']} runs (medians), "
        f"{report['broker']}, coalesce {report['coalesce_ms']} ms",
        f"{'':12}{'TTFT':>12}{'tokens/s':>12}{'total':>12}",
        f"{'in-process':12}{f(li['ttft_ms']['median'], ' ms'):>12}{f(li['tokens_per_s']['median']):>12}"
        f"{f(li['total_ms']['median'], ' ms'):>12}",
        f"{'MQTT':12}{f(mq['ttft_ms']['median'], ' ms'):>12}{f(mq['tokens_per_s']['median']):>12}"
        f"{f(mq['total_ms']['median'], ' ms'):>12}",
        f"overhead: TTFT +{f(ov['ttft_ms'], ' ms')}, total +{f(ov['total_ms'], ' ms')}, "
        f"tokens/s x{f(ov['tokens_per_s_ratio'])}; same tokens: {report['same_tokens']}",
    ]
    return "\n".join(lines)
