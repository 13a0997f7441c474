"""Ask an edge_sdk device a question through the broker with the Python SDK.

    python examples/python/chat.py --host localhost --port 1883 --device-id jetson "Where is the red box?"
    python examples/python/chat.py --async ...   # the same with edge_sdk.AsyncClient
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from edge_sdk.client import AsyncClient, BusyError, Client, DeviceOfflineError, EdgeError


def run_sync(a: argparse.Namespace) -> int:
    with Client(host=a.host, port=a.port, device_id=a.device_id, username=a.username, password=a.password,
                timeout=a.timeout) as client:
        caps = client.capabilities()
        print(f"[{client.device_id}: {caps.model.name}, context {caps.model.context_length}]", file=sys.stderr)
        stream = client.chat([{"role": "user", "content": a.prompt}], max_tokens=a.max_tokens,
                             temperature=a.temperature, seed=a.seed, stream=True)
        for delta in stream:
            print(delta.text, end="", flush=True)
        r = stream.result
        print()
        print(f"[{r.finish_reason}; {r.usage.completion_tokens} tokens, first token "
              f"{r.usage.time_to_first_token_ms} ms, {r.usage.tokens_per_s:.1f} tok/s]", file=sys.stderr)
    return 0


async def run_async(a: argparse.Namespace) -> int:
    async with AsyncClient(host=a.host, port=a.port, device_id=a.device_id, username=a.username,
                           password=a.password, timeout=a.timeout) as client:
        stream = await client.chat(a.prompt, max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed,
                                   stream=True)
        async for delta in stream:
            print(delta.text, end="", flush=True)
        print()
        print(f"[{stream.result.finish_reason}]", file=sys.stderr)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--device-id", default=None, help="default: the one device on the broker")
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--async", dest="use_async", action="store_true")
    a = p.parse_args()
    try:
        return asyncio.run(run_async(a)) if a.use_async else run_sync(a)
    except BusyError as e:
        print(f"device busy, retry in {e.retry_after_ms} ms", file=sys.stderr)
    except DeviceOfflineError as e:
        print(f"device offline: {e}", file=sys.stderr)
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
