"""Throughput of whole-study prediction (POST /predict/study) against the in-process limit.

A 150-slice series is built from a CT-MD study (its JPEG-Lossless slices, each written twice
at interleaved positions: a thin-slice series of one patient), zipped as a PACS export is.
Measured in one run on this machine:
  * the service: seconds per study (ZIP upload to answer, heatmaps of the top slices off and
    on), and slices per second;
  * the in-process limit: the same slices through the service's own per-slice function
    (decode, screening, preprocessing) on every core, the models as the service loads them
    (forward pass with the gate's features) in batches, decisions and aggregation (`limit`).
The ratio service / limit says what the HTTP upload, unpacking, ordering and batching cost.

    python -m bench.study --store var/model-store --ctmd ../shared/data/covid-ct-md-sample
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from bench.run import RESULTS_DIR, _free_port, _start, _stop  # noqa: E402

SLICES = 150


def build_series(ctmd_dir: Path, study: str = "P001", count: int = SLICES) -> list[bytes]:
    """`count` slices of one CT-MD study: every slice, then again shifted by half a step."""
    import csv

    import pydicom

    with (ctmd_dir / "labels.csv").open(newline="") as handle:
        rows = sorted((r for r in csv.DictReader(handle) if r["study"] == study), key=lambda r: int(r["slice_index"]))
    slices: list[bytes] = []
    shift = 0.0
    while len(slices) < count:
        for row in rows:
            if len(slices) == count:
                break
            dataset = pydicom.dcmread(ctmd_dir / row["path"])
            position = list(dataset.ImagePositionPatient)
            dataset.ImagePositionPatient = [position[0], position[1], float(position[2]) + shift]
            if "SliceLocation" in dataset:
                dataset.SliceLocation = float(dataset.SliceLocation) + shift
            buffer = io.BytesIO()
            dataset.save_as(buffer)
            slices.append(buffer.getvalue())
        shift += 1.0
    return slices


def as_zip(slices: list[bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:  # DICOM is compressed already
        for index, data in enumerate(slices):
            archive.writestr(f"export/IM{index:05d}", data)
    return buffer.getvalue()


def in_process_limit(entries: list[Any], slices: list[bytes], *, rule: Any, batch_size: int = 16) -> dict[str, Any]:
    """Slices per second for what the service does with a study, without HTTP: the same
    per-slice function (decode, screening, preprocessing) on every core, each model's forward
    pass (probability and gate distance) in batches, the decisions, ordering and aggregation."""
    from bench.run import batch_outputs
    from ctscan.imaging.decoding import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE
    from ctscan.serving.predictor import SliceResult, slice_decision, study_decision
    from ctscan.study import order_series
    from services.inference.prediction import member_output, sniff_format
    from services.inference.study import _expand, _screen

    forward = [batch_outputs(entry) for entry in entries]

    def screen(index: int) -> Any:
        return _screen(sniff_format(slices[index]), slices[index], entries, index, max_pixels=DEFAULT_MAX_PIXELS,
                       max_side=DEFAULT_MAX_SIDE)

    started = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        items = list(pool.map(screen, range(len(slices))))
    screened_at = time.perf_counter()
    accepted = [item for item in items if item.refusal is None]
    for member, run in enumerate(forward):
        for start in range(0, len(accepted), batch_size):
            part = accepted[start:start + batch_size]
            rows = run(np.stack([_expand(item.inputs[member]) for item in part]))
            for item, row in zip(part, rows, strict=True):
                item.rows = [*(item.rows or []), tuple(float(v) for v in row)]
    ordered = order_series([item.info for item in items])
    results = []
    for entry in ordered:
        item = items[entry.upload_index]
        if item.refusal is not None or item.rows is None:
            results.append(SliceResult(item.refusal))
            continue
        outputs = [member_output(served, row) for served, row in zip(entries, item.rows, strict=True)]
        results.append(SliceResult(slice_decision(outputs, ensemble=rule), outputs))
    study_decision(results, threshold=rule.threshold, band=rule.band)
    finished = time.perf_counter()
    return {"slices": len(slices), "classified": len(accepted), "screening_s": screened_at - started,
            "inference_s": finished - screened_at, "seconds": finished - started,
            "slices_per_s": len(slices) / (finished - started)}


def service_runs(url: str, archive: bytes, *, explain: bool, repeats: int) -> dict[str, Any]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        response = requests.post(url + "/predict/study", files=[("file", ("series.zip", archive, "application/zip"))],
                                 params={"model": "ensemble", "explain": "true" if explain else "false"}, timeout=900)
        seconds.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise SystemExit(f"study request failed: {response.status_code} {response.text[:300]}")
    body = response.json()
    median = float(np.median(seconds))
    return {"seconds": median, "all_seconds": [round(s, 2) for s in seconds], "slices": body["slice_count"],
            "slices_per_s": body["slice_count"] / median, "outcome": body["outcome"],
            "skipped": body["skipped"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--ctmd", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "covid-ct-md-sample")
    parser.add_argument("--images", default=str(REPO_ROOT.parent / "shared" / "data" / "ucsd-covid-ct"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from bench.run import served_models
    from services.inference.prediction import ensemble_rule

    slices = build_series(args.ctmd)
    archive = as_zip(slices)
    registry, served, ensemble = served_models(args.store, args.images)
    try:
        limit = in_process_limit(list(served.values()), slices, rule=ensemble_rule(ensemble))
    finally:
        for entry in served.values():
            entry.batcher.close()
        registry.decoder.shutdown()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    log = RESULTS_DIR / f"study-service-{port}.log"
    env = {"CTSCAN_MODEL_STORE": str(args.store), "INFERENCE_RELOAD_POLL_SECONDS": "0", "TF_CPP_MIN_LOG_LEVEL": "2",
           "INFERENCE_MAX_STUDY_BYTES": str(1 << 30),
           "INFERENCE_AUTH": "off"}  # the in-process limit it is compared with has no keys either
    process = _start([sys.executable, "-m", "ctscan.cli", "serve", "inference", "--port", str(port)], env, url,
                     "/readyz", log)
    try:
        service_runs(url, archive, explain=False, repeats=1)  # warm-up: first-time shapes, Grad-CAM traces
        plain = service_runs(url, archive, explain=False, repeats=args.repeats)
        explained = service_runs(url, archive, explain=True, repeats=args.repeats)
    finally:
        _stop(process)
    report = {"when": datetime.now(UTC).isoformat(), "cpus": os.cpu_count(), "store": str(args.store),
              "load_average": os.getloadavg(), "slices": len(slices), "zip_bytes": len(archive), "limit": limit,
              "service": plain, "service_with_heatmaps": explained,
              "ratio": plain["slices_per_s"] / limit["slices_per_s"]}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS_DIR / f"study-{stamp}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"\n{len(slices)}-slice study (ZIP, {len(archive) / 1e6:.0f} MB, ensemble of three models): service "
          f"{plain['seconds']:.1f} s per study ({plain['slices_per_s']:.1f} slices/s; with the top slices' "
          f"heatmaps {explained['seconds']:.1f} s); in-process limit {limit['seconds']:.1f} s "
          f"({limit['slices_per_s']:.1f} slices/s); ratio {report['ratio']:.2f}")


if __name__ == "__main__":
    main()
