"""Before/after figure of the served Grad-CAM heatmap for the README.

    .venv/bin/python scripts/heatmap_figure.py --ucsd ../shared/data/ucsd-covid-ct \
        --ctmd ../shared/data/covid-ct-md-sample --store models --out docs/images/heatmaps.png

Top row, before: MobileNetV2's map at its last convolutional activation (`out_relu`, 4x4 at
the served 128 px), stretched over the lung crop it saw and blended over all of it (the rule
of commit 2118298). Bottom row, after: the ensemble's heatmap as served now
(`ctscan.serving.predictor.explain_members`): each model's map at a layer of at least 8x8, placed
where its crop lies on the uploaded slice, averaged, masked to the body, over the original.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ctscan.imaging.decoding import decode_image

TILE = 240
UCSD_EXAMPLES = ("CT_COVID/2020.03.13.20035212-p23-159.png", "CT_NonCOVID/73.jpg")


def _tile(image: Image.Image, caption: str) -> Image.Image:
    image = image.convert("RGB")
    image.thumbnail((TILE, TILE))
    canvas = Image.new("RGB", (TILE, TILE + 18), (40, 40, 40))
    canvas.paste(image, ((TILE - image.width) // 2, 18 + (TILE - image.height) // 2))
    ImageDraw.Draw(canvas).text((4, 3), caption, fill=(235, 235, 235))
    return canvas


def _jet(values: np.ndarray) -> np.ndarray:
    red = np.clip(1.5 - np.abs(4 * values - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * values - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * values - 1), 0, 1)
    return np.stack([red, green, blue], axis=-1) * 255


def _before(member, prepared) -> Image.Image:  # type: ignore[no-untyped-def]
    """The previous rule: the configured (coarse) layer, over the crop, blended everywhere."""
    from ctscan.gradcam import make_gradcam
    from ctscan.models import get_spec

    gradcam = make_gradcam(member.model, layer_name=get_spec(member.name).gradcam_layer)
    heat = gradcam(prepared.model_input(member.input_size))
    size = prepared.grey.shape[::-1]
    stretched = Image.fromarray(heat.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    values = np.clip(np.asarray(stretched), 0, 1)
    base = np.repeat(prepared.grey[:, :, None], 3, axis=2).astype(np.float32)
    blended = base * 0.6 + _jet(values) * 0.4
    return Image.fromarray(blended.round().astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ucsd", type=Path, required=True)
    parser.add_argument("--ctmd", type=Path, required=True)
    parser.add_argument("--store", default="models")
    parser.add_argument("--out", type=Path, default=Path("docs/images/heatmaps.png"))
    args = parser.parse_args()

    from ctscan.imaging.preprocessing import LUNG_V1, get_preprocessor, prepare
    from ctscan.models import FASTEST_ARCHITECTURE, ensemble_members
    from ctscan.serving.predictor import Predictor
    from ctscan.storage.store import open_store

    predictor = Predictor.from_store(open_store(args.store), ensemble_members())
    with (args.ctmd / "labels.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["study"] == "P001" and r["infection"] == "1"]
    paths = [args.ucsd / name for name in UCSD_EXAMPLES] + [args.ctmd / rows[len(rows) // 2]["path"]]
    members = list(predictor.models.values())
    mobilenet = predictor.models[FASTEST_ARCHITECTURE]  # MobileNetV2: the README's "before" example
    top, bottom = [], []
    for path in paths:
        decoded = decode_image(path.read_bytes())
        prepared = [get_preprocessor(m.preprocessing)(decoded) for m in members]
        top.append(_tile(_before(mobilenet, prepare(decoded, mobilenet.preprocessing)), "before: 4x4, crop"))
        explanation = predictor.explain(decoded, prepare(decoded, LUNG_V1), members, prepared)
        bottom.append(_tile(Image.open(io.BytesIO(explanation.png)), "after: ensemble, slice, body"))
    figure = Image.new("RGB", (TILE * len(paths), 2 * (TILE + 18)), (40, 40, 40))
    for column, (before, after) in enumerate(zip(top, bottom, strict=True)):
        figure.paste(before, (column * TILE, 0))
        figure.paste(after, (column * TILE, TILE + 18))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
