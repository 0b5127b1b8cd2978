"""The admin credential (CTSCAN_ADMIN_TOKEN), checked against a verifier kept in the store.

    <model store>/.jobs/.admin-verifier.json   {"salt": hex, "scrypt": hex, "published_at": iso}

The verifier is written once, at set-up (`ctscan admin init`, which `make up`, the compose
seed and the Kubernetes job run; a trainer worker writes it too when it starts on a store
that has none). Every admin command (promote, rollback, keys, accounts, queueing and
cancelling jobs) is checked against it and refused, fail-closed, when the token is missing,
when the store has no verifier or an unreadable one, or when the token is not the one it
verifies. Whoever can write the store can replace the verifier (`ctscan admin init
--replace`): store write access is the root of trust here, as it is for the models.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from datetime import UTC, datetime
from typing import Literal

from ctscan.errors import CTScanError, VersionExistsError
from ctscan.storage.job_records import JOBS_FOLDER
from ctscan.storage.objects import ObjectStore, open_objects

VERIFIER_FILE = ".admin-verifier.json"
VerifierState = Literal["missing", "unreadable", "match", "mismatch"]


class AdminCredentialError(CTScanError):
    """An admin command refused: no token, no or an unreadable verifier, or the wrong token."""


def _token_hash(token: str, salt: bytes) -> str:
    # scrypt: a store reader must not be able to try many tokens per second against it.
    return hashlib.scrypt(token.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32).hex()


class AdminVerifier:
    """The verifier of one store (`jobs` is the store's `.jobs` folder)."""

    def __init__(self, jobs: ObjectStore) -> None:
        self.objects = jobs
        self.url = f"{jobs.url.rstrip('/')}/{VERIFIER_FILE}"

    @classmethod
    def for_store(cls, model_store_url: str) -> AdminVerifier:
        return cls(open_objects(model_store_url).child(JOBS_FOLDER))

    def state(self, token: str) -> VerifierState:
        data = self.objects.get(VERIFIER_FILE)
        if data is None:
            return "missing"
        try:
            verifier = json.loads(data)
            expected, salt = str(verifier["scrypt"]), bytes.fromhex(verifier["salt"])
            if len(salt) < 8 or len(expected) != 64:
                return "unreadable"
        except (ValueError, KeyError, TypeError):
            return "unreadable"
        return "match" if hmac.compare_digest(expected, _token_hash(token, salt)) else "mismatch"

    def _payload(self, token: str) -> bytes:
        salt = secrets.token_bytes(16)
        return json.dumps({"salt": salt.hex(), "scrypt": _token_hash(token, salt),
                           "published_at": datetime.now(UTC).isoformat()}).encode()

    def init(self, token: str, *, replace: bool = False) -> Literal["written", "kept", "replaced"]:
        """Write the verifier of `token`. Kept when it verifies that token already; refused
        when the store holds another (or an unreadable one) unless `replace`."""
        state = self.state(token)
        if state == "match":
            return "kept"
        if state == "missing":
            try:
                self.objects.put_new(VERIFIER_FILE, self._payload(token))
            except VersionExistsError:  # someone else initialised it meanwhile
                return self.init(token, replace=replace)
            return "written"
        if not replace:
            what = "an unreadable verifier" if state == "unreadable" else "the verifier of another token"
            raise AdminCredentialError(
                f"{self.url} holds {what}; to replace it, run `ctscan admin init --replace` with the new "
                "CTSCAN_ADMIN_TOKEN (needs write access to the store)")
        self.objects.put(VERIFIER_FILE, self._payload(token))
        return "replaced"

    def require(self, token: str | None) -> str:
        """`token` when it is the store's admin credential; otherwise AdminCredentialError,
        with what to do."""
        if not token:
            raise AdminCredentialError("set CTSCAN_ADMIN_TOKEN: changing production, API keys, accounts or "
                                       "training jobs needs the admin credential")
        state = self.state(token)
        if state == "missing":
            raise AdminCredentialError(
                f"refused: the store has no admin verifier ({self.url}); run `ctscan admin init` once with "
                "the deployment's CTSCAN_ADMIN_TOKEN (make up, the compose seed and the k8s job do this)")
        if state == "unreadable":
            raise AdminCredentialError(
                f"refused: the admin verifier at {self.url} is unreadable; an operator with write access to "
                "the store must run `ctscan admin init --replace`")
        if state == "mismatch":
            raise AdminCredentialError("admin token rejected: CTSCAN_ADMIN_TOKEN is not the admin credential "
                                       "of this store")
        return token


def require_admin(model_store_url: str) -> str:
    """The admin token from the environment (CTSCAN_ADMIN_TOKEN, never a flag), checked
    against the store's verifier; AdminCredentialError otherwise."""
    from pydantic import ValidationError

    from ctscan.settings import describe_settings_error, get_admin_settings

    try:
        token = get_admin_settings().token()
    except ValidationError as exc:
        raise AdminCredentialError(describe_settings_error(exc)) from None
    return AdminVerifier.for_store(model_store_url).require(token)
