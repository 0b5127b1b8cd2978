"""Benchmark of the inference service against its limits and a naive baseline, in one run.

Measures on this machine, for each model, over the same 16 real CT slices (spread evenly
over the data set: both classes, PNG and JPEG, the sizes it has):
  * in-process limits (no HTTP): decoding + resizing of each slice; TensorFlow graph and
    ONNX Runtime at batch 1 (latency) and at the best batch size (throughput); and the
    whole pipeline in-process (slices decoded on every core, fed to the best batch);
  * the service (`ctscan serve inference`): p50 at concurrency 1 and throughput at 16;
  * a naive server calling Keras `model.predict` once per request, at concurrency 16;
and the service's resident memory after warm-up (all models loaded) and after N requests.
The load generator and the service share this machine's cores (see bench/loadgen.py).
Writes bench/results/<timestamp>.json and a Markdown table (bench/results/latest.md).

    python -m bench.run --store var/model-store            # full run (about 6 minutes)
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
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python bench/run.py` (the Makefile's bench target)
    sys.path.insert(0, str(REPO_ROOT))

from bench.loadgen import load_images, run_load  # noqa: E402
from ctscan.models import ensemble_members  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
MODELS = ensemble_members()  # the served ensemble, from the registry
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


def _time_call(function: Any, argument: Any, repeats: int, warmup: int = 3) -> float:
    """Median seconds of `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        function(argument)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function(argument)
        samples.append(time.perf_counter() - started)
    return float(np.median(samples))


def model_input(data: bytes, size: int) -> np.ndarray:
    """What the service does to a slice before a model sees it: decode, screen for lungs and
    crop (lung-v1, the release's preprocessing), resize."""
    from ctscan.imaging import decode_image
    from ctscan.preprocessing import LUNG_V1, prepare

    return prepare(decode_image(data), LUNG_V1).model_input(size)


def pipeline_images_per_s(predict: Any, images: list[bytes], size: int, batch_size: int, total: int) -> float:
    """The service's work without HTTP: slices decoded on every core, fed in batches."""
    def prepare(data: bytes) -> np.ndarray:
        return model_input(data, size)

    started = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        waiting: list[np.ndarray] = []
        for pixels in pool.map(prepare, (images[i % len(images)] for i in range(total))):
            waiting.append(pixels)
            if len(waiting) == batch_size:
                predict(np.stack(waiting))
                waiting = []
        if waiting:
            predict(np.stack(waiting))
    return total / (time.perf_counter() - started)


def in_process(store_url: str, images: list[bytes], *, quick: bool) -> dict[str, Any]:
    """Limits measured without HTTP, on the slices the load generator sends."""
    from ctscan.models import load_keras_model
    from ctscan.onnx_runtime import keras_predictor, load_fast_predictor, onnx_predictor
    from ctscan.storage.store import open_store

    store = open_store(store_url)
    repeats = 8 if quick else 30
    batch_sizes = (1, 4, 16) if quick else (1, 2, 4, 8, 16, 32)
    pipeline_total = 96 if quick else 960
    results: dict[str, Any] = {}
    for name in MODELS:
        model, card = load_keras_model(store, name)
        size = card.input_size
        decode_ms = [1000 * _time_call(lambda data, size=size: model_input(data, size),
                                       data, repeats) for data in images]
        slices = np.stack([model_input(d, size) for d in images[:4]])
        onnx_copy = store.onnx_copy(name, str(card.version))  # the copy the service serves
        backends = {"tensorflow": keras_predictor(model)}
        fast = load_fast_predictor(model, onnx_copy, slices, weights_sha256=card.weights_sha256)
        pipelines: dict[str, Any] = {"tensorflow": [backends["tensorflow"]]}
        if fast.backend == "onnxruntime" and onnx_copy is not None:
            backends["onnxruntime"] = fast.predict  # ONNX Runtime's defaults: idle threads spin
            pipelines["onnxruntime"] = [fast.predict, onnx_predictor(onnx_copy[0], spinning=False)]
        entry: dict[str, Any] = {"decode_ms": decode_ms, "input_size": size,
                                 "onnx_fallback_reason": fast.fallback_reason}
        for backend, predict in backends.items():
            per_batch = {}
            for batch_size in batch_sizes:
                batch = np.repeat(slices[:1], batch_size, axis=0)
                timed = repeats if batch_size <= 4 else max(3, repeats // 3)
                per_batch[batch_size] = batch_size / _time_call(predict, batch, timed)
            best = max(per_batch, key=lambda b: per_batch[b])
            batch1_ms = 1000 / per_batch[1]
            # The best the pipeline can do, with either thread setting of ONNX Runtime.
            pipeline = max(pipeline_images_per_s(p, images, size, best, pipeline_total) for p in pipelines[backend])
            entry[backend] = {
                "batch1_ms": batch1_ms, "best_batch": best, "best_images_per_s": per_batch[best],
                # p50 over the slices of decode + batch-1 inference: what the service's p50 at
                # concurrency 1 is compared with.
                "p50_decode_plus_batch1_ms": float(np.median([d + batch1_ms for d in decode_ms])),
                "pipeline_images_per_s": pipeline,
            }
        results[name] = entry
    return results


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    images = load_images(Path(args.images), 16)
    # Multiples of the 16 slices (each weighs the same); at concurrency 16 long enough (5-15 s
    # a model) that one hiccup of this shared machine does not move the figure much.
    single_requests = 48 if args.quick else 640
    concurrent_requests = 64 if args.quick else 1600
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
                      "INFERENCE_LOG_LEVEL": "warning",
                      # Like the naive server it is compared with: no API keys.
                      "INFERENCE_AUTH": "off"}, url, "/readyz", logs / "service.log")
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
        # The HTTP floor: the same uploads refused (unknown model) after the multipart body is
        # read and before any decoding, i.e. what HTTP, multipart and routing cost alone.
        report["http_floor"] = run_load(url=url, model="no-such-model", images=images, concurrency=1,
                                        total=single_requests).__dict__
        rss_before = _rss_mb(service.pid)
        soak = run_load(url=url, model="ensemble", images=images, concurrency=8, total=soak_requests)
        report["soak"] = {"requests": soak_requests, "model": "ensemble", "errors": soak.errors,
                          "throughput_rps": soak.throughput_rps, "p50_ms": soak.p50_ms,
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
                                   total=max(32, concurrent_requests // 4)).__dict__  # 400: about 15 s each
        finally:
            _stop(process)
    report["naive"] = naive
    return report


def _mark(met: bool) -> str:
    return "met" if met else "**missed**"


def render(report: dict[str, Any]) -> str:
    """The README tables: absolute numbers and ratios against limits measured in this run."""
    head = (f"Command: `{report['command']}` ({'quick' if report['quick'] else 'full'} mode, "
            f"{report['cpu_count']} CPUs, {report['created_at'][:19]}Z)")
    latency = [
        ("| model | backend | in-process p50: decode + batch 1 (ms) | service p50 @1 (ms) | ratio (target ≤ 1.3) "
         "| ratio if HTTP were free (service − HTTP floor) |"),
        "|---|---|---|---|---|---|",
    ]
    throughput = [
        ("| model | in-process best batch, inference only (img/s) | in-process decode + best batch (img/s) "
         "| service @16 (req/s) | ratio to inference only (target ≥ 0.85) | ratio to decode + inference "
         "| naive @16 (req/s) | speed-up (target ≥ 10) | speed-up ceiling: decode + inference / naive |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    http_ms = report["http_floor"]["p50_ms"]
    for name in MODELS:
        limits = report["in_process"][name]
        backend = report["backends"].get(name, "tensorflow")
        measured = [limits[b] for b in ("tensorflow", "onnxruntime") if b in limits]
        floor_ms = min(m["p50_decode_plus_batch1_ms"] for m in measured)  # the faster backend
        best = max(measured, key=lambda m: m["best_images_per_s"])
        pipeline = max(m["pipeline_images_per_s"] for m in measured)
        service = report["service"][name]
        p50, rps = service["c1"]["p50_ms"], service["c16"]["throughput_rps"]
        naive_rps = report["naive"][name]["throughput_rps"]
        latency.append(f"| {name} | {backend} | {floor_ms:.1f} | {p50:.1f} | {p50 / floor_ms:.2f} "
                       f"({_mark(p50 / floor_ms <= TARGET_LATENCY_RATIO)}) | {(p50 - http_ms) / floor_ms:.2f} |")
        to_best = rps / best["best_images_per_s"]
        throughput.append(
            f"| {name} | {best['best_images_per_s']:.0f} (batch {best['best_batch']}) | {pipeline:.0f} | {rps:.0f} | "
            f"{to_best:.2f} ({_mark(to_best >= TARGET_THROUGHPUT_RATIO)}) "
            f"| {rps / pipeline:.2f} | {naive_rps:.1f} | {rps / naive_rps:.1f}× "
            f"({_mark(rps / naive_rps >= TARGET_NAIVE_SPEEDUP)}) | {pipeline / naive_rps:.1f}× |")
    soak = report["soak"]
    growth = (soak["rss_after_mb"] - report["rss_after_warmup_mb"]) / report["rss_after_warmup_mb"]
    memory = (f"Resident memory after warm-up (three models): {report['rss_after_warmup_mb']:.0f} MB; after "
              f"{soak['requests']} more ensemble requests at concurrency 8 ({soak.get('throughput_rps', 0):.0f} "
              f"req/s, errors: {soak['errors']}): {soak['rss_after_mb']:.0f} MB ({growth * 100:+.1f} %, target "
              f"< {TARGET_MEMORY_GROWTH * 100:.0f} %: {_mark(growth < TARGET_MEMORY_GROWTH)}).")
    http = (f"HTTP floor: p50 {http_ms:.2f} ms at concurrency 1 for the same uploads refused before decoding "
            "(HTTP, multipart and routing only; load generator included).")
    return "\n".join([head, "", *latency, "", http, "", *throughput, "", memory]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=os.environ.get("CTSCAN_MODEL_STORE", str(REPO_ROOT / "var" / "model-store")))
    parser.add_argument("--images", default=os.environ.get(
        "CTSCAN_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data" / "ucsd-covid-ct")),
        help="folder of CT slices; 16 are taken evenly spread over its sorted PNG/JPEG files")
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
