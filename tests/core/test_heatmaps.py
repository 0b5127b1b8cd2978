"""The served heatmap on real slices with the shipped release: computed at a layer fine enough
to localise, placed where each model's lung crop lies on the original slice, masked to the
body, and naming the models whose maps it combines (`ctscan.serving.predictor.explain_members`, the
one rule of the API, `ctscan predict` and the page)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctscan.data.dataset import CTDataset
from ctscan.gradcam import MIN_HEATMAP_SIDE
from ctscan.imaging.decoding import DecodedImage, decode_image
from ctscan.imaging.preprocessing import LUNG_V1, get_preprocessor, prepare
from ctscan.models import ENSEMBLE, ensemble_members
from ctscan.serving.predictor import Predictor
from ctscan.storage.store import open_store

RELEASE = Path(__file__).resolve().parents[2] / "models"
pytestmark = pytest.mark.slow  # loads the three shipped Keras models


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_store(open_store(RELEASE), ensemble_members())


@pytest.fixture(scope="module")
def real_slices(data_dir: Path, ctmd_slices: dict[str, list[dict[str, str]]], ctmd_dir: Path) -> list[DecodedImage]:
    """UCSD test slices of both classes (PNG and JPEG) and a lung slice of each CT-MD study (DICOM)."""
    ucsd = CTDataset(data_dir).split("test")
    chosen = [s.path for s in ucsd[::50]]
    for rows in ctmd_slices.values():
        chosen.append(ctmd_dir / rows[len(rows) // 2]["path"])
    return [decode_image(path.read_bytes()) for path in chosen]


def _body(decoded: DecodedImage, screen_body: np.ndarray) -> np.ndarray:
    """The body at the slice's resolution. DICOM (CT-MD: the whole field of view, the body
    surrounded by air) by a rule other than lung-v1's: denser than -500 HU, holes filled,
    largest component, a few pixels of margin. PNG/JPEG (UCSD: often cropped so tightly that
    the lungs touch the edge, where no simple rule finds the body) by lung-v1's own mask."""
    from scipy import ndimage

    if decoded.hounsfield is None:
        return np.asarray(Image.fromarray(screen_body.astype(np.uint8) * 255).resize(
            decoded.grey.shape[::-1], Image.Resampling.NEAREST)) > 127
    labels, _ = ndimage.label(ndimage.binary_fill_holes(decoded.hounsfield > -500))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_dilation(labels == int(np.argmax(sizes)), iterations=3)


def test_every_models_map_is_fine_enough_to_localise(predictor: Predictor) -> None:
    for member in predictor.models.values():
        blank = np.zeros((member.input_size, member.input_size, 3), np.float32)
        height, width = member.heatmap(blank).shape
        assert min(height, width) >= MIN_HEATMAP_SIDE, f"{member.name}: {height}x{width} at {member.input_size} px"


def test_the_ensemble_heatmap_lies_inside_the_body_of_the_original_slice(predictor: Predictor,
                                                                          real_slices: list[DecodedImage]) -> None:
    members = list(predictor.models.values())
    for decoded in real_slices:
        screen = prepare(decoded, LUNG_V1)
        assert screen.lungs_visible
        explanation = predictor.explain(decoded, screen, members,
                                        [get_preprocessor(m.preprocessing)(decoded) for m in members])
        assert explanation.members == tuple(predictor.models)  # every member counts, and the answer says so
        picture = Image.open(io.BytesIO(explanation.png))
        height, width = decoded.grey.shape
        assert picture.width / picture.height == pytest.approx(width / height, rel=0.02)  # the original, not the crop
        heat = explanation.heatmap
        assert heat.shape == (picture.height, picture.width) and heat.max() == pytest.approx(1.0)
        body = np.asarray(Image.fromarray(_body(decoded, screen.body_mask).astype(np.uint8) * 255).resize(
            (picture.width, picture.height), Image.Resampling.NEAREST)) > 127
        inside = float(heat[body].sum() / heat.sum())
        assert inside >= 0.97, f"only {inside:.0%} of the map inside the body ({decoded.source_format})"
        # Nothing at all is drawn where lung-v1 found no body (text, rulers, the table, air).
        served_body = np.asarray(Image.fromarray(screen.body_mask.astype(np.uint8) * 255).resize(
            (picture.width, picture.height), Image.Resampling.NEAREST)) > 127
        assert float(heat[~served_body].max(initial=0.0)) == 0.0


def test_predict_on_the_command_line_draws_the_same_heatmap(predictor: Predictor,
                                                            real_slices: list[DecodedImage]) -> None:
    decoded = real_slices[0]
    result = predictor.classify([decoded], model=ENSEMBLE, explain=True)[0]
    members = list(predictor.models.values())
    direct = predictor.explain(decoded, prepare(decoded, LUNG_V1), members,
                               [get_preprocessor(m.preprocessing)(decoded) for m in members])
    assert result.heatmap_members == list(predictor.models)
    assert result.heatmap_png == direct.png
