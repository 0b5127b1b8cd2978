"""Closed-loop HTTP load generator: N workers each send POST /predict back to back.

    python -m bench.loadgen --url http://127.0.0.1:8000 --model mobilenetv2 --concurrency 16 \
        --requests 400 --images /work/shared/data/ucsd-covid-ct/CT_COVID
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import requests


@dataclass(frozen=True)
class LoadResult:
    model: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


def run_load(*, url: str, model: str, images: list[bytes], concurrency: int, total: int,
             path: str = "/predict", warmup: int = 4) -> LoadResult:
    """Send `total` requests with `concurrency` workers cycling through `images`."""
    session_local = threading.local()

    def session() -> requests.Session:
        if not hasattr(session_local, "session"):
            session_local.session = requests.Session()
        return session_local.session  # type: ignore[no-any-return]

    def send(index: int) -> tuple[float, bool]:
        content = images[index % len(images)]
        started = time.perf_counter()
        response = session().post(url + path, params={"model": model},
                                  files={"file": ("slice.png", content)}, timeout=300)
        return time.perf_counter() - started, response.status_code == 200

    for index in range(warmup):
        send(index)
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    lock = threading.Lock()

    def worker() -> None:
        nonlocal errors
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            seconds, ok = send(index)
            with lock:
                latencies.append(seconds)
                errors += 0 if ok else 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    milliseconds = np.array(latencies) * 1000
    return LoadResult(model=model, concurrency=concurrency, requests=total, errors=errors,
                      seconds=elapsed, throughput_rps=total / elapsed,
                      p50_ms=float(np.percentile(milliseconds, 50)),
                      p95_ms=float(np.percentile(milliseconds, 95)),
                      p99_ms=float(np.percentile(milliseconds, 99)))


def load_images(folder: Path, count: int = 16) -> list[bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise SystemExit(f"no PNG/JPEG images under {folder}")
    return [p.read_bytes() for p in paths[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--images", type=Path, required=True)
    args = parser.parse_args()
    result = run_load(url=args.url, model=args.model, images=load_images(args.images),
                      concurrency=args.concurrency, total=args.requests)
    print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
