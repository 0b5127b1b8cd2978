"""Before/after figure of the lung-focused preprocessing for the README.

    .venv/bin/python scripts/preprocessing_figure.py --ucsd ../shared/data/ucsd-covid-ct \
        --ctmd ../shared/data/covid-ct-md-sample --out docs/images/preprocessing.png

Top row: slices as decoded (UCSD PNG/JPEG from papers; CT-MD DICOM in the lung window);
bottom row: what the models see (lung-v1), with the lung region outlined, or the refusal.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ctscan.imaging.decoding import decode_image
from ctscan.imaging.preprocessing import LUNG_V1, prepare

TILE = 200
UCSD_EXAMPLES = (  # different papers, windows, sizes and crops
    "CT_COVID/2020.03.13.20035212-p23-159.png",
    "CT_NonCOVID/73.jpg",
    "CT_COVID/kjr-21-e24-p5-31.png",
)


def _tile(grey: np.ndarray) -> Image.Image:
    image = Image.fromarray(grey).convert("RGB")
    image.thumbnail((TILE, TILE))
    canvas = Image.new("RGB", (TILE, TILE), (40, 40, 40))
    canvas.paste(image, ((TILE - image.width) // 2, (TILE - image.height) // 2))
    return canvas


def _after(grey: np.ndarray, mask: np.ndarray | None, refused: str | None) -> Image.Image:
    rgb = np.repeat(grey[:, :, None], 3, axis=2).copy()
    if mask is not None:
        edge = mask ^ np.roll(mask, 1, 0) | mask ^ np.roll(mask, 1, 1)
        rgb[edge] = (230, 60, 60)
    tile = _tile(rgb[:, :, 0]) if refused else Image.fromarray(rgb).resize((TILE, TILE))
    if refused:
        draw = ImageDraw.Draw(tile)
        draw.rectangle((0, TILE - 34, TILE, TILE), fill=(120, 20, 20))
        draw.text((6, TILE - 30), "refused:\nno lungs visible", fill=(255, 255, 255))
    return tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ucsd", type=Path, required=True)
    parser.add_argument("--ctmd", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with (args.ctmd / "labels.csv").open(newline="") as handle:
        rows = sorted((r for r in csv.DictReader(handle) if r["study"] == "P001"), key=lambda r: int(r["slice_index"]))
    chest, abdomen = rows[len(rows) // 2], rows[0]
    paths = [args.ucsd / p for p in UCSD_EXAMPLES] + [args.ctmd / chest["path"], args.ctmd / abdomen["path"]]
    before, after = [], []
    for path in paths:
        decoded = decode_image(path.read_bytes())
        prepared = prepare(decoded, LUNG_V1)
        before.append(_tile(decoded.grey))
        after.append(_after(prepared.grey, prepared.lung_mask if prepared.lungs_visible else None,
                            None if prepared.lungs_visible else prepared.reason))
    figure = Image.new("RGB", (TILE * len(paths), TILE * 2), (0, 0, 0))
    for column, (top, bottom) in enumerate(zip(before, after, strict=True)):
        figure.paste(top, (column * TILE, 0))
        figure.paste(bottom, (column * TILE, TILE))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.quantize(colors=96, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
