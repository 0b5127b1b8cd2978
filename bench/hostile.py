"""Ordinary /predict latency while hostile uploads run in parallel (issue 24, "bounded decode cost").

The hostile shapes, as they were sent against `make up` on main 2118298:
  * `png_7000`: a 7000 x 7000 PNG of zeros (86 kB; 3.2 s and +0.85 GB then);
  * `dicom_zip_7000`: a ZIP of six 7000 x 7000 deflated DICOM slices (about 1 MB; 53 s and
    +2.5 GB then, a parallel /predict waited 51 s);
  * `zip_of_zeros`: a ZIP of 900 entries of 1 MiB zeros (1 MB; refused after 2.5 s then);
  * `large_slice`: a 2048 x 2048 PNG of a real slice enlarged: within the limits, so decoded,
    at 16 times the cost of a 512 x 512 slice.
The bench runs the service (`ctscan serve inference`), measures ordinary single-slice
/predict requests (real UCSD slices, one model) at a fixed concurrency alone, then the same
load while `--attackers` connections send the hostile shapes back to back, and reports
p50/p99 of the ordinary requests as ratios (target: p99 with attackers ≤ 2 × p99 without),
plus how the hostile requests were answered (status counts, seconds) and the service's
resident memory.

    python -m bench.hostile --store var/model-store --quick
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
import zipfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from bench.loadgen import encode_request, load_images, run_load  # noqa: E402
from bench.results import RESULTS_DIR, save_and_print  # noqa: E402

TARGET_P99_RATIO = 2.0


def big_png(side: int = 7000) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (side, side), 0).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def deflated_dicom(side: int = 7000) -> bytes:
    """A CT slice of `side` x `side` zeros in Deflated Explicit VR Little Endian (tiny on the wire)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset = FileDataset("slice.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID, dataset.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CT"
    dataset.Rows = dataset.Columns = side
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
    dataset.PixelData = bytes(side * side * 2)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def zip_of(entries: list[bytes], *, deflate: bool = True) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as archive:
        for index, data in enumerate(entries):
            archive.writestr(f"series/IM{index:05d}", data)
    return buffer.getvalue()


def zip_of_zeros(entries: int = 900, size: int = 1 << 20) -> bytes:
    return zip_of([bytes(size)] * entries)


def large_slice(image: bytes, side: int = 2048) -> bytes:
    from PIL import Image

    from ctscan.imaging.decoding import decode_image

    grey = decode_image(image).grey
    buffer = io.BytesIO()
    Image.fromarray(grey).resize((side, side), Image.Resampling.BILINEAR).save(buffer, format="PNG")
    return buffer.getvalue()


def hostile_shapes(ordinary: bytes) -> dict[str, tuple[str, bytes]]:
    """name -> (path, upload)."""
    dicom = deflated_dicom()
    return {"png_7000": ("/predict", big_png()), "dicom_zip_7000": ("/predict/study", zip_of([dicom] * 6)),
            "zip_of_zeros": ("/predict/study", zip_of_zeros()), "large_slice": ("/predict", large_slice(ordinary))}


async def _attack(host: str, port: int, shapes: dict[str, tuple[str, bytes]], model: str, stop: asyncio.Event,
                  answers: Counter[str], seconds: dict[str, list[float]]) -> None:
    requests = {name: encode_request(host=host, port=port, path=path, model=model, image=data)
                for name, (path, data) in shapes.items()}
    names = list(requests)
    turn = 0
    while not stop.is_set():
        name = names[turn % len(names)]
        turn += 1
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(requests[name])
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1].decode()
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
        except (ConnectionError, asyncio.IncompleteReadError):
            status = "closed"
        finally:
            writer.close()
        answers[f"{name}:{status}"] += 1
        seconds.setdefault(name, []).append(time.perf_counter() - started)


def _ordinary_with_attackers(url: str, model: str, images: list[bytes], concurrency: int, total: int,
                             attackers: int, shapes: dict[str, tuple[str, bytes]]) -> dict[str, Any]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    answers: Counter[str] = Counter()
    seconds: dict[str, list[float]] = {}

    async def attack_while(stop: asyncio.Event) -> None:
        await asyncio.gather(*(_attack(host, port, shapes, model, stop, answers, seconds) for _ in range(attackers)))

    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    import threading

    thread = threading.Thread(target=lambda: loop.run_until_complete(attack_while(stop)), daemon=True)
    thread.start()
    time.sleep(1.0)  # the attack under way before the ordinary load starts
    try:
        ordinary = run_load(url=url, model=model, images=images, concurrency=concurrency, total=total).__dict__
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=120)
    return {"ordinary": ordinary, "hostile_answers": dict(sorted(answers.items())),
            "hostile_seconds_p50": {name: float(np.median(values)) for name, values in seconds.items()},
            "hostile_seconds_max": {name: float(np.max(values)) for name, values in seconds.items()}}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from bench.run import _free_port, _rss_mb, _start, _stop

    images = load_images(Path(args.images), 16)
    total = 96 if args.quick else 480
    shapes = hostile_shapes(images[0])
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    logs = RESULTS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    service = _start([sys.executable, "-m", "ctscan.cli", "serve", "inference", "--port", str(port)],
                     {"CTSCAN_MODEL_STORE": args.store, "INFERENCE_RELOAD_POLL_SECONDS": "0",
                      "INFERENCE_LOG_LEVEL": "warning", "INFERENCE_AUTH": "off", "INFERENCE_MODELS": args.model,
                      "INFERENCE_WARMUP_GRADCAM": "false"}, url, "/readyz", logs / "hostile-service.log")
    report: dict[str, Any] = {"created_at": datetime.now(UTC).isoformat(), "quick": args.quick, "model": args.model,
                              "cpu_count": os.cpu_count(), "concurrency": args.concurrency, "attackers": args.attackers,
                              "upload_bytes": {name: len(data) for name, (_, data) in shapes.items()},
                              "load_average_before": os.getloadavg(),
                              "command": " ".join([Path(sys.executable).name, "-m", "bench.hostile", *sys.argv[1:]])}
    try:
        run_load(url=url, model=args.model, images=images, concurrency=args.concurrency, total=32)  # warm-up
        report["rss_before_mb"] = _rss_mb(service.pid)
        report["alone"] = run_load(url=url, model=args.model, images=images, concurrency=args.concurrency,
                                   total=total).__dict__
        report["with_attackers"] = _ordinary_with_attackers(url, args.model, images, args.concurrency, total,
                                                            args.attackers, shapes)
        report["rss_after_mb"] = _rss_mb(service.pid)
        report["alone_again"] = run_load(url=url, model=args.model, images=images, concurrency=args.concurrency,
                                         total=total).__dict__
    finally:
        _stop(service)
    report["load_average_after"] = os.getloadavg()
    return report


def render(report: dict[str, Any]) -> str:
    alone, attacked = report["alone"], report["with_attackers"]["ordinary"]
    again = report["alone_again"]
    # The idle figure: the better of the runs without attackers before and after (this
    # machine is shared; one slow stretch must not flatter the ratio).
    idle_p99 = min(alone["p99_ms"], again["p99_ms"])
    idle_p50 = min(alone["p50_ms"], again["p50_ms"])
    ratio = attacked["p99_ms"] / idle_p99
    load = report["load_average_before"]
    lines = [f"Command: `{report['command']}` ({'quick' if report['quick'] else 'full'} mode, {report['cpu_count']} "
             f"CPUs, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} before, "
             f"{report['created_at'][:19]}Z); ordinary load: {report['model']}, concurrency {report['concurrency']}; "
             f"{report['attackers']} attacking connections", "",
             "| ordinary /predict | requests | errors | p50 (ms) | p99 (ms) |", "|---|---|---|---|---|"]
    for label, row in (("alone", alone), ("with hostile uploads in parallel", attacked), ("alone, after", again)):
        lines.append(f"| {label} | {row['requests']} | {row['errors']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} |")
    met = "met" if ratio <= TARGET_P99_RATIO else "**missed**"
    lines += ["", f"p99 with hostile uploads ÷ p99 alone: {ratio:.2f} (target ≤ {TARGET_P99_RATIO:.0f}: {met}); "
              f"p50: {attacked['p50_ms'] / idle_p50:.2f}. Resident memory {report['rss_before_mb']:.0f} MB before, "
              f"{report['rss_after_mb']:.0f} MB after the attack.", "",
              "| hostile upload | bytes | answers | median s | max s |", "|---|---|---|---|---|"]
    answers = report["with_attackers"]["hostile_answers"]
    for name, size in report["upload_bytes"].items():
        statuses = ", ".join(f"{key.split(':')[1]} × {count}" for key, count in answers.items()
                             if key.startswith(name + ":"))
        p50 = report["with_attackers"]["hostile_seconds_p50"].get(name, float("nan"))
        worst = report["with_attackers"]["hostile_seconds_max"].get(name, float("nan"))
        lines.append(f"| {name} | {size:,} | {statuses} | {p50:.2f} | {worst:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from ctscan.models import ensemble_members

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=os.environ.get("CTSCAN_MODEL_STORE", str(REPO_ROOT / "var" / "model-store")))
    parser.add_argument("--images", default=str(REPO_ROOT.parent / "shared" / "data" / "ucsd-covid-ct"))
    parser.add_argument("--model", default=ensemble_members()[-1],
                        help="the model of the ordinary load (default: the ensemble's last member)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--from-json", type=Path)
    args = parser.parse_args()
    if args.from_json:
        print(render(json.loads(args.from_json.read_text())))
        return
    report = benchmark(args)
    save_and_print(report, render, prefix="hostile-")


if __name__ == "__main__":
    main()
