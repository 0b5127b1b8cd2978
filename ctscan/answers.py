"""The answers of API version 2 (and of `ctscan predict --json`): one shape for the service
and the command line. Nothing from a DICOM header is in them beyond slice positions."""

from __future__ import annotations

import base64
from typing import Any

from ctscan import DISCLAIMER
from ctscan.decision import API_VERSION, LEGACY_LABELS, OUTCOME_TEXT, Decision
from ctscan.predictor import SliceResult, StudyResult
from ctscan.study import AGGREGATION_RULE


def _png(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode("ascii") if data is not None else None


def _decision_fields(decision: Decision) -> dict[str, Any]:
    """What every answer, slice or study, says of its decision."""
    return {"api_version": API_VERSION, "outcome": decision.outcome, "outcome_text": OUTCOME_TEXT[decision.outcome],
            "probability_covid": decision.probability_covid, "threshold": decision.threshold,
            "reasons": decision.reasons}


def slice_answer(result: SliceResult, *, model: str, model_version: str, source_format: str) -> dict[str, Any]:
    decision = result.decision
    findings = result.prepared.findings if result.prepared is not None else None
    return {
        **_decision_fields(decision),
        # Version 1 fields: the label of the side of the threshold (None when not classified).
        "label": LEGACY_LABELS.get(decision.label_side or "", None),
        "model": model,
        "model_version": model_version,
        "members": {m.name: m.as_dict() for m in result.members} if len(result.members) > 1 else None,
        "lung_findings": findings.as_dict() if findings is not None else None,
        "heatmap_png_base64": _png(result.heatmap_png),
        "heatmap_members": result.heatmap_members,
        "source_format": source_format,
        "disclaimer": DISCLAIMER,
    }


def study_answer(result: StudyResult, *, model: str, model_version: str) -> dict[str, Any]:
    decision = result.decision
    slices: list[dict[str, Any]] = []
    for order, (item, position) in enumerate(zip(result.slices, result.positions_mm, strict=True)):
        slices.append({"index": order, "upload_index": result.upload_order[order], "position_mm": position,
                       "outcome": item.decision.outcome, "probability_covid": item.decision.probability_covid,
                       "reasons": item.decision.reasons if not item.decision.classified else []})
    classified = [s for s in slices if s["probability_covid"] is not None]
    top = sorted(classified, key=lambda s: -float(s["probability_covid"]))[:3]
    return {
        **_decision_fields(decision),
        "aggregation": {"rule": AGGREGATION_RULE, "k": result.k, "classified_slices": len(classified)},
        "slice_count": len(slices),
        "skipped": result.skipped(),
        "slices": slices,
        "top_slices": [{"index": s["index"], "probability_covid": s["probability_covid"],
                        "heatmap_png_base64": _png(result.slices[int(s["index"])].heatmap_png),
                        "heatmap_members": result.slices[int(s["index"])].heatmap_members} for s in top],
        "model": model,
        "model_version": model_version,
        "disclaimer": DISCLAIMER,
    }
