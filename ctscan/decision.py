"""From calibrated probabilities to what a clinician is told: the outcome of one slice or study.

Outcomes (API version 2):
- `covid` / `non_covid`: the calibrated probability of COVID-19 lies clearly above / below
  the decision threshold chosen on the validation split;
- `indeterminate`: it lies within `band` of the threshold, or the ensemble's members
  disagree: review by a radiologist, no label is given;
- `no_lungs_visible`: the preprocessing found no lungs (abdomen, neck, outside the chest);
- `not_chest_ct`: the input is not a CT (DICOM modality) or lies far from anything the
  models were trained on (`ctscan.gate`).
The last two come without a probability: nothing is classified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctscan.gate import OUTCOME_NO_LUNGS, OUTCOME_NOT_CHEST_CT

API_VERSION = 2
COVID = "covid"
NON_COVID = "non_covid"
INDETERMINATE = "indeterminate"
OUTCOMES = (COVID, NON_COVID, INDETERMINATE, OUTCOME_NO_LUNGS, OUTCOME_NOT_CHEST_CT)
REFUSALS = (OUTCOME_NO_LUNGS, OUTCOME_NOT_CHEST_CT)
DEFAULT_BAND = 0.10  # for models whose card predates a band chosen on val
BAND_TARGET_ACCURACY = 0.85  # answers outside the band should be right this often on val...
BAND_MAX_SHARE = 0.5  # ...without calling more than this share of val indeterminate
BAND_STEPS = tuple(round(0.02 * i, 2) for i in range(1, 21))  # 0.02 .. 0.40

# What the page says for each outcome (plain words, no jargon).
OUTCOME_TEXT = {
    COVID: "Findings consistent with COVID-19 pneumonia",
    NON_COVID: "No COVID-19 pattern found",
    INDETERMINATE: "Indeterminate: review by a radiologist",
    OUTCOME_NO_LUNGS: "Not analysed: no lungs visible in this slice",
    OUTCOME_NOT_CHEST_CT: "Not analysed: this does not look like an axial chest CT slice",
}
# The first API's labels, kept for clients of version 1.
LEGACY_LABELS = {COVID: "COVID", NON_COVID: "non-COVID"}


@dataclass(frozen=True)
class Decision:
    outcome: str
    probability_covid: float | None  # calibrated; None when nothing was classified
    threshold: float | None
    reasons: list[str] = field(default_factory=list)

    @property
    def classified(self) -> bool:
        return self.outcome not in REFUSALS

    @property
    def label_side(self) -> str | None:
        """Which side of the threshold the probability lies on (also for indeterminate)."""
        if self.probability_covid is None or self.threshold is None:
            return None
        return COVID if self.probability_covid >= self.threshold else NON_COVID

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "probability_covid": self.probability_covid,
                "threshold": self.threshold, "reasons": list(self.reasons)}


def decide(*, probability: float, threshold: float, band: float = DEFAULT_BAND,
           members_disagree: bool = False) -> Decision:
    """The outcome of a classified slice or study."""
    reasons = []
    if abs(probability - threshold) < band:
        reasons.append(f"the probability of COVID-19 ({probability:.0%}) lies within {band:.0%} of the "
                       f"decision threshold ({threshold:.0%})")
    if members_disagree:
        reasons.append("the ensemble's models disagree")
    if reasons:
        return Decision(INDETERMINATE, probability, threshold, reasons)
    return Decision(COVID if probability >= threshold else NON_COVID, probability, threshold, [])


def choose_band(targets: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, Any]:
    """The indeterminate band's half-width, chosen on val: the narrowest for which the
    answers outside it reach BAND_TARGET_ACCURACY, as long as at most BAND_MAX_SHARE of the
    val slices fall inside; else the widest allowed (and say the target was missed)."""
    targets = np.asarray(targets) >= 0.5
    probabilities = np.asarray(probabilities, dtype=np.float64)
    best: dict[str, Any] | None = None
    for band in BAND_STEPS:
        inside = np.abs(probabilities - threshold) < band
        if inside.mean() > BAND_MAX_SHARE:
            break
        outside = ~inside
        accuracy = float(np.mean((probabilities[outside] >= threshold) == targets[outside])) if outside.any() else 1.0
        best = {"band": band, "indeterminate_share": float(inside.mean()), "accuracy_outside": accuracy,
                "target_accuracy": BAND_TARGET_ACCURACY, "target_met": accuracy >= BAND_TARGET_ACCURACY}
        if accuracy >= BAND_TARGET_ACCURACY:
            break
    return best or {"band": BAND_STEPS[0], "indeterminate_share": None, "accuracy_outside": None,
                    "target_accuracy": BAND_TARGET_ACCURACY, "target_met": False}


def refuse(outcome: str, reason: str) -> Decision:
    if outcome not in REFUSALS:
        raise ValueError(f"{outcome!r} is not a refusal outcome")
    return Decision(outcome, None, None, [reason])
