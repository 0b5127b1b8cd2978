"""`ctscan predict --json` prints the answer the API gives for the same image: one schema
(`ctscan.schemas`), built in one place (`ctscan.serving.answers`), for the slice and the study."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctscan.schemas import Prediction, StudyPrediction
from inference.conftest import RunningService

# Differ by nature: each run has its own request id and timings.
PER_RUN = {"request_id", "timings_ms"}


def _cli(store: Path, *arguments: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "ctscan.cli", "predict", "--json", "--store", str(store),
                           *arguments], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def _same(cli: dict[str, object], api: dict[str, object]) -> None:
    assert set(cli) == set(api)
    for field in set(api) - PER_RUN - {"probability_covid", "members", "confidence", "lung_findings"}:
        assert cli[field] == api[field], field
    # TensorFlow here, the ONNX copy there: equal within the copy's check (1e-4).
    if api["probability_covid"] is not None:
        assert cli["probability_covid"] == pytest.approx(api["probability_covid"], abs=1e-3)


def test_cli_and_api_answer_a_slice_alike(inference_service: RunningService,
                                          real_ct_images: dict[str, Path]) -> None:
    image = real_ct_images["covid_png"]
    api = inference_service.predict(image.read_bytes(), params={"model": "ensemble"}).json()
    cli = _cli(inference_service.store_dir, str(image))
    Prediction.model_validate(cli)
    _same(cli, api)
    assert cli["members"] is not None and api["members"] is not None
    assert set(cli["members"]) == set(api["members"])  # type: ignore[arg-type]
    for name, member in cli["members"].items():  # type: ignore[attr-defined]
        assert set(member) == set(api["members"][name])  # type: ignore[index]
        assert member["label"] == api["members"][name]["label"]  # type: ignore[index]


def test_cli_and_api_answer_a_study_alike(inference_service: RunningService,
                                          real_ct_images: dict[str, Path]) -> None:
    images = [real_ct_images["covid_png"], real_ct_images["non_covid_png"]]
    api = inference_service.predict_study([p.read_bytes() for p in images], params={"model": "ensemble"}).json()
    cli = _cli(inference_service.store_dir, *map(str, images))
    StudyPrediction.model_validate(cli)
    _same({k: v for k, v in cli.items() if k not in ("slices", "top_slices")},
          {k: v for k, v in api.items() if k not in ("slices", "top_slices")})
    assert [s["outcome"] for s in cli["slices"]] == [s["outcome"] for s in api["slices"]]  # type: ignore[attr-defined]
    assert [s["index"] for s in cli["top_slices"]] == [s["index"] for s in api["top_slices"]]  # type: ignore[attr-defined]
