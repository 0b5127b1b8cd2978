"""Container health probe (no curl in slim images): exit 0 when healthy, 1 otherwise.

    ctscan-healthcheck http URL     healthy when URL answers 2xx within 4 s
    ctscan-healthcheck worker       healthy when this host's Celery worker answers a ping
                                    on CELERY_BROKER_URL (default REDIS_URL)
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request


def check_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return False


def check_worker() -> bool:
    from celery import Celery

    broker = os.environ.get("CELERY_BROKER_URL") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    app = Celery(broker=broker)
    # The default node name is celery@<hostname>; any node on this host counts.
    suffix = "@" + socket.gethostname()
    replies = app.control.ping(timeout=3.0) or []
    if any(name.endswith(suffix) for reply in replies for name in reply):
        return True
    print(f"unhealthy: no Celery worker on {socket.gethostname()} answered a ping", file=sys.stderr)
    return False


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "http":
        return 0 if check_http(argv[1]) else 1
    if argv == ["worker"]:
        return 0 if check_worker() else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
