"""Data: the CT data sets a model learns and is measured on. A data set on disk laid out like
UCSD COVID-CT, its samples and the `tf.data` pipelines built from it (`dataset`), published
versions of it on an object store (`versions`), the download of UCSD COVID-CT (`download`) and
the shortcut audit: can cues that say nothing about the lungs predict its labels
(`shortcut_audit`)? Nothing here serves, trains or evaluates a model, and nothing here knows
HTTP or Celery; TensorFlow is loaded only by the functions that build pipelines
(tests/core/test_layering.py)."""
