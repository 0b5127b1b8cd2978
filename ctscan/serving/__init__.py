"""Serving: a prediction for a slice or a study without a server. The served decision rule with
its ensemble and heatmaps (`predictor`), the API's answers built in one place (`answers`) and
the ONNX Runtime copies a server loads, made and checked once when a version is saved
(`onnx_runtime`). The inference service, `ctscan predict` and evaluation share it. It imports
the foundation, imaging, the models layer and storage, and the data pipeline only to read the
real CT slices an ONNX copy is checked on; never training, evaluation, publishing or access, and
no web or queue framework (tests/core/test_layering.py)."""
