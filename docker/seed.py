"""One-shot seed job for docker compose: bucket, release models and (optionally) the dataset.

1. creates the S3 bucket named in CTSCAN_MODEL_STORE (s3://bucket/prefix) if it is missing;
2. copies the shipped release (CTSCAN_RELEASE_DIR, mounted from ./models) into that store
   with `ctscan models seed` (never replaces what the store already holds);
3. writes the store's admin verifier from CTSCAN_ADMIN_TOKEN (`ctscan admin init`): without
   it every admin command is refused; a store that verifies another token stops the seed;
4. when CTSCAN_SEED_DATASET_DIR holds a dataset (split.csv), publishes it to
   CTSCAN_DATASETS_URL as dataset `ucsd-covid-ct` (CTSCAN_SEED_DATASET_NAME), unless the same
   data is already published there, so the admin console can queue a job at once; and makes
   the ONNX copy of every version that came without one (`ctscan models export-onnx`, checked
   on that data's real images; `make setup` makes them for ./models, and the seed copies those).

Idempotent: running it again changes nothing. Exits non-zero, naming the step, on failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse


def ensure_bucket(store_url: str) -> None:
    import boto3
    from botocore.exceptions import ClientError

    bucket = urlparse(store_url).netloc
    client = boto3.client("s3", endpoint_url=os.environ.get("CTSCAN_S3_ENDPOINT_URL") or None)
    try:
        client.head_bucket(Bucket=bucket)
        print(f"seed: bucket {bucket} exists")
    except ClientError:
        client.create_bucket(Bucket=bucket)
        print(f"seed: created bucket {bucket}")


def main() -> int:
    from ctscan.cli import main as ctscan_main

    store = os.environ.get("CTSCAN_MODEL_STORE", "")
    if not store.startswith("s3://"):
        print(f"seed: CTSCAN_MODEL_STORE must be s3://bucket/prefix, got {store!r}", file=sys.stderr)
        return 2
    ensure_bucket(store)
    release = os.environ.get("CTSCAN_RELEASE_DIR", "/app/models")
    status = ctscan_main(["models", "seed", "--release", release, "--store", store])
    if status:
        print(f"seed: copying the release from {release} failed (is ./models present?)", file=sys.stderr)
        return status
    if os.environ.get("CTSCAN_ADMIN_TOKEN"):
        status = ctscan_main(["admin", "init", "--store", store])
        if status:
            print("seed: writing the admin verifier failed (see above)", file=sys.stderr)
            return status
    else:
        print("seed: CTSCAN_ADMIN_TOKEN is not set: no admin verifier written, admin commands stay refused",
              file=sys.stderr)
    dataset = Path(os.environ.get("CTSCAN_SEED_DATASET_DIR", "/dataset"))
    datasets_url = os.environ.get("CTSCAN_DATASETS_URL", "")
    if (dataset / "split.csv").is_file() and datasets_url:
        from ctscan.data.versions import publish_once
        from ctscan.errors import CTScanError

        name = os.environ.get("CTSCAN_SEED_DATASET_NAME") or "ucsd-covid-ct"
        try:
            version, published = publish_once(dataset, datasets_url, name)
        except CTScanError as exc:
            print(f"seed: publishing the dataset from {dataset} failed: {exc}", file=sys.stderr)
            return 1
        print(f"seed: dataset {name} version {version} {'published' if published else 'already published'} "
              f"in {datasets_url}")
        if ctscan_main(["models", "export-onnx", "--store", store, "--data", str(dataset)]):
            # Only a speed-up: inference serves those versions with TensorFlow and says why.
            print("seed: some ONNX copies could not be made; see above", file=sys.stderr)
    else:
        print(f"seed: no dataset at {dataset} (set CTSCAN_DATASET_DIR to publish one); skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
