"""What a slice costs before any model sees it, stage by stage, on one core.

The served path for one upload: decode (PNG/JPEG/DICOM -> greyscale, Hounsfield units) ->
lung-v1 (segmentation, standardisation, crop) -> screening (modality, colour, grey levels,
roughness, lungs) -> resize to the model's input. Measured in this process, one thread, on
real slices: UCSD PNG/JPEG (their own sizes, mostly under 512 px), CT-MD DICOM (512 x 512,
JPEG Lossless), and both enlarged to 1024 x 1024 (PNG; DICOM written uncompressed). The
target (issue 26): the median over all of them at most 8 ms.

    python -m bench.preprocessing                 # 16 slices of each kind, 15 repeats
    python -m bench.preprocessing --quick         # 8 slices of each kind, 5 repeats
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from bench.loadgen import load_images  # noqa: E402
from bench.results import save_and_print  # noqa: E402

TARGET_MEDIAN_MS = 8.0
MODEL_SIDE = 224  # DenseNet-121 and MobileNetV2; InceptionV3 takes 299
STAGES = ("decode", "lung_v1", "screening", "resize")


def _png(grey: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    return buffer.getvalue()


def _enlarged_png(data: bytes, side: int) -> bytes:
    from PIL import Image

    from ctscan.imaging.decoding import decode_image

    grey = decode_image(data).grey
    return _png(np.asarray(Image.fromarray(grey).resize((side, side), Image.Resampling.BILINEAR)))


def _enlarged_dicom(data: bytes, side: int) -> bytes:
    """The DICOM slice at `side` x `side`, uncompressed (its header kept)."""
    import pydicom
    from PIL import Image
    from pydicom.uid import ExplicitVRLittleEndian

    dataset = pydicom.dcmread(io.BytesIO(data))
    pixels = dataset.pixel_array.astype(np.float32)
    enlarged = np.asarray(Image.fromarray(pixels, mode="F").resize((side, side), Image.Resampling.BILINEAR))
    dataset.PixelData = enlarged.round().astype(dataset.pixel_array.dtype).tobytes()
    dataset.Rows = dataset.Columns = side
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def ctmd_slices(folder: Path, count: int) -> list[bytes]:
    with (folder / "labels.csv").open(newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: r["path"])
    step = len(rows) / min(count, len(rows))
    return [(folder / rows[int(i * step)]["path"]).read_bytes() for i in range(min(count, len(rows)))]


def slice_sets(ucsd: Path, ctmd: Path, count: int) -> dict[str, list[bytes]]:
    png = load_images(ucsd, count)
    dicom = ctmd_slices(ctmd, count)
    return {"ucsd_png": png, "ctmd_dicom_512": dicom,
            "ucsd_png_1024": [_enlarged_png(d, 1024) for d in png[: max(2, count // 2)]],
            "ctmd_dicom_1024": [_enlarged_dicom(d, 1024) for d in dicom[: max(2, count // 2)]]}


def time_stages(data: bytes) -> dict[str, float]:
    """Milliseconds of each stage of the served path for one upload."""
    from ctscan.imaging.formats import decode
    from ctscan.imaging.preprocessing import LUNG_V1, prepare
    from ctscan.serving.predictor import input_refusal

    started = time.perf_counter()
    decoded = decode(data)
    decoded_at = time.perf_counter()
    prepared = prepare(decoded, LUNG_V1)
    prepared_at = time.perf_counter()
    refusal = input_refusal(decoded, prepared)
    screened_at = time.perf_counter()
    if refusal is None:
        prepared.model_input(MODEL_SIDE)
    resized_at = time.perf_counter()
    return {"decode": 1000 * (decoded_at - started), "lung_v1": 1000 * (prepared_at - decoded_at),
            "screening": 1000 * (screened_at - prepared_at), "resize": 1000 * (resized_at - screened_at),
            "total": 1000 * (resized_at - started)}


def measure(sets: dict[str, list[bytes]], repeats: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    every_total: list[float] = []
    for kind, blobs in sets.items():
        for data in blobs:  # warm-up: imports, first-call costs
            time_stages(data)
        per_slice = []
        for data in blobs:
            samples = [time_stages(data) for _ in range(repeats)]
            per_slice.append({stage: float(np.median([s[stage] for s in samples])) for stage in (*STAGES, "total")})
        medians = {f"{stage}_ms": float(np.median([p[stage] for p in per_slice])) for stage in (*STAGES, "total")}
        rows[kind] = {"slices": len(blobs), **medians}
        every_total += [p["total"] for p in per_slice]
    rows["all"] = {"slices": len(every_total), "total_ms": float(np.median(every_total))}
    return rows


def render(report: dict[str, Any]) -> str:
    load = report["load_average"]
    lines = [f"Command: `{report['command']}` (one thread, {report['cpu_count']} CPUs, load average "
             f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, {report['created_at'][:19]}Z)", "",
             "| slices | n | decode (ms) | lung-v1 (ms) | screening (ms) | resize (ms) | total, median (ms) |",
             "|---|---|---|---|---|---|---|"]
    for kind, row in report["stages"].items():
        if kind == "all":
            continue
        lines.append(f"| {kind} | {row['slices']} | {row['decode_ms']:.2f} | {row['lung_v1_ms']:.2f} | "
                     f"{row['screening_ms']:.2f} | {row['resize_ms']:.2f} | {row['total_ms']:.2f} |")
    overall = report["stages"]["all"]["total_ms"]
    met = "met" if overall <= TARGET_MEDIAN_MS else "**missed**"
    lines += ["", f"Median over all {report['stages']['all']['slices']} slices: {overall:.2f} ms "
              f"(target ≤ {TARGET_MEDIAN_MS:.0f} ms: {met})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ucsd", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "ucsd-covid-ct")
    parser.add_argument("--ctmd", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "covid-ct-md-sample")
    parser.add_argument("--quick", action="store_true", help="fewer slices and repeats")
    parser.add_argument("--label", default="", help="a name for this run in the results file")
    args = parser.parse_args()
    count, repeats = (8, 5) if args.quick else (16, 15)
    sets = slice_sets(args.ucsd, args.ctmd, count)
    report = {"created_at": datetime.now(UTC).isoformat(), "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "label": args.label,
              "command": " ".join([Path(sys.executable).name, "-m", "bench.preprocessing", *sys.argv[1:]]),
              "stages": measure(sets, repeats)}
    report["load_average_after"] = os.getloadavg()
    save_and_print(report, render, prefix="preprocessing-")


if __name__ == "__main__":
    main()
