"""Prediction for one slice or a whole study, without a server: what `ctscan predict` runs,
and the rules the inference service applies to its (batched, ONNX) outputs alike.

`slice_decision` turns one slice's member outputs into the outcome; `study_decision`
aggregates a study's slices (`ctscan.study`). `Predictor` loads production models from a
store and runs everything in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ctscan.calibration import Calibration
from ctscan.decision import DEFAULT_BAND, Decision, decide, refuse
from ctscan.errors import CTScanError
from ctscan.gate import OUTCOME_NO_LUNGS, OUTCOME_NOT_CHEST_CT, FeatureGate
from ctscan.gradcam import Explanation, MemberMap, explain_slice
from ctscan.imaging.decoding import DecodedImage
from ctscan.imaging.preprocessing import LUNG_V1, PreparedSlice, get_preprocessor, prepare
from ctscan.imaging.screening import appearance_refusal
from ctscan.models import ENSEMBLE, predict_probabilities
from ctscan.storage.records import EnsembleRecord, ModelCard
from ctscan.study import aggregate, order_series

if TYPE_CHECKING:
    from ctscan.storage.store import ModelStore


@dataclass(frozen=True)
class MemberOutput:
    """One model's view of one slice."""

    name: str
    version: str
    probability: float  # calibrated
    threshold: float
    gate_distance: float | None = None  # None: the model's card has no gate
    gate_threshold: float | None = None
    band: float = DEFAULT_BAND  # the model's indeterminate band (chosen on val)

    @property
    def gate_rejects(self) -> bool:
        return self.gate_distance is not None and self.gate_threshold is not None \
            and self.gate_distance > self.gate_threshold

    def as_dict(self) -> dict[str, Any]:
        return {"probability_covid": self.probability, "threshold": self.threshold, "version": self.version,
                "side": "covid" if self.probability >= self.threshold else "non_covid",
                "gate_distance": self.gate_distance, "gate_threshold": self.gate_threshold}


@dataclass(frozen=True)
class EnsembleRule:
    members: dict[str, str]
    threshold: float
    calibration: Calibration
    band: float = DEFAULT_BAND


class EnsembleNotCalibratedError(CTScanError):
    """The ensemble cannot be used: it has no calibration record, or a member version its
    record pins is not in the store."""


def ensemble_record_for(store: ModelStore) -> EnsembleRecord:
    """The stored ensemble record, whose member versions are the ensemble (pinned): they are
    used whatever the production versions are now, since the calibration, threshold and band
    were fitted on val for exactly them. A promotion never changes the clinical decision rule
    silently; the ensemble keeps its versions until it is calibrated again."""
    record = store.ensemble_record()
    if not record:
        raise EnsembleNotCalibratedError(
            "the ensemble has no calibration; run `ctscan models calibrate-ensemble` (fits its threshold on val)")
    for name, version in record.members.items():
        if version not in store.list_versions(name):
            raise EnsembleNotCalibratedError(
                f"the ensemble's member {name} version {version} (the version its threshold was fitted for on "
                f"val) is not in {store.url}; run `ctscan models calibrate-ensemble` to fit it for versions "
                "that exist")
    return record


def ensemble_order(members: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """The ensemble's members in the served models' order (the order answers list them in),
    members that are not served on their own last."""
    return [n for n in preferred if n in members] + [n for n in members if n not in preferred]


def card_band(card: ModelCard | EnsembleRecord | dict[str, Any] | None) -> float:
    """The indeterminate band a card (or ensemble record) was fitted with on val."""
    return float(((card or {}).get("uncertainty") or {}).get("band", DEFAULT_BAND))


def input_refusal(decoded: DecodedImage, prepared: PreparedSlice) -> Decision | None:
    """Refuse before any model runs: a DICOM of another modality, an image that cannot be a
    CT slice (colour, a few grey levels, noise), or no lungs."""
    if decoded.dicom is not None and decoded.dicom.modality and decoded.dicom.modality != "CT":
        return refuse(OUTCOME_NOT_CHEST_CT, f"the DICOM modality is {decoded.dicom.modality}, not CT")
    appearance = appearance_refusal(decoded)
    if appearance is not None:
        return refuse(OUTCOME_NOT_CHEST_CT, appearance)
    if not prepared.lungs_visible:
        return refuse(OUTCOME_NO_LUNGS, prepared.reason or "no lungs visible")
    return None


def slice_decision(outputs: Sequence[MemberOutput], *, ensemble: EnsembleRule | None) -> Decision:
    """One slice's outcome from its members' outputs (one member: that model alone)."""
    rejecting = [o.name for o in outputs if o.gate_rejects]
    if len(rejecting) * 2 > len(outputs):
        return refuse(OUTCOME_NOT_CHEST_CT, "the image lies far from the chest CT slices the models were trained "
                      f"on ({', '.join(rejecting)}); not an axial chest CT slice, or one they cannot judge")
    if ensemble is None:
        only = outputs[0]
        return decide(probability=only.probability, threshold=only.threshold, band=only.band)
    probability = float(ensemble.calibration.apply(float(np.mean([o.probability for o in outputs]))))
    sides = {o.probability >= o.threshold for o in outputs}
    return decide(probability=probability, threshold=ensemble.threshold, band=ensemble.band,
                  members_disagree=len(sides) > 1)


def explain_members(original: DecodedImage, screen: PreparedSlice,
                    members: Sequence[tuple[str, np.ndarray, PreparedSlice]]) -> Explanation:
    """The served heatmap of one slice (the service and `ctscan predict` alike): every
    member's Grad-CAM map, each placed where that member's view lies on the original slice,
    averaged, masked to the body `screen` (lung-v1) found, drawn over the original slice.

    Every member counts, whatever it saw: a crop and a whole slice add up once both sit on
    the slice (before, the service left out members that saw another frame and the command
    line averaged maps of different frames pixel by pixel)."""
    return explain_slice(original.grey, [MemberMap(name, heatmap, seen.view) for name, heatmap, seen in members],
                         body=screen.body_mask)


@dataclass
class SliceResult:
    decision: Decision
    members: list[MemberOutput] = field(default_factory=list)
    prepared: PreparedSlice | None = None
    heatmap_png: bytes | None = None
    heatmap_members: list[str] | None = None  # whose Grad-CAM maps the heatmap combines


@dataclass
class StudyResult:
    decision: Decision
    slices: list[SliceResult]
    positions_mm: list[float | None]
    k: int | None
    upload_order: list[int]

    def skipped(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for result in self.slices:
            if not result.decision.classified:
                counts[result.decision.outcome] = counts.get(result.decision.outcome, 0) + 1
        return counts


def study_decision(slices: Sequence[SliceResult], *, threshold: float, band: float = DEFAULT_BAND
                   ) -> tuple[Decision, int | None]:
    """The study's outcome: top-k mean of the classified slices' probabilities."""
    classified = [s.decision.probability_covid for s in slices
                  if s.decision.classified and s.decision.probability_covid is not None]
    if not classified:
        outcomes = {s.decision.outcome for s in slices}
        outcome = OUTCOME_NOT_CHEST_CT if OUTCOME_NOT_CHEST_CT in outcomes else OUTCOME_NO_LUNGS
        return refuse(outcome, "no slice of the study could be classified"), None
    probability, k = aggregate(classified)
    covid_side = sum(s.decision.label_side == "covid" for s in slices if s.decision.classified)
    decision = decide(probability=probability, threshold=threshold, band=band)
    # In a clinician's words; the rule's name is in the answer's `aggregation`.
    slices_word = "slice" if covid_side == 1 else "slices"
    reasons = [*decision.reasons, f"The study's probability is the average of its {k} most suspicious slices "
               f"(of {len(classified)} analysed); {covid_side} {slices_word} on their own would be called COVID-19"]
    return Decision(decision.outcome, decision.probability_covid, decision.threshold, reasons), k


def _load(store: ModelStore, name: str, version: str | None) -> LoadedModel:
    """One version (production when `version` is None), built and restored from verified weights."""
    from ctscan.imaging.preprocessing import card_preprocessing
    from ctscan.models import load_keras_model

    model, card = load_keras_model(store, name, version)
    gate = FeatureGate.from_dict(card["gate"]) if card.get("gate") else None
    return LoadedModel(
        name=name, version=str(card["version"]), card=card, model=model, input_size=int(card["input_size"]),
        preprocessing=card_preprocessing(card), threshold=float(card["threshold"]),
        calibration=Calibration.from_dict(card.get("calibration")), gate=gate, band=card_band(card))


@dataclass
class LoadedModel:
    name: str
    version: str
    card: ModelCard
    model: Any
    input_size: int
    preprocessing: str
    threshold: float
    calibration: Calibration
    gate: FeatureGate | None
    band: float = DEFAULT_BAND
    _features: Callable[[np.ndarray], np.ndarray] | None = None
    _gradcam: Callable[[np.ndarray], np.ndarray] | None = None

    def outputs(self, inputs: np.ndarray) -> list[MemberOutput]:
        probabilities = self.calibration.apply(predict_probabilities(self.model, inputs))
        distances: list[float | None] = [None] * len(inputs)
        if self.gate is not None:
            if self._features is None:
                from ctscan.gate import feature_extractor

                self._features = feature_extractor(self.model)
            distances = [float(d) for d in self.gate.distance(self._features(inputs))]
        return [MemberOutput(self.name, self.version, float(p), self.threshold, d,
                             self.gate.threshold if self.gate is not None else None, self.band)
                for p, d in zip(probabilities, distances, strict=True)]

    def heatmap(self, pixels: np.ndarray) -> np.ndarray:
        if self._gradcam is None:
            from ctscan.gradcam import make_gradcam

            self._gradcam = make_gradcam(self.model)
        return self._gradcam(pixels)


class Predictor:
    """Production models of a store and the ensemble's pinned member versions, loaded once,
    run in this process."""

    def __init__(self, models: dict[str, LoadedModel], ensemble: EnsembleRule | None,
                 ensemble_members: list[LoadedModel] | None = None) -> None:
        self.models, self.ensemble = models, ensemble
        # The ensemble's members are its record's versions: the production model's entry where
        # the versions agree, else the pinned version loaded for the ensemble alone.
        self.ensemble_members = ensemble_members if ensemble_members is not None else list(models.values())

    @classmethod
    def from_store(cls, store: Any, names: Sequence[str], *, with_ensemble: bool | None = None) -> Predictor:
        """The production versions of `names`, and (with `with_ensemble`, default: two or more
        names) the ensemble with the member versions its record pins."""
        models = {name: _load(store, name, None) for name in names}
        ensemble, members = None, None
        if with_ensemble if with_ensemble is not None else len(models) >= 2:
            record = ensemble_record_for(store)
            members = [models[name] if name in models and models[name].version == record.members[name]
                       else _load(store, name, record.members[name])
                       for name in ensemble_order(list(record.members), list(names))]
            ensemble = EnsembleRule(members={m.name: m.version for m in members},
                                    threshold=float(record["threshold"]),
                                    calibration=Calibration.from_dict(record.get("calibration")),
                                    band=card_band(record))
        return cls(models, ensemble, members)

    def _members(self, model: str) -> list[LoadedModel]:
        if model == ENSEMBLE:
            if self.ensemble is None:
                raise CTScanError("the ensemble was not loaded (it needs its calibration record)")
            return list(self.ensemble_members)
        if model not in self.models:
            raise CTScanError(f"unknown model {model!r}; choose one of {', '.join([*self.models, ENSEMBLE])}")
        return [self.models[model]]

    def classify(self, decoded: Sequence[DecodedImage], *, model: str = ENSEMBLE,
                 explain: bool = False) -> list[SliceResult]:
        members = self._members(model)
        ensemble = self.ensemble if model == ENSEMBLE else None
        results: list[SliceResult] = []
        screened = [prepare(d, LUNG_V1) for d in decoded]  # the lung signals, whatever the models' preprocessing
        accepted = [i for i, (d, p) in enumerate(zip(decoded, screened, strict=True)) if input_refusal(d, p) is None]
        per_member: dict[str, list[MemberOutput]] = {}
        prepared_by: dict[str, list[PreparedSlice]] = {}
        for member in members:
            preprocessor = get_preprocessor(member.preprocessing)
            prepared = [screened[i] if member.preprocessing == LUNG_V1 else preprocessor(decoded[i]) for i in accepted]
            prepared_by[member.name] = prepared
            inputs = np.stack([p.model_input(member.input_size) for p in prepared]) if prepared else None
            per_member[member.name] = member.outputs(inputs) if inputs is not None else []
        position = {index: n for n, index in enumerate(accepted)}
        for index, (image, screen) in enumerate(zip(decoded, screened, strict=True)):
            refusal = input_refusal(image, screen)
            if refusal is not None:
                results.append(SliceResult(refusal, prepared=screen))
                continue
            outputs = [per_member[m.name][position[index]] for m in members]
            decision = slice_decision(outputs, ensemble=ensemble)
            result = SliceResult(decision, outputs, prepared=prepared_by[members[0].name][position[index]])
            if explain and decision.classified:
                explanation = self.explain(image, screen, members,
                                           [prepared_by[m.name][position[index]] for m in members])
                result.heatmap_png, result.heatmap_members = explanation.png, list(explanation.members)
            results.append(result)
        return results

    def explain(self, original: DecodedImage, screen: PreparedSlice, members: Sequence[LoadedModel],
                prepared: Sequence[PreparedSlice]) -> Explanation:
        return explain_members(original, screen, [(m.name, m.heatmap(p.model_input(m.input_size)), p)
                                                  for m, p in zip(members, prepared, strict=True)])

    def classify_study(self, decoded: Sequence[DecodedImage], *, model: str = ENSEMBLE,
                       explain_top: int = 3) -> StudyResult:
        ordered = order_series([d.dicom for d in decoded])
        results = self.classify([decoded[s.upload_index] for s in ordered], model=model)
        members = self._members(model)
        rule = self.ensemble if model == ENSEMBLE else None
        threshold = rule.threshold if rule else members[0].threshold
        decision, k = study_decision(results, threshold=threshold, band=rule.band if rule else members[0].band)
        ranked = sorted((i for i, r in enumerate(results) if r.decision.classified),
                        key=lambda i: -(results[i].decision.probability_covid or 0.0))
        for index in ranked[:explain_top]:
            original = decoded[ordered[index].upload_index]
            prepared = [get_preprocessor(m.preprocessing)(original) for m in members]
            explanation = self.explain(original, prepare(original, LUNG_V1), members, prepared)
            results[index].heatmap_png, results[index].heatmap_members = explanation.png, list(explanation.members)
        return StudyResult(decision=decision, slices=results, positions_mm=[s.position_mm for s in ordered], k=k,
                           upload_order=[s.upload_index for s in ordered])
