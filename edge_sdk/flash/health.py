"""Run on the device after a flash: is the daemon online and does it answer through the broker?

`python -m edge_sdk.flash.health --device-id ID --username flash-check` (password in
$CHECK_PASSWORD): waits for the retained status `online`, then sends a one-token chat request
and waits for its result. Exit 0 when both happen within --timeout, else 1 with the reason.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def check(host: str, port: int, device_id: str, username: str, password: str | None, timeout: float) -> str | None:
    """None when healthy, else why not (the last error seen)."""
    from edge_sdk.client import Client

    deadline = time.monotonic() + timeout
    why = "no attempt"
    while time.monotonic() < deadline:
        left = deadline - time.monotonic()
        try:
            with Client(host, port, device_id=device_id, username=username, password=password,
                        timeout=max(1.0, left), connect_timeout=min(5.0, max(1.0, left))) as client:
                status = client.wait_status(timeout=min(5.0, max(0.5, left)))
                if status != "online":
                    why = f"device status is {status or 'not published'}"
                else:
                    client.chat("ping", max_tokens=1, timeout=max(1.0, deadline - time.monotonic()))
                    return None
        except Exception as exc:  # any failure is a reason to try again until the deadline
            why = f"{type(exc).__name__}: {exc}"
        time.sleep(1.0)
    return why


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--device-id", required=True)
    p.add_argument("--username", required=True)
    p.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args(argv)
    why = check(a.host, a.port, a.device_id, a.username, os.environ.get("CHECK_PASSWORD"), a.timeout)
    if why is None:
        print("health=ok")
        return 0
    print(f"health: {a.device_id} did not answer within {a.timeout:.0f} s: {why}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
