"""Benchmark of the inference service against its limits and a naive baseline, in one run.

Measures on this machine, for each model and the ensemble, over the same 16 real CT slices
(spread evenly over the data set: both classes, PNG and JPEG, the sizes it has):
  * in-process limits (no HTTP), with the models loaded as the service loads them and the
    service's own functions: decode + screening + preprocessing of each slice; the forward
    pass (probability and the gate's features) at batch 1 and at the best batch size; and
    the whole pipeline (slices decoded, screened and preprocessed on every core, fed to the
    best batch, calibrated, gated and decided);
  * the service (`ctscan serve inference`): p50 at concurrency 1 and throughput at 16;
  * a whole study (150 CT-MD slices in one ZIP) against the same work in-process;
  * a naive server calling Keras `model.predict` once per request, at concurrency 16;
and the service's resident memory once every model and every Grad-CAM model is built, and
after 2,000 more requests.
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
from bench.results import RESULTS_DIR, save_and_print  # noqa: E402
from ctscan.models import ensemble_members  # noqa: E402

MODELS = ensemble_members()  # the served ensemble, from the registry
TARGET_LATENCY_RATIO = 1.3
TARGET_THROUGHPUT_RATIO = 0.90
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


def served_models(store_url: str, images_dir: str) -> tuple[Any, dict[str, Any], Any]:
    """The models as the service loads them (`ModelRegistry.load_version`: the stored ONNX
    copy or TensorFlow, the same thread settings, the gate, the calibration), in this process."""
    from ctscan.settings import InferenceSettings
    from ctscan.storage.store import open_store
    from services.inference.metrics import InferenceMetrics
    from services.inference.registry import ModelRegistry

    settings = InferenceSettings(models=list(MODELS), reload_poll_seconds=0, warmup_gradcam=False,
                                 verification_dir=images_dir)
    store = open_store(store_url)
    registry = ModelRegistry(settings=settings, store=store, metrics=InferenceMetrics())
    entries = {name: registry.load_version(name, store.production(name), warm_explainer=False) for name in MODELS}
    for served in entries.values():
        registry._install(served)
    registry.update_ensemble(warm_explainer=False)  # its pinned versions, as the service serves them
    return registry, entries, registry.ensemble


def screen_upload(data: bytes, entries: list[Any]) -> Any:
    """What the service does to an upload before a model sees it (the same function): decode,
    screen (modality, colour, grey levels, roughness, lungs), preprocess, resize."""
    from ctscan.imaging.decoding import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE
    from services.inference.prediction import _decode_and_screen, sniff_format

    return _decode_and_screen(sniff_format(data), data, entries, max_pixels=DEFAULT_MAX_PIXELS,
                              max_side=DEFAULT_MAX_SIDE)


def batch_outputs(entry: Any) -> Any:
    """The batcher's forward pass for `entry` (probability and gate distance per image)."""
    from services.inference.registry import _raw_and_distance

    return _raw_and_distance(entry.predictor, entry.gate)


def decide(entries: list[Any], rows: list[Any], rule: Any) -> Any:
    """Calibration, gate and (for the ensemble) the ensemble rule: the service's decision."""
    from ctscan.serving.predictor import slice_decision
    from services.inference.prediction import member_output

    return slice_decision([member_output(e, r) for e, r in zip(entries, rows, strict=True)], ensemble=rule)


def pipeline_images_per_s(entries: list[Any], forward: list[Any], images: list[bytes], batch_size: int, total: int,
                          rule: Any = None) -> float:
    """Everything the service does for `total` uploads, without HTTP: decoded, screened and
    preprocessed on every core, each model's forward pass in batches, each slice decided."""
    def flush(waiting: list[Any]) -> None:
        accepted = [s for s in waiting if s.refusal is None]
        if not accepted:
            return
        per_model = [run(np.stack([s.inputs[i] for s in accepted])) for i, run in enumerate(forward)]
        for n in range(len(accepted)):
            decide(entries, [tuple(float(v) for v in rows[n]) for rows in per_model], rule)

    started = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        waiting: list[Any] = []
        for screened in pool.map(lambda data: screen_upload(data, entries),
                                 (images[i % len(images)] for i in range(total))):
            waiting.append(screened)
            if len(waiting) == batch_size:
                flush(waiting)
                waiting = []
        flush(waiting)
    return total / (time.perf_counter() - started)


def in_process(store_url: str, images: list[bytes], *, quick: bool, images_dir: str,
               study_slices: list[bytes] | None = None) -> dict[str, Any]:
    """Limits measured without HTTP, on the slices the load generator sends, with the models
    loaded as the service loads them and the service's own functions."""
    from bench.study import in_process_limit
    from services.inference.prediction import ensemble_rule

    registry, served, ensemble = served_models(store_url, images_dir)
    repeats = 8 if quick else 30
    batch_sizes = (1, 4, 16) if quick else (1, 2, 4, 8, 16)
    pipeline_total = 96 if quick else 960
    results: dict[str, Any] = {}
    try:
        for name in (*MODELS, "ensemble"):
            entries = list(ensemble.entries) if name == "ensemble" else [served[name]]
            rule = ensemble_rule(ensemble) if name == "ensemble" else None
            forward = [batch_outputs(entry) for entry in entries]
            decode_ms = [1000 * _time_call(lambda data, entries=entries: screen_upload(data, entries), data, repeats)
                         for data in images]
            sample = screen_upload(images[0], entries).inputs  # one model input per member

            def forward_all(batches: list[np.ndarray], forward: list[Any] = forward) -> None:
                for run, batch in zip(forward, batches, strict=True):
                    run(batch)

            per_batch = {}
            for batch_size in batch_sizes:
                batches = [np.repeat(pixels[None], batch_size, axis=0) for pixels in sample]
                timed = repeats if batch_size <= 4 else max(3, repeats // 3)
                per_batch[batch_size] = batch_size / _time_call(forward_all, batches, timed)
            best = max(per_batch, key=lambda b: per_batch[b])
            batch1_ms = 1000 / per_batch[1]
            results[name] = {
                "backend": "+".join(e.predictor.backend for e in entries),
                "decode_ms": decode_ms, "batch1_ms": batch1_ms, "best_batch": best,
                "best_images_per_s": per_batch[best],
                # p50 over the slices of decode + batch-1 inference: what the service's p50 at
                # concurrency 1 is compared with (plus the HTTP floor).
                "p50_decode_plus_batch1_ms": float(np.median([d + batch1_ms for d in decode_ms])),
                "pipeline_images_per_s": pipeline_images_per_s(entries, forward, images, best, pipeline_total, rule),
            }
        if study_slices is not None:
            results["study"] = in_process_limit(list(ensemble.entries), study_slices, rule=ensemble_rule(ensemble))
    finally:
        for entry in registry.in_use():  # production's and any pinned for the ensemble alone
            entry.batcher.close()
        if hasattr(registry, "decoder"):  # (a service before the bounded decode pool has none)
            registry.decoder.shutdown()
    return results


def _build_explainers(url: str, image: bytes) -> None:
    """One explained ensemble request: every member's Keras model and Grad-CAM are built (the
    service builds them after readiness, in the background), so memory is measured with them."""
    response = requests.post(url + "/predict", files={"file": ("slice.png", image, "application/octet-stream")},
                             params={"model": "ensemble", "explain": "true"}, timeout=900)
    response.raise_for_status()


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from bench.study import as_zip, build_series, service_runs

    images = load_images(Path(args.images), 16)
    study_slices = build_series(Path(args.ctmd))
    # Multiples of the 16 slices (each weighs the same); at concurrency 16 long enough (5-15 s
    # a model) that one hiccup of this shared machine does not move the figure much.
    single_requests = 48 if args.quick else 640
    concurrent_requests = 64 if args.quick else 1600
    soak_requests = 2000  # the memory target is over at least 2,000 requests, quick or not
    logs = RESULTS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"created_at": datetime.now(UTC).isoformat(), "quick": args.quick,
                              "store": args.store, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                              "command": " ".join([Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]])}

    # 1. The service.
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    service = _start([sys.executable, "-m", "ctscan.cli", "serve", "inference", "--port", str(port)],
                     {"CTSCAN_MODEL_STORE": args.store, "INFERENCE_RELOAD_POLL_SECONDS": "0",
                      "INFERENCE_LOG_LEVEL": "warning", "INFERENCE_VERIFICATION_DIR": args.images,
                      # Like the naive server it is compared with: no API keys.
                      "INFERENCE_AUTH": "off"}, url, "/readyz", logs / "service.log")
    try:
        report["backends"] = requests.get(url + "/readyz", timeout=10).json()["backends"]
        _build_explainers(url, images[0])
        report["rss_after_warmup_mb"] = _rss_mb(service.pid)
        service_results: dict[str, Any] = {}
        for name in (*MODELS, "ensemble"):
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
        archive = as_zip(study_slices)
        service_runs(url, archive, explain=False, repeats=1)  # warm-up
        report["study_service"] = service_runs(url, archive, explain=False, repeats=1 if args.quick else 3)
        rss_before = _rss_mb(service.pid)
        soak = run_load(url=url, model="ensemble", images=images, concurrency=8, total=soak_requests)
        report["soak"] = {"requests": soak_requests, "model": "ensemble", "errors": soak.errors,
                          "throughput_rps": soak.throughput_rps, "p50_ms": soak.p50_ms,
                          "rss_before_mb": rss_before, "rss_after_mb": _rss_mb(service.pid)}
    finally:
        _stop(service)

    # 2. In-process limits (after the service is gone, so they do not share the CPUs).
    report["in_process"] = in_process(args.store, images, quick=args.quick, images_dir=args.images,
                                      study_slices=study_slices)

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
    report["load_average_after"] = os.getloadavg()
    return report


def _mark(met: bool) -> str:
    return "met" if met else "**missed**"


def render(report: dict[str, Any]) -> str:
    """The docs' tables: absolute numbers and ratios against limits measured in this run."""
    load = report.get("load_average", (float("nan"),) * 3)
    head = (f"Command: `{report['command']}` ({'quick' if report['quick'] else 'full'} mode, "
            f"{report['cpu_count']} CPUs, {report['created_at'][:19]}Z, load average "
            f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the start)")
    http_ms = report["http_floor"]["p50_ms"]
    latency = [
        ("| model | backend | in-process p50: decode + batch 1 (ms) | + HTTP floor (ms) | service p50 @1 (ms) "
         "| ratio (target ≤ 1.3) |"),
        "|---|---|---|---|---|---|",
    ]
    throughput = [
        ("| model | in-process best batch, inference only (img/s) | in-process pipeline: decode + screening + "
         "preprocessing + gate + calibration + inference (img/s) | service @16 (req/s) | ratio (target ≥ 0.90) "
         "| naive @16 (req/s) | speed-up |"),
        "|---|---|---|---|---|---|---|",
    ]
    for name in (*MODELS, "ensemble"):
        limits = report["in_process"][name]
        service = report["service"][name]
        p50, rps = service["c1"]["p50_ms"], service["c16"]["throughput_rps"]
        floor_ms = limits["p50_decode_plus_batch1_ms"] + http_ms
        latency.append(f"| {name} | {limits['backend']} | {limits['p50_decode_plus_batch1_ms']:.1f} | {floor_ms:.1f} "
                       f"| {p50:.1f} | {p50 / floor_ms:.2f} ({_mark(p50 / floor_ms <= TARGET_LATENCY_RATIO)}) |")
        pipeline = limits["pipeline_images_per_s"]
        naive = report["naive"].get(name)
        naive_cells = (f"{naive['throughput_rps']:.1f} | {rps / naive['throughput_rps']:.1f}×" if naive else "– | –")
        throughput.append(
            f"| {name} | {limits['best_images_per_s']:.0f} (batch {limits['best_batch']}) | {pipeline:.0f} | {rps:.0f} "
            f"| {rps / pipeline:.2f} ({_mark(rps / pipeline >= TARGET_THROUGHPUT_RATIO)}) | {naive_cells} |")
    lines = [head, "", *latency, "", f"HTTP floor: p50 {http_ms:.2f} ms at concurrency 1 for the same uploads refused "
             "before decoding (HTTP, multipart and routing only; load generator included).", "", *throughput]
    if "study_service" in report and "study" in report["in_process"]:
        study, limit = report["study_service"], report["in_process"]["study"]
        ratio = study["slices_per_s"] / limit["slices_per_s"]
        lines += ["", "| whole study (ensemble, no heatmaps) | slices | service (s) | service (slices/s) "
                  "| in-process limit (slices/s) | ratio (target ≥ 0.90) |", "|---|---|---|---|---|---|",
                  f"| CT-MD series as one ZIP | {study['slices']} | {study['seconds']:.1f} "
                  f"| {study['slices_per_s']:.1f} | {limit['slices_per_s']:.1f} "
                  f"| {ratio:.2f} ({_mark(ratio >= TARGET_THROUGHPUT_RATIO)}) |"]
    soak = report["soak"]
    built = report["rss_after_warmup_mb"]
    before = soak.get("rss_before_mb", built)
    growth = (soak["rss_after_mb"] - before) / before
    lines += ["", f"Resident memory: {built:.0f} MB with every model loaded and every Grad-CAM model built; "
              f"{before:.0f} MB after the loads above (the allocator's and runtimes' working size at concurrency "
              f"16 and for a whole study: {(before - built) / built * 100:+.1f} %); after {soak['requests']} more "
              f"ensemble requests at concurrency 8 ({soak.get('throughput_rps', 0):.0f} req/s, errors: "
              f"{soak['errors']}): {soak['rss_after_mb']:.0f} MB ({growth * 100:+.1f} % over the soak, target "
              f"≤ {TARGET_MEMORY_GROWTH * 100:.0f} %: {_mark(growth <= TARGET_MEMORY_GROWTH)}; "
              f"{(soak['rss_after_mb'] - built) / built * 100:+.1f} % since everything was built)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=os.environ.get("CTSCAN_MODEL_STORE", str(REPO_ROOT / "var" / "model-store")))
    parser.add_argument("--images", default=os.environ.get(
        "CTSCAN_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data" / "ucsd-covid-ct")),
        help="folder of CT slices; 16 are taken evenly spread over its sorted PNG/JPEG files")
    parser.add_argument("--ctmd", default=str(REPO_ROOT.parent / "shared" / "data" / "covid-ct-md-sample"),
                        help="the CT-MD sample: a 150-slice series of one of its studies is the whole-study row")
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats (a few minutes)")
    parser.add_argument("--from-json", type=Path, help="only render the table of an earlier run")
    args = parser.parse_args()
    if args.from_json:
        print(render(json.loads(args.from_json.read_text())))
        return
    report = benchmark(args)
    save_and_print(report, render, prefix="")


if __name__ == "__main__":
    main()
