"""The S3 backend of `ctscan.storage.objects`: one bucket prefix seen as a folder of objects.

Registered for `s3://bucket/prefix` URLs (AWS S3, MinIO and other S3-compatible servers).
Endpoint, region and tuning come from `ctscan.settings.S3Settings`, credentials from
boto3's usual chain (AWS_ACCESS_KEY_ID...).

Transient errors (connection refused, throttling, 5xx) are retried by botocore's
"standard" retry mode with exponential backoff and a bounded number of attempts; what is
left is turned into one clear `StoreError`. New objects are written with
`If-None-Match: *` so nothing is overwritten even by a concurrent writer.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from ctscan.errors import StoreError, VersionExistsError
from ctscan.settings import S3Settings, get_s3_settings
from ctscan.storage.objects import TEMP_PREFIX, FileSource, ObjectStore, check_key, read_source, source_size

# Error codes that mean "no such object" / "precondition failed" across S3 implementations.
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_EXISTS_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
# Servers that do not implement conditional puts answer one of these; we then rely on the
# check-then-write done before every new object.
_UNSUPPORTED_CODES = {"NotImplemented", "501"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    if not url.startswith("s3://"):
        raise StoreError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise StoreError(f"S3 URL {url!r} names no bucket")
    return bucket, prefix.strip("/")


@lru_cache(maxsize=8)
def _client(endpoint_url: str | None, region: str, addressing_style: str, max_attempts: int,
            connect_timeout: float, read_timeout: float) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=region,
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        s3={"addressing_style": addressing_style},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def s3_client(settings: S3Settings | None = None) -> Any:
    settings = settings or get_s3_settings()
    return _client(settings.endpoint_url, settings.region, settings.addressing_style,
                   settings.max_attempts, settings.connect_timeout, settings.read_timeout)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class S3ObjectStore(ObjectStore):
    """Objects below `s3://bucket/prefix`, addressed by '/'-separated keys relative to it."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None,
                 endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client if client is not None else s3_client()
        self.endpoint_url = endpoint_url if endpoint_url is not None else self.client.meta.endpoint_url
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    @classmethod
    def from_url(cls, url: str, *, settings: S3Settings | None = None) -> S3ObjectStore:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, client=s3_client(settings))

    def child(self, key_prefix: str) -> S3ObjectStore:
        return S3ObjectStore(self.bucket, self._key(key_prefix), client=self.client,
                             endpoint_url=self.endpoint_url)

    def _key(self, key: str) -> str:
        key = check_key(key, self.url)
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def _fail(self, action: str, key: str, exc: Exception) -> StoreError:
        """One clear line for an error botocore gave up on (after its retries)."""
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        where = f"{self.url}/{key}" if key else self.url
        if isinstance(exc, EndpointConnectionError | ConnectionError):
            return StoreError(f"S3 endpoint {self.endpoint_url} is unreachable while trying to {action} "
                              f"{where} (gave up after retries): {exc}")
        if isinstance(exc, NoCredentialsError):
            return StoreError(f"no S3 credentials to {action} {where}; set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY")
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            if code == "NoSuchBucket":
                return StoreError(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint_url}")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                return StoreError(f"S3 refused to {action} {where}: {code} (check credentials and bucket policy)")
            message = exc.response.get("Error", {}).get("Message", "")
            return StoreError(f"S3 could not {action} {where}: {code} {message}".rstrip())
        return StoreError(f"S3 could not {action} {where}: {exc}")

    # --- reading ---------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return bytes(response["Body"].read())
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return None
            raise self._fail("read", key, exc) from None
        except BotoCoreError as exc:
            raise self._fail("read", key, exc) from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return False
            raise self._fail("check", key, exc) from None
        except BotoCoreError as exc:
            raise self._fail("check", key, exc) from None

    def _pages(self, key_prefix: str, delimiter: str | None) -> Iterator[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        base = self._key(key_prefix)
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Prefix": f"{base}/" if base else ""}
        if delimiter:
            arguments["Delimiter"] = delimiter
        try:
            yield from self.client.get_paginator("list_objects_v2").paginate(**arguments)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("list", key_prefix, exc) from None

    def names(self, key_prefix: str = "") -> list[str]:
        base = self._key(key_prefix)
        start = len(f"{base}/") if base else 0
        names: set[str] = set()
        for page in self._pages(key_prefix, "/"):
            names.update(p["Prefix"][start:].rstrip("/") for p in page.get("CommonPrefixes", []))
            names.update(o["Key"][start:] for o in page.get("Contents", []))
        return sorted(n for n in names if n and not n.startswith(TEMP_PREFIX))

    def walk(self, key_prefix: str = "") -> dict[str, int]:
        base = self._key(key_prefix)
        start = len(f"{base}/") if base else 0
        return {o["Key"][start:]: int(o["Size"]) for page in self._pages(key_prefix, None)
                for o in page.get("Contents", [])}

    def download_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(path))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("download", key, exc) from None

    # --- writing ---------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        """A single PUT is atomic for readers."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                   ChecksumSHA256=_b64_sha256(data))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("write", key, exc) from None

    def put_new(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        if self.exists(key):
            raise VersionExistsError(f"{self.url}/{key} already exists; it is never overwritten")
        arguments = {"Bucket": self.bucket, "Key": self._key(key), "Body": data,
                     "ChecksumSHA256": _b64_sha256(data)}
        try:
            self.client.put_object(**arguments, IfNoneMatch="*")
        except ClientError as exc:
            code = _error_code(exc)
            if code in _EXISTS_CODES:
                raise VersionExistsError(f"{self.url}/{key} was written meanwhile; it is never overwritten") from None
            if code not in _UNSUPPORTED_CODES:
                raise self._fail("write", key, exc) from None
            try:  # no conditional puts on this server: the check above is what we have
                self.client.put_object(**arguments)
            except (ClientError, BotoCoreError) as retry_exc:
                raise self._fail("write", key, retry_exc) from None
        except BotoCoreError as exc:
            raise self._fail("write", key, exc) from None

    def put_folder_new(self, key_prefix: str, files: Mapping[str, FileSource], *, marker: str) -> None:
        if marker not in files:
            raise ValueError(f"marker {marker!r} is not one of the files")
        if self.walk(key_prefix):
            raise VersionExistsError(f"{self.url}/{key_prefix} already exists (complete or unfinished); "
                                     "it is never overwritten")
        folder = self.child(key_prefix)
        written: list[str] = []
        try:
            for relative in sorted(files, key=lambda name: name == marker):
                if relative == marker:
                    # Everything else is up, at the size it has here, before the marker says so.
                    stored = folder.walk()
                    short = [name for name in written if stored.get(name) != source_size(files[name])]
                    if short:
                        raise StoreError(f"upload to {folder.url} is incomplete: {len(short)} file(s) "
                                         f"missing or truncated, e.g. {short[0]}")
                folder.put_new(relative, read_source(files[relative]))
                written.append(relative)
        except VersionExistsError:
            raise VersionExistsError(f"{folder.url} was written meanwhile; it is never overwritten") from None
        except StoreError:
            # A failed write leaves nothing behind (best effort: the endpoint may be gone).
            try:
                folder.delete(written)
            except StoreError:
                pass
            raise

    def delete(self, keys: list[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except (ClientError, BotoCoreError) as exc:
                raise self._fail("delete", keys[start], exc) from None
