"""lung-v1 stays what the released models were trained on: the crops, findings and outcomes of
real slices are compared with reference statistics the old, slower implementation computed
(ctscan at 2118298, before issue 26 made it fast).

The slices: UCSD test PNG/JPEG and CT-MD DICOM (512 x 512), both also enlarged to 1024 x 1024,
and the foreign images the screening refuses. Tolerances (stated here, checked per slice):
the outcome (lungs visible or not, the refusal) is identical; every finding within 0.005
(fractions) and 0.01 (contrast, balance); the crop box within 1 % of its side; the crop,
both reduced to 24 x 24, within 1 grey level on average and 24 at any point (a pixel of mask
edge that moved); the lung mask within 0.01 of its share.

Regenerate (only when lung-v1 is meant to change, which needs a new preprocessing version):
    PYTHONPATH=. python tests/core/test_preprocessing_reference.py
"""

from __future__ import annotations

import base64
import csv
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ctscan.imaging.decoding import DecodedImage, decode_image, lung_window
from ctscan.imaging.preprocessing import LUNG_V1, prepare
from ctscan.serving.predictor import input_refusal

REFERENCE = Path(__file__).parent / "data" / "lung_v1_reference.json"
THUMB = 24
ENLARGED = 1024


def _enlarged(decoded: DecodedImage) -> DecodedImage:
    """The slice at 1024 x 1024 (bilinear), as a high-resolution export would be."""
    size = (ENLARGED, ENLARGED)
    grey = np.asarray(Image.fromarray(decoded.grey).resize(size, Image.Resampling.BILINEAR))
    if decoded.hounsfield is None:
        return replace(decoded, grey=grey)
    hounsfield = np.asarray(Image.fromarray(decoded.hounsfield, mode="F").resize(size, Image.Resampling.BILINEAR))
    return replace(decoded, grey=lung_window(hounsfield), hounsfield=hounsfield)


def reference_slices(data_dir: Path, ctmd_dir: Path) -> Iterator[tuple[str, DecodedImage]]:
    from ctscan.data.dataset import CTDataset
    from ctscan.evaluation.safety import generated_patterns, skimage_samples

    ucsd = CTDataset(data_dir).split("test")[::3]
    for number, item in enumerate(ucsd):
        decoded = decode_image(item.path.read_bytes())
        yield f"ucsd:{item.relative_path}", decoded
        if number % 8 == 0:
            yield f"ucsd-1024:{item.relative_path}", _enlarged(decoded)
    with (ctmd_dir / "labels.csv").open(newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: r["path"])[::4]
    for number, row in enumerate(rows):
        decoded = decode_image((ctmd_dir / row["path"]).read_bytes())
        yield f"ctmd:{row['path']}", decoded
        if number % 8 == 0:
            yield f"ctmd-1024:{row['path']}", _enlarged(decoded)
    # binary_blobs is drawn at random on every call: no reference for it.
    yield from ((name, decoded) for name, decoded in skimage_samples() if name != "skimage:binary_blobs")
    yield from generated_patterns()


def _thumbnail(grey: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(grey).resize((THUMB, THUMB), Image.Resampling.BILINEAR))


def record(decoded: DecodedImage) -> dict[str, Any]:
    prepared = prepare(decoded, LUNG_V1)
    refusal = input_refusal(decoded, prepared)
    findings = prepared.findings
    assert findings is not None and prepared.lung_mask is not None
    return {"visible": prepared.lungs_visible, "outcome": refusal.outcome if refusal else None,
            "findings": findings.as_dict(), "crop_box": list(findings.crop_box),
            "shape": list(prepared.grey.shape), "mask_share": round(float(prepared.lung_mask.mean()), 4),
            "thumbnail": base64.b64encode(_thumbnail(prepared.grey).tobytes()).decode()}


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, Any]]:
    return dict(json.loads(REFERENCE.read_text()))


def test_lung_v1_matches_the_old_implementation_on_real_slices(
        reference: dict[str, dict[str, Any]], data_dir: Path, ctmd_dir: Path) -> None:
    seen, problems = set(), []
    for key, decoded in reference_slices(data_dir, ctmd_dir):
        seen.add(key)
        old, new = reference[key], record(decoded)
        if (old["visible"], old["outcome"]) != (new["visible"], new["outcome"]):
            problems.append(f"{key}: outcome {old['visible'], old['outcome']} -> {new['visible'], new['outcome']}")
            continue
        for name, value in old["findings"].items():
            tolerance = 0 if name == "lung_components" else 0.01 if name in ("contrast", "lung_balance") else 0.005
            if abs(new["findings"][name] - value) > tolerance:
                problems.append(f"{key}: {name} {value} -> {new['findings'][name]}")
        side = old["crop_box"][2] - old["crop_box"][0]
        if max(abs(a - b) for a, b in zip(old["crop_box"], new["crop_box"], strict=True)) > max(1, 0.01 * side):
            problems.append(f"{key}: crop box {old['crop_box']} -> {new['crop_box']}")
        if abs(old["mask_share"] - new["mask_share"]) > 0.01:
            problems.append(f"{key}: lung mask share {old['mask_share']} -> {new['mask_share']}")
        before = np.frombuffer(base64.b64decode(old["thumbnail"]), np.uint8).astype(np.int16)
        after = np.frombuffer(base64.b64decode(new["thumbnail"]), np.uint8).astype(np.int16)
        difference = np.abs(before - after)
        if difference.mean() > 1.0 or difference.max() > 24:
            problems.append(f"{key}: crop differs by {difference.mean():.2f} on average, {difference.max()} at most")
    assert seen == set(reference), "the reference slices changed; regenerate with the old implementation"
    assert len(seen) > 150
    assert problems == []


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[2]
    data = Path(os.environ.get("CTSCAN_TEST_DATA_DIR", root.parent / "shared" / "data" / "ucsd-covid-ct"))
    ctmd = Path(os.environ.get("CTSCAN_TEST_CTMD_DIR", root.parent / "shared" / "data" / "covid-ct-md-sample"))
    records = {key: record(decoded) for key, decoded in reference_slices(data, ctmd)}
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(records, indent=0, sort_keys=True) + "\n")
    print(f"{len(records)} slices written to {REFERENCE}", file=sys.stderr)
