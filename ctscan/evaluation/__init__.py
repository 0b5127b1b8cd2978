"""Evaluation: how well the store's models do, measured on a data set's split. The served models
and their ensemble on a split, with calibration and the ensemble's fitted band (`reports`),
lesion-true numbers: within-patient AUC, matched pairs, baselines (`lesion_metrics`), robustness
to benign changes and Grad-CAM attention in the lungs (`robustness`), and the decision rule's
refusal rates on what is not a CT slice (`safety`). It sits above training, serving and
publishing and may import them; nothing below imports it, and the inference service never loads
it (tests/core/test_layering.py)."""
