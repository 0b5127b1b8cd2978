"""Time `make up` from launch to the inference service's /readyz 200 (and the web page).

    python -m bench.startup [--runs N] [--keep-cache]

Each run starts `make up` with a private var folder (fresh model store seeded from models/,
fresh ONNX cache, for versions of the service that keep one, unless --keep-cache), free ports
and its own redis-server, waits for /readyz 200, records the seconds (from `make up`, and the
inference process's own as devstack counts them) and stops the stack with `make down`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def one_run(var_dir: Path, timeout_s: float) -> dict[str, float]:
    inference_port, web_port, redis_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CTSCAN_", "INFERENCE_", "WEB_", "CELERY_"))}
    env.update({
        "DEVSTACK_VAR_DIR": str(var_dir), "INFERENCE_PORT": str(inference_port), "WEB_PORT": str(web_port),
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "DEVSTACK_TIMEOUT": str(int(timeout_s)),
        # A cache of earlier ONNX conversions (older versions of the service keep one) lives
        # in the run's own folder, so a run without --keep-cache starts cold.
        "INFERENCE_ONNX_CACHE_DIR": str(var_dir / "onnx-cache"),
    })
    log = (var_dir.parent / f"{var_dir.name}-up.log").open("wb")
    started = time.monotonic()
    up = subprocess.Popen(["make", "up"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
    timings: dict[str, float] = {}
    try:
        while time.monotonic() - started < timeout_s and len(timings) < 2:
            if up.poll() is not None:
                raise SystemExit(f"make up exited with {up.returncode}; see {log.name}")
            for name, url in (("inference_ready_s", f"http://127.0.0.1:{inference_port}/readyz"),
                              ("web_healthy_s", f"http://127.0.0.1:{web_port}/healthz")):
                if name not in timings and answers(url):
                    timings[name] = round(time.monotonic() - started, 1)
            time.sleep(0.2)
    finally:
        subprocess.run(["make", "down"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=300, check=False)
        try:
            up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
        log.close()
    # devstack's own count, from the inference process's start: the service alone.
    found = re.search(r"inference is healthy \((\d+) s\)", Path(log.name).read_text(errors="replace"))
    if found:
        timings["inference_process_ready_s"] = float(found.group(1))
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--keep-cache", action="store_true",
                        help="reuse the first run's var folder (model store, ONNX cache) for later runs")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ctscan-startup-"))
    results = []
    try:
        for index in range(args.runs):
            var_dir = root / ("var" if args.keep_cache else f"var-{index}")
            result = one_run(var_dir, args.timeout)
            result["run"] = index + 1
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ready = sorted(r["inference_ready_s"] for r in results if "inference_ready_s" in r)
    if ready:
        median = (ready[(len(ready) - 1) // 2] + ready[len(ready) // 2]) / 2
        print(json.dumps({"runs": len(results), "inference_ready_s_median": round(median, 1),
                          "load_average": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
