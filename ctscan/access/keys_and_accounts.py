"""Who may use the system: API keys for programs and accounts for people.

Both live in the model store under `.access/` (a dot-name: never listed as a model), one
object per key or account, so that two admins creating keys at once cannot overwrite each
other. Nothing secret is stored: a key is kept as its SHA-256 (keys are long random strings,
so a fast hash is enough and lookups stay cheap), a password as a salted scrypt hash (the
standard library's, in werkzeug's format; every service image has it, not all have Flask).
A key is shown once, when it is created.

Key records are found by the first characters of the key's hash, so any high-entropy string
works as a key (an operator may also register one taken from a Secret: `register_key`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError

from ctscan.errors import CTScanError, VersionExistsError
from ctscan.storage.objects import ObjectStore, open_objects

ACCESS_PREFIX = ".access"
KEY_PREFIX = "ctk_"
ROLES = ("clinician", "admin")
Role = Literal["clinician", "admin"]
# The web page's own API key: the one key whose requests may name the signed-in person
# (services/inference/auth.py), so that limits and the audit trail are per person.
PAGE_KEY_NAME = "web"
MIN_KEY_LENGTH = 24
MIN_ACCOUNT_PASSWORD_LENGTH = 12
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_LOOKUP_CHARS = 24  # of the key's SHA-256: the record's object name


class AccessError(CTScanError):
    """A key or account request that cannot be done (unknown name, duplicate, weak secret)."""


def _now() -> datetime:
    return datetime.now(UTC)


def check_name(kind: str, name: str) -> str:
    if not _NAME.match(name or ""):
        raise AccessError(f"{kind} name {name!r} is not valid: use 1-64 letters, digits, '.', '_', '@' or '-'")
    return name


def key_digest(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKeyRecord(BaseModel):
    name: str
    sha256: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    # Requests per minute for this key; None = the service's default.
    rate_limit_per_minute: int | None = Field(default=None, ge=1)

    @property
    def lookup(self) -> str:
        return self.sha256[:_LOOKUP_CHARS]

    def state(self, now: datetime | None = None) -> Literal["active", "revoked", "expired"]:
        now = now or _now()
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


class AccountRecord(BaseModel):
    username: str
    role: Role
    password_hash: str
    created_at: datetime
    disabled_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.disabled_at is None


class SessionsEnded(BaseModel):
    username: str
    ended_at: datetime


R = TypeVar("R", bound=BaseModel)


class AccessStore:
    """Keys and accounts on one object store (the model store's `.access/` folder)."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects.child(ACCESS_PREFIX)
        self.url = objects.url

    def _read(self, key: str, cls: type[R]) -> R | None:
        data = self.objects.get(key)
        if data is None:
            return None
        try:
            return cls.model_validate_json(data)
        except ValidationError:
            return None  # a damaged record authenticates nobody

    # --- API keys ------------------------------------------------------------------------
    def _read_key(self, name: str) -> ApiKeyRecord | None:
        return self._read(f"keys/{name}.json", ApiKeyRecord)

    def list_keys(self) -> list[ApiKeyRecord]:
        records = (self._read_key(name.removesuffix(".json")) for name in self.objects.names("keys"))
        return sorted((r for r in records if r is not None), key=lambda r: (r.name, r.created_at))

    def _active_named(self, name: str) -> list[ApiKeyRecord]:
        return [r for r in self.list_keys() if r.name == name and r.state() == "active"]

    def register_key(self, name: str, key: str, *, expires_at: datetime | None = None,
                     rate_limit_per_minute: int | None = None) -> ApiKeyRecord:
        """Store the hash of `key` under `name`. Idempotent for the same name and key; refused
        for a key that was revoked (a revoked key never comes back) or a name in use."""
        check_name("key", name)
        if len(key.strip()) < MIN_KEY_LENGTH:
            raise AccessError(f"an API key must be at least {MIN_KEY_LENGTH} characters long")
        digest = key_digest(key)
        existing = self._read_key(digest[:_LOOKUP_CHARS])
        if existing is not None:
            if existing.state() == "revoked":
                raise AccessError(f"this key was revoked on {existing.revoked_at:%Y-%m-%d}; create a new one")
            if existing.name != name:
                raise AccessError(f"this key is already registered as {existing.name!r}")
            return existing
        if self._active_named(name):
            raise AccessError(f"an active key named {name!r} exists; revoke it first (ctscan keys revoke {name})")
        if expires_at is not None and expires_at <= _now():
            raise AccessError("the expiry is in the past")
        record = ApiKeyRecord(name=name, sha256=digest, created_at=_now(), expires_at=expires_at,
                              rate_limit_per_minute=rate_limit_per_minute)
        try:
            self.objects.put_new(f"keys/{record.lookup}.json", record.model_dump_json(indent=2).encode())
        except VersionExistsError:
            raise AccessError("this key is already registered") from None
        return record

    def create_key(self, name: str, *, expires_at: datetime | None = None,
                   rate_limit_per_minute: int | None = None) -> tuple[ApiKeyRecord, str]:
        """A new random key: (its record, the key itself — shown once, never stored)."""
        key = new_key()
        return self.register_key(name, key, expires_at=expires_at, rate_limit_per_minute=rate_limit_per_minute), key

    def revoke_key(self, name: str) -> list[ApiKeyRecord]:
        """Revoke every active key named `name`; the records stay (the audit trail names them)."""
        active = self._active_named(check_name("key", name))
        if not active:
            raise AccessError(f"no active key named {name!r}")
        revoked = []
        for record in active:
            updated = record.model_copy(update={"revoked_at": _now()})
            self.objects.put(f"keys/{record.lookup}.json", updated.model_dump_json(indent=2).encode())
            revoked.append(updated)
        return revoked

    def find_key(self, key: str) -> ApiKeyRecord | None:
        """The record of `key` whatever its state, or None when it was never registered."""
        return self.find_digest(key_digest(key))

    def find_digest(self, digest: str) -> ApiKeyRecord | None:
        """The record whose key has this SHA-256 digest, or None. The file name holds only a
        prefix of the digest, so the full digest is compared too (in constant time)."""
        record = self._read_key(digest[:_LOOKUP_CHARS])
        if record is None or not hmac.compare_digest(record.sha256, digest):
            return None
        return record

    # --- accounts ------------------------------------------------------------------------
    def account(self, username: str) -> AccountRecord | None:
        return self._read(f"accounts/{check_name('account', username)}.json", AccountRecord)

    def list_accounts(self) -> list[AccountRecord]:
        records = (self.account(name.removesuffix(".json")) for name in self.objects.names("accounts"))
        return sorted((r for r in records if r is not None), key=lambda r: r.username)

    def _write_account(self, record: AccountRecord, *, new: bool) -> None:
        data = record.model_dump_json(indent=2).encode()
        key = f"accounts/{record.username}.json"
        if new:
            try:
                self.objects.put_new(key, data)
            except VersionExistsError:
                raise AccessError(f"an account named {record.username!r} exists") from None
        else:
            self.objects.put(key, data)

    def create_account(self, username: str, *, role: str, password: str) -> AccountRecord:
        check_name("account", username)
        if role not in ROLES:
            raise AccessError(f"role {role!r} is not one of {', '.join(ROLES)}")
        check_password(password)
        record = AccountRecord(username=username, role=role,  # type: ignore[arg-type]
                               password_hash=generate_password_hash(password), created_at=_now())
        self._write_account(record, new=True)
        return record

    def set_password(self, username: str, password: str) -> AccountRecord:
        record = self._existing_account(username)
        check_password(password)
        updated = record.model_copy(update={"password_hash": generate_password_hash(password)})
        self._write_account(updated, new=False)
        self.end_sessions(username)  # a stolen session must not outlive the old password
        return updated

    def set_role(self, username: str, role: str) -> AccountRecord:
        record = self._existing_account(username)
        if role not in ROLES:
            raise AccessError(f"role {role!r} is not one of {', '.join(ROLES)}")
        updated = record.model_copy(update={"role": role})
        self._write_account(updated, new=False)
        self.end_sessions(username)
        return updated

    def disable_account(self, username: str) -> AccountRecord:
        record = self._existing_account(username)
        updated = record.model_copy(update={"disabled_at": _now()})
        self._write_account(updated, new=False)
        self.end_sessions(username)
        return updated

    def remove_account(self, username: str) -> AccountRecord:
        record = self._existing_account(username)
        self.end_sessions(username)  # first: a removal that stops half-way still logs out
        self.objects.delete([f"accounts/{record.username}.json"])
        return record

    # --- sessions ------------------------------------------------------------------------
    # The page's session cookie is signed, not stored, so ending a session means refusing
    # every cookie of that user issued before a moment kept here (one small object per
    # person, the built-in admin included). Logout, a new password, a new role, disabling
    # and removal all write it: every session of that person ends at once.
    def end_sessions(self, username: str, *, at: datetime | None = None) -> SessionsEnded:
        record = SessionsEnded(username=check_name("account", username), ended_at=at or _now())
        self.objects.put(f"sessions/{record.username}.json", record.model_dump_json().encode())
        return record

    def sessions_ended_at(self, username: str) -> datetime | None:
        """When the sessions of `username` last ended (None: never). An unreadable record
        ends them now: it fails closed."""
        key = f"sessions/{check_name('account', username)}.json"
        data = self.objects.get(key)
        if data is None:
            return None
        try:
            return SessionsEnded.model_validate_json(data).ended_at
        except ValidationError:
            return _now()

    def _existing_account(self, username: str) -> AccountRecord:
        record = self.account(username)
        if record is None:
            raise AccessError(f"no account named {username!r}")
        return record

    def verify_login(self, username: str, password: str) -> AccountRecord | None:
        """The account when the password is right and the account enabled, else None."""
        try:
            record = self.account(username)
        except AccessError:
            record = None
        if record is None:
            # Hash anyway: an unknown name must not answer faster than a wrong password.
            check_password_hash(_DUMMY_HASH, password)
            return None
        if not check_password_hash(record.password_hash, password) or not record.active:
            return None
        return record


# scrypt's cost: 2**15 x 8 x 1 (32 MiB, about 0.1 s a check): slow for a guesser, fine for a login.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 1 << 15, 8, 1


def _scrypt(password: str, salt: str, n: int, r: int, p: int) -> str:
    return hashlib.scrypt(password.encode(), salt=salt.encode(), n=n, r=r, p=p, maxmem=132 * n * r * p,
                          dklen=64).hex()


def generate_password_hash(password: str) -> str:
    salt = secrets.token_urlsafe(12)
    digest = _scrypt(password, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    return f"scrypt:{_SCRYPT_N}:{_SCRYPT_R}:{_SCRYPT_P}${salt}${digest}"


def check_password_hash(stored: str, password: str) -> bool:
    try:
        method, salt, digest = stored.split("$", 2)
        name, n, r, p = method.split(":")
        if name != "scrypt":
            return False
        return hmac.compare_digest(_scrypt(password, salt, int(n), int(r), int(p)), digest)
    except ValueError:
        return False  # a damaged record lets nobody in


_DUMMY_HASH = f"scrypt:{_SCRYPT_N}:{_SCRYPT_R}:{_SCRYPT_P}$dummy-salt${'0' * 128}"


def check_password(password: str) -> str:
    if len(password) < MIN_ACCOUNT_PASSWORD_LENGTH:
        raise AccessError(f"a password must be at least {MIN_ACCOUNT_PASSWORD_LENGTH} characters long")
    if len(set(password)) < 4:
        raise AccessError("this password is too simple")
    return password


def open_access(url: str) -> AccessStore:
    return AccessStore(open_objects(url))


class KeyCheck(BaseModel):
    """What a service learns about a presented key."""

    outcome: Literal["ok", "missing", "unknown", "revoked", "expired"]
    name: str | None = None
    rate_limit_per_minute: int | None = None


class KeyRing:
    """A service's cached view of the stored keys, re-read every `reload_seconds` (so a revoked
    key stops working within that time) and at once, at most every `min_refresh_seconds`, for
    a key it has not seen (so a new key works at once)."""

    def __init__(self, access: AccessStore, *, reload_seconds: float = 5.0, min_refresh_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.access = access
        self.reload_seconds = reload_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self._clock = clock
        self._cache: dict[str, tuple[ApiKeyRecord | None, float]] = {}
        self._lock = threading.Lock()

    def _fresh(self, digest: str, now: float) -> tuple[bool, ApiKeyRecord | None]:
        """(whether the cache may answer for `digest` at `now`, its cached record)."""
        with self._lock:
            cached = self._cache.get(digest)
        if cached is None:
            return False, None
        record, read_at = cached
        return now - read_at < (self.reload_seconds if record is not None else self.min_refresh_seconds), record

    def _record(self, digest: str) -> ApiKeyRecord | None:
        now = self._clock()
        fresh, record = self._fresh(digest, now)
        if fresh:
            return record
        record = self.access.find_digest(digest)
        with self._lock:
            if len(self._cache) > 10_000:  # unknown keys must not grow memory without bound
                self._cache.clear()
            self._cache[digest] = (record, now)
        return record

    def cached(self, key: str | None) -> KeyCheck | None:
        """The answer for a key seen within the reload time, without touching the store; None
        when the store must be read (callers on an event loop then read it off the loop)."""
        if not key or not key.strip():
            return KeyCheck(outcome="missing")
        fresh, record = self._fresh(key_digest(key), self._clock())
        if not fresh or record is None:  # unknown keys: the store, at most every min_refresh_seconds
            return None
        return self._verdict(record)

    def check(self, key: str | None) -> KeyCheck:
        if not key or not key.strip():
            return KeyCheck(outcome="missing")
        record = self._record(key_digest(key))
        if record is None:
            return KeyCheck(outcome="unknown")
        return self._verdict(record)

    @staticmethod
    def _verdict(record: ApiKeyRecord) -> KeyCheck:
        state = record.state()
        if state != "active":
            return KeyCheck(outcome=state, name=record.name)
        return KeyCheck(outcome="ok", name=record.name, rate_limit_per_minute=record.rate_limit_per_minute)


class RateLimiter:
    """Per-key token buckets: `per_minute` requests a minute on average, bursts up to that many."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, updated)
        self._lock = threading.Lock()

    def take(self, name: str, per_minute: int) -> float:
        """0 when the request may go ahead, else the seconds to wait before the next one."""
        now = self._clock()
        rate = per_minute / 60.0
        with self._lock:
            tokens, updated = self._buckets.get(name, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - updated) * rate)
            if tokens >= 1.0:
                self._buckets[name] = (tokens - 1.0, now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (1.0 - tokens) / rate


def describe_key(record: ApiKeyRecord) -> dict[str, str | int | None]:
    """A key as `ctscan keys list` shows it: never the hash."""
    return {"name": record.name, "state": record.state(), "created_at": record.created_at.isoformat(),
            "expires_at": record.expires_at.isoformat() if record.expires_at else None,
            "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
            "rate_limit_per_minute": record.rate_limit_per_minute}


def describe_account(record: AccountRecord) -> dict[str, str | None]:
    return {"username": record.username, "role": record.role, "created_at": record.created_at.isoformat(),
            "disabled_at": record.disabled_at.isoformat() if record.disabled_at else None}

