"""The answers of API version 2, built in one place: the inference service returns them,
`ctscan predict --json` prints them and the web client parses them, all as the pydantic
models of `ctscan.schemas`. Nothing from a DICOM header is in them beyond slice positions.

Before, `ctscan predict` had its own shape (members carried `side` instead of `label`; no
`calibrated`, `disagreement`, `indeterminate_band`, `request_id`, `timings_ms`); the
service's shape won, since programs and the web page read it.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

from ctscan import DISCLAIMER
from ctscan.decision import LEGACY_LABELS, OUTCOME_TEXT, Decision
from ctscan.schemas import (
    Aggregation,
    Label,
    LungFindings,
    MemberPrediction,
    Outcome,
    Prediction,
    StudyPrediction,
    StudySlice,
    StudyTimings,
    Timings,
    TopSlice,
)
from ctscan.study import AGGREGATION_RULE

if TYPE_CHECKING:
    from ctscan.calibration import Calibration
    from ctscan.imaging.preprocessing import LungFindings as FoundLungs
    from ctscan.serving.predictor import MemberOutput, SliceResult

TOP_SLICES = 3  # the study's most suspicious slices, shown with heatmaps


def png_base64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode("ascii") if data is not None else None


def _label(side: str | None) -> Label | None:
    return cast(Label, LEGACY_LABELS[side]) if side in LEGACY_LABELS else None


def ensemble_version(members: Mapping[str, str]) -> str:
    """The ensemble's model_version: its member versions, name=version, comma-separated."""
    return ",".join(f"{name}={version}" for name, version in members.items())


def is_calibrated(ensemble: Calibration | None, members: Sequence[Calibration]) -> bool:
    """The ensemble's own calibration when it answers, else every member's."""
    if ensemble is not None:
        return ensemble.method != "identity"
    return bool(members) and all(c.method != "identity" for c in members)


def lung_findings(findings: FoundLungs | None) -> LungFindings | None:
    return LungFindings.model_validate(findings.as_dict()) if findings is not None else None


def slice_prediction(*, decision: Decision, outputs: Sequence[MemberOutput], ensemble: bool, model: str,
                     model_version: str, findings: FoundLungs | None, source_format: str,
                     heatmap_png_base64: str | None, request_id: str, timings: Timings, band: float | None,
                     calibrated: bool, heatmap_members: Sequence[str] | None = None) -> Prediction:
    """One slice's answer. `ensemble`: whether the ensemble answered (then each member is listed)."""
    members: dict[str, MemberPrediction] | None = None
    disagreement: bool | None = None
    if ensemble and outputs:
        members = {o.name: MemberPrediction(
            probability_covid=o.probability, label="COVID" if o.probability >= o.threshold else "non-COVID",
            version=o.version, threshold=o.threshold, gate_distance=o.gate_distance, gate_threshold=o.gate_threshold)
            for o in outputs}
        disagreement = len({m.label for m in members.values()}) > 1
    probability = decision.probability_covid
    label = _label(decision.label_side)
    confidence = None if probability is None else (probability if label == "COVID" else 1.0 - probability)
    return Prediction(
        outcome=cast(Outcome, decision.outcome),
        outcome_text=OUTCOME_TEXT[decision.outcome],
        probability_covid=probability,
        threshold=decision.threshold,
        indeterminate_band=band if decision.classified else None,
        reasons=decision.reasons,
        label=label,
        confidence=confidence,
        calibrated=calibrated,
        model=model,
        model_version=model_version,
        members=members,
        disagreement=disagreement,
        lung_findings=lung_findings(findings),
        heatmap_png_base64=heatmap_png_base64,
        heatmap_members=list(heatmap_members) if heatmap_members is not None else None,
        request_id=request_id,
        timings_ms=timings,
        source_format=source_format,
        disclaimer=DISCLAIMER,
    )


def top_slices(results: Sequence[SliceResult], count: int = TOP_SLICES) -> list[int]:
    """Positions of the `count` classified slices with the highest probabilities."""
    ranked = sorted((i for i, r in enumerate(results) if r.decision.classified),
                    key=lambda i: -(results[i].decision.probability_covid or 0.0))
    return ranked[:count]


def study_prediction(*, decision: Decision, k: int | None, results: Sequence[SliceResult],
                     positions_mm: Sequence[float | None], upload_order: Sequence[int],
                     heatmaps: Mapping[int, str | None], model: str, model_version: str, band: float | None,
                     request_id: str, timings: StudyTimings, source_formats: Sequence[str],
                     heatmap_members: Mapping[int, Sequence[str]] | None = None) -> StudyPrediction:
    """A study's answer; `results` in body order, `heatmaps` by position (base64 PNGs) and
    `heatmap_members` (whose maps each combines) by position."""
    combined = heatmap_members or {}
    slices = [StudySlice(index=position, upload_index=upload, position_mm=millimetres,
                         outcome=cast(Outcome, result.decision.outcome),
                         probability_covid=result.decision.probability_covid,
                         reasons=[] if result.decision.classified else result.decision.reasons)
              for position, (result, millimetres, upload) in enumerate(
                  zip(results, positions_mm, upload_order, strict=True))]
    skipped: dict[str, int] = {}
    for result in results:
        if not result.decision.classified:
            skipped[result.decision.outcome] = skipped.get(result.decision.outcome, 0) + 1
    top = [TopSlice(index=position, probability_covid=float(results[position].decision.probability_covid or 0.0),
                    heatmap_png_base64=heatmaps.get(position),
                    heatmap_members=list(combined[position]) if position in combined else None)
           for position in top_slices(results)]
    return StudyPrediction(
        outcome=cast(Outcome, decision.outcome),
        outcome_text=OUTCOME_TEXT[decision.outcome],
        probability_covid=decision.probability_covid,
        threshold=decision.threshold,
        indeterminate_band=band if decision.classified else None,
        reasons=decision.reasons,
        aggregation=Aggregation(rule=AGGREGATION_RULE, k=k,
                                classified_slices=sum(r.decision.classified for r in results)),
        slice_count=len(slices),
        skipped=skipped,
        slices=slices,
        top_slices=top,
        model=model,
        model_version=model_version,
        request_id=request_id,
        timings_ms=timings,
        source_format="+".join(sorted(set(source_formats))),
        disclaimer=DISCLAIMER,
    )
