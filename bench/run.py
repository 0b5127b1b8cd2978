"""Benchmark of the inference service against its limits and a naive baseline, in one run.

Measures on this machine, for each model:
  * in-process limits: TensorFlow graph and ONNX Runtime at batch 1 (latency) and the best
    batch size (throughput), plus decoding + resizing time of a real slice;
  * the service (`ctscan serve inference`): p50 at concurrency 1 and throughput at 16;
  * a naive server calling Keras `model.predict` once per request, at concurrency 16;
and the service's resident memory after warm-up (all models loaded) and after N requests.
Writes bench/results/<timestamp>.json and a Markdown table (bench/results/latest.md).

    python -m bench.run --store var/model-store            # full run (2,000 requests)
    python -m bench.run --store STORE --quick              # minutes: fewer requests
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python bench/run.py` (the Makefile's bench target)
    sys.path.insert(0, str(REPO_ROOT))

from bench.loadgen import load_images, run_load  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
MODELS = ("inceptionv3", "densenet121", "mobilenetv2")
TARGET_LATENCY_RATIO = 1.3
TARGET_THROUGHPUT_RATIO = 0.85
TARGET_NAIVE_SPEEDUP = 10.0
TARGET_MEMORY_GROWTH = 0.10


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _start(command: list[str], env: dict[str, str], url: str, ready_path: str, log: Path,
           timeout: float = 900) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=log.open("wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command} exited; see {log}")
        try:
            if requests.get(url + ready_path, timeout=5).status_code == 200:
                return process
        except requests.ConnectionError:
            pass
        time.sleep(1)
    _stop(process)
    raise SystemExit(f"{command} not ready after {timeout}s; see {log}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _time_call(function: Any, argument: Any, repeats: int) -> float:
    """Median seconds of `repeats` calls (after one warm-up call)."""
    function(argument)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function(argument)
        samples.append(time.perf_counter() - started)
    return float(np.median(samples))


def in_process(store_url: str, images: list[bytes], *, quick: bool) -> dict[str, Any]:
    """Limits measured without HTTP: decode, then TF graph and ONNX at batch 1 and best batch."""
    from ctscan.imaging import decode_image, resize_for_model
    from ctscan.onnx_runtime import build_fast_predictor, keras_predictor
    from ctscan.store import load_keras_model, open_store

    store = open_store(store_url)
    repeats = 5 if quick else 20
    batch_sizes = (1, 4, 16) if quick else (1, 2, 4, 8, 16, 32)
    results: dict[str, Any] = {}
    for name in MODELS:
        model, card = load_keras_model(store, name)
        size = int(card["input_size"])
        decode_s = _time_call(lambda data, size=size: resize_for_model(decode_image(data).pixels, size),
                              images[0], repeats)
        slices = np.stack([resize_for_model(decode_image(d).pixels, size) for d in images[:4]])
        backends = {"tensorflow": keras_predictor(model)}
        fast = build_fast_predictor(model, slices, weights_sha256=card.get("weights_sha256"),
                                    cache_dir=REPO_ROOT / "var" / "onnx-cache")  # as the service
        if fast.backend == "onnxruntime":
            backends["onnxruntime"] = fast.predict
        entry: dict[str, Any] = {"decode_ms": decode_s * 1000, "input_size": size,
                                 "onnx_fallback_reason": fast.fallback_reason}
        for backend, predict in backends.items():
            per_batch = {}
            for batch_size in batch_sizes:
                batch = np.repeat(slices[:1], batch_size, axis=0)
                per_batch[batch_size] = batch_size / _time_call(predict, batch, max(2, repeats // 2))
            best = max(per_batch, key=lambda b: per_batch[b])
            entry[backend] = {"batch1_ms": 1000 / per_batch[1], "best_batch": best,
                              "best_images_per_s": per_batch[best]}
        results[name] = entry
    return results


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    images = load_images(Path(args.images), 16)
    single_requests = 20 if args.quick else 100
    concurrent_requests = 64 if args.quick else 400
    soak_requests = 200 if args.quick else 2000
    logs = RESULTS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"created_at": datetime.now(UTC).isoformat(), "quick": args.quick,
                              "store": args.store, "cpu_count": os.cpu_count(),
                              "command": " ".join([Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]])}

    # 1. The service.
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    service = _start([sys.executable, "-m", "ctscan.cli", "serve", "inference", "--port", str(port)],
                     {"CTSCAN_MODEL_STORE": args.store, "INFERENCE_RELOAD_POLL_SECONDS": "0",
                      "INFERENCE_LOG_LEVEL": "warning"}, url, "/readyz", logs / "service.log")
    try:
        report["backends"] = requests.get(url + "/readyz", timeout=10).json()["backends"]
        report["rss_after_warmup_mb"] = _rss_mb(service.pid)
        service_results: dict[str, Any] = {}
        for name in MODELS:
            service_results[name] = {
                "c1": run_load(url=url, model=name, images=images, concurrency=1, total=single_requests).__dict__,
                "c16": run_load(url=url, model=name, images=images, concurrency=16,
                                total=concurrent_requests).__dict__,
            }
        report["service"] = service_results
        rss_before = _rss_mb(service.pid)
        soak = run_load(url=url, model="ensemble", images=images, concurrency=8, total=soak_requests)
        report["soak"] = {"requests": soak_requests, "model": "ensemble", "errors": soak.errors,
                          "rss_before_mb": rss_before, "rss_after_mb": _rss_mb(service.pid)}
    finally:
        _stop(service)

    # 2. In-process limits (after the service is gone, so they do not share the CPUs).
    report["in_process"] = in_process(args.store, images, quick=args.quick)

    # 3. The naive server, one model at a time.
    naive: dict[str, Any] = {}
    for name in MODELS:
        port = _free_port()
        naive_url = f"http://127.0.0.1:{port}"
        process = _start([sys.executable, "-m", "bench.naive_server", "--store", args.store, "--model", name,
                          "--port", str(port)], {}, naive_url, "/healthz", logs / f"naive-{name}.log")
        try:
            naive[name] = run_load(url=naive_url, model=name, images=images, concurrency=16,
                                   total=max(32, concurrent_requests // 4)).__dict__
        finally:
            _stop(process)
    report["naive"] = naive
    return report


def render(report: dict[str, Any]) -> str:
    """The README table: absolute numbers and ratios against the limits measured in this run."""
    lines = [
        (f"Command: `{report['command']}` ({'quick' if report['quick'] else 'full'} mode, "
         f"{report['cpu_count']} CPUs, {report['created_at'][:19]}Z)"),
        "",
        ("| model | backend | in-process batch-1 + decode (ms) | service p50 @1 (ms) | ratio (target ≤ 1.3) "
         "| in-process best batch (img/s) | service @16 (req/s) | ratio (target ≥ 0.85) "
         "| naive @16 (req/s) | speed-up (target ≥ 10) |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        limits = report["in_process"][name]
        backend = report["backends"].get(name, "tensorflow")
        limit = limits.get(backend) or limits["tensorflow"]
        floor_ms = limit["batch1_ms"] + limits["decode_ms"]
        service = report["service"][name]
        naive_rps = report["naive"][name]["throughput_rps"]
        lines.append(
            f"| {name} | {backend} | {floor_ms:.1f} | {service['c1']['p50_ms']:.1f} | "
            f"{service['c1']['p50_ms'] / floor_ms:.2f} | {limit['best_images_per_s']:.1f} (batch "
            f"{limit['best_batch']}) | {service['c16']['throughput_rps']:.1f} | "
            f"{service['c16']['throughput_rps'] / limit['best_images_per_s']:.2f} | {naive_rps:.1f} | "
            f"{service['c16']['throughput_rps'] / naive_rps:.1f}× |")
    soak = report["soak"]
    growth = (soak["rss_after_mb"] - report["rss_after_warmup_mb"]) / report["rss_after_warmup_mb"]
    lines += [
        "",
        (f"Resident memory after warm-up (three models): {report['rss_after_warmup_mb']:.0f} MB; after "
         f"{soak['requests']} more ensemble requests: {soak['rss_after_mb']:.0f} MB "
         f"({growth * 100:+.1f} %, target < {TARGET_MEMORY_GROWTH * 100:.0f} %); errors: {soak['errors']}."),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=os.environ.get("CTSCAN_MODEL_STORE", str(REPO_ROOT / "var" / "model-store")))
    parser.add_argument("--images", default=str(REPO_ROOT.parent / "shared" / "data" / "ucsd-covid-ct" / "CT_COVID"))
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats (a few minutes)")
    parser.add_argument("--from-json", type=Path, help="only render the table of an earlier run")
    args = parser.parse_args()
    if args.from_json:
        print(render(json.loads(args.from_json.read_text())))
        return
    report = benchmark(args)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS_DIR / f"{stamp}.json").write_text(json.dumps(report, indent=2))
    table = render(report)
    (RESULTS_DIR / "latest.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
