"""Storage: bytes under keys on a local folder or S3 (`objects`, `s3store`), the typed records
that cross a process boundary (`records`), and the repositories built on them: model versions
(`store`) and training jobs (`job_records`). Nothing here knows TensorFlow, HTTP or training;
it imports only the core's foundation and settings (tests/core/test_layering.py)."""
