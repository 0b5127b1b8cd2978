"""Closed-loop HTTP load generator: N connections each send POST /predict back to back.

The client shares this machine's cores with the service it measures, so it is kept lean:
the multipart bodies are encoded once, and each connection is a keep-alive HTTP/1.1
stream on asyncio (uvloop when installed), about a tenth of the CPU per request of a
`requests` session in threads. Every answer must be 200 with a JSON body naming
`probability_covid`, or it counts as an error.

    python -m bench.loadgen --url http://127.0.0.1:8000 --model mobilenetv2 --concurrency 16 \
        --requests 400 --images ../shared/data/ucsd-covid-ct
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np


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


def encode_request(*, host: str, port: int, path: str, model: str, image: bytes, api_key: str | None = None) -> bytes:
    """One complete HTTP/1.1 request: POST path?model=... with the image as multipart `file`."""
    boundary = uuid.uuid4().hex
    body = b"".join([
        f"--{boundary}\r\n".encode(),
        b'Content-Disposition: form-data; name="file"; filename="slice.png"\r\n',
        b"Content-Type: application/octet-stream\r\n\r\n",
        image,
        f"\r\n--{boundary}--\r\n".encode(),
    ])
    head = (f"POST {path}?model={model} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            + (f"X-API-Key: {api_key}\r\n" if api_key else "")
            + f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bool:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                   if line.lower().startswith("content-length:")), None)
    if length is None:
        raise ConnectionError("answer without Content-Length")
    body = await reader.readexactly(length)
    return status == 200 and b'"probability_covid"' in body


async def _run(*, url: str, model: str, images: list[bytes], concurrency: int, total: int,
               path: str, warmup: int, api_key: str | None) -> tuple[list[float], int, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    encoded = [encode_request(host=host, port=port, path=path, model=model, image=image, api_key=api_key)
               for image in images]
    latencies: list[float] = []
    errors = 0
    next_index = 0

    connections = [await asyncio.open_connection(host, port) for _ in range(concurrency)]
    for index in range(max(warmup, concurrency)):  # not timed: first use of each connection
        reader, writer = connections[index % concurrency]
        await _exchange(reader, writer, encoded[index % len(encoded)])

    async def drive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal errors, next_index
        try:
            while next_index < total:
                index, next_index = next_index, next_index + 1
                started = time.perf_counter()
                try:
                    ok = await _exchange(reader, writer, encoded[index % len(encoded)])
                except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
                    ok = False  # a broken answer: count it and carry on over a new connection
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                latencies.append(time.perf_counter() - started)
                errors += 0 if ok else 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(drive(reader, writer) for reader, writer in connections))
    return latencies, errors, time.perf_counter() - started


def run_load(*, url: str, model: str, images: list[bytes], concurrency: int, total: int,
             path: str = "/predict", warmup: int = 4, api_key: str | None = None) -> LoadResult:
    """Send `total` timed requests over `concurrency` connections cycling through `images`."""
    loop_factory = None  # plain asyncio works too, with a little more client CPU
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        latencies, errors, elapsed = runner.run(_run(url=url, model=model, images=images, concurrency=concurrency,
                                                     total=total, path=path, warmup=warmup,
                                                     api_key=api_key))
    milliseconds = np.array(latencies) * 1000
    return LoadResult(model=model, concurrency=concurrency, requests=total, errors=errors,
                      seconds=elapsed, throughput_rps=total / elapsed,
                      p50_ms=float(np.percentile(milliseconds, 50)),
                      p95_ms=float(np.percentile(milliseconds, 95)),
                      p99_ms=float(np.percentile(milliseconds, 99)))


def load_images(folder: Path, count: int = 16) -> list[bytes]:
    """`count` slices spread evenly over every PNG/JPEG under `folder` (sorted), so the sample
    has the data set's mix of classes, formats and sizes rather than one paper's crops."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise SystemExit(f"no PNG/JPEG images under {folder}")
    step = len(paths) / min(count, len(paths))
    return [paths[int(index * step)].read_bytes() for index in range(min(count, len(paths)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
