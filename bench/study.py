"""Throughput of whole-study prediction (POST /predict/study) against the in-process limit.

A 150-slice series is built from a CT-MD study (its JPEG-Lossless slices, each written twice
at interleaved positions: a thin-slice series of one patient), zipped as a PACS export is.
Measured in one run on this machine:
  * the service: seconds per study (ZIP upload to answer, heatmaps of the top slices off and
    on), and slices per second;
  * the in-process limit: the same slices decoded, screened and preprocessed on every core
    and fed to each model's stored ONNX copy in batches, no HTTP (`limit`).
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

from bench.run import MODELS, RESULTS_DIR, _free_port, _start, _stop  # noqa: E402

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


def in_process_limit(store_url: str, slices: list[bytes], *, batch_size: int = 16) -> dict[str, Any]:
    """Slices per second for decoding, screening and preprocessing on every core plus the
    three models' ONNX copies at `batch_size`, in this process."""
    from ctscan.imaging import decode_image
    from ctscan.onnx_runtime import onnx_predictor
    from ctscan.preprocessing import LUNG_V1, card_preprocessing, get_preprocessor, prepare
    from ctscan.storage.store import open_store

    store = open_store(store_url)
    members = []
    for name in MODELS:
        version = store.production(name)
        card = store.card(name, version)
        copy = store.onnx_copy(name, version)
        if copy is None:
            raise SystemExit(f"{name} {version} has no ONNX copy: run `make setup` (ctscan models export-onnx)")
        members.append((card.input_size, card_preprocessing(card), onnx_predictor(copy[0], spinning=False)))

    def screen(data: bytes) -> list[np.ndarray] | None:
        decoded = decode_image(data)
        screened = prepare(decoded, LUNG_V1)
        if not screened.lungs_visible:
            return None
        return [(screened if pre == LUNG_V1 else get_preprocessor(pre)(decoded)).model_input(size)
                for size, pre, _ in members]

    started = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        inputs = [item for item in pool.map(screen, slices) if item is not None]
    screened_at = time.perf_counter()
    for index, (_, _, predict) in enumerate(members):
        batch = [item[index] for item in inputs]
        for start in range(0, len(batch), batch_size):
            predict(np.stack(batch[start:start + batch_size]))
    finished = time.perf_counter()
    return {"slices": len(slices), "classified": len(inputs), "screening_s": screened_at - started,
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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    slices = build_series(args.ctmd)
    archive = as_zip(slices)
    limit = in_process_limit(args.store, slices)
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
              "slices": len(slices), "zip_bytes": len(archive), "limit": limit, "service": plain,
              "service_with_heatmaps": explained, "ratio": plain["slices_per_s"] / limit["slices_per_s"]}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS_DIR / f"study-{stamp}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"\n{len(slices)}-slice study (ZIP, {len(archive) / 1e6:.0f} MB, ensemble of three models): service "
          f"{plain['seconds']:.1f} s per study ({plain['slices_per_s']:.1f} slices/s; with the top slices' "
          f"heatmaps {explained['seconds']:.1f} s); in-process limit {limit['seconds']:.1f} s "
          f"({limit['slices_per_s']:.1f} slices/s); ratio {report['ratio']:.2f}")


if __name__ == "__main__":
    main()
