"""Who is using the page: logins, sessions, roles and throttling, as plain functions.

Three modes (WEB_AUTH):
  accounts  people log in with an account from `ctscan accounts create` (or the built-in
            "admin" when WEB_ADMIN_PASSWORD is set); the signed session cookie carries the
            name, the role and the login time, and both are checked here on every request.
  proxy     an authenticating reverse proxy (e.g. an OIDC proxy) has logged people in and
            names them in a header. The page trusts that header blindly, so the proxy MUST
            remove these headers from what clients send, and the page must be reachable only
            through the proxy.
  off       no login: everyone is "local", clinician and admin (a laptop's `make up`).

Every route states who may call it where it is declared (`@allow(Access.CLINICIAN)`, ...);
one that states nothing is refused to everyone (`access_views.guard`, run before each request).

Sessions end on the server: the cookie is signed, not stored, so the store keeps, per person,
the moment their sessions last ended (logout, new password, new role, disabled, removed), and
a cookie issued before it is refused.

Guessing passwords is slowed per address (a lock for a few minutes) and per user name by an
exponential delay; a browser that has logged in as that person before (a signed device
cookie) is not delayed by the name's failures, so guesses from elsewhere cannot lock the
real person out (OWASP's "device cookie" defence).

Nothing here touches Flask's request or session objects: callers pass what they hold.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, TypeVar

from ctscan.access.keys_and_accounts import PAGE_KEY_NAME, AccessError, AccessStore, AccountRecord, open_access
from ctscan.errors import CTScanError
from ctscan.settings import WebSettings
from services.web.console import STORE_ERRORS

log = logging.getLogger("ctscan.web")

Role = Literal["clinician", "admin"]
BUILTIN_ADMIN = "admin"
LOCAL_USER = "local"
# A disabled account is logged out within this many seconds (each process re-reads the store).
ACCOUNT_RECHECK_S = 30.0
MAX_PROXY_NAME = 128
# What reading the store may raise: its own errors, and an unreachable S3 or disk.
STORE_READ_ERRORS: tuple[type[Exception], ...] = (CTScanError, *STORE_ERRORS)
HeaderLookup = Callable[[str], str | None]
# A body a form without files needs (the login, the console's buttons): more is refused unread.
FORM_BODY_LIMIT = 64 * 1024
MULTIPART_OVERHEAD = 64 * 1024


class Access(StrEnum):
    PUBLIC = "public"  # the login, the probe, the stylesheet
    CLINICIAN = "clinician"  # predictions (admins may too)
    ADMIN = "admin"  # the training console


class Body(StrEnum):
    FORM = "form"  # FORM_BODY_LIMIT
    UPLOAD = "upload"  # one slice: WEB_MAX_UPLOAD_MB
    STUDY = "study"  # a study: WEB_MAX_STUDY_MB


@dataclass(frozen=True)
class RouteRule:
    access: Access
    body: Body = Body.FORM


F = TypeVar("F", bound=Callable[..., Any])
RULE_ATTRIBUTE = "ctscan_route_rule"


def allow(access: Access, *, body: Body = Body.FORM) -> Callable[[F], F]:
    """State a route's access (and the body it may take) where it is declared."""
    def mark(view: F) -> F:
        setattr(view, RULE_ATTRIBUTE, RouteRule(access, body))
        return view
    return mark


def rule_of(view: Callable[..., Any] | None) -> RouteRule | None:
    """A view's stated rule; None when it states nothing (then it is refused)."""
    rule = getattr(view, RULE_ATTRIBUTE, None)
    return rule if isinstance(rule, RouteRule) else None


def body_limit(rule: RouteRule, settings: WebSettings) -> int:
    if rule.body is Body.UPLOAD:
        return settings.max_upload_bytes + MULTIPART_OVERHEAD
    if rule.body is Body.STUDY:
        return settings.max_study_bytes + MULTIPART_OVERHEAD
    return FORM_BODY_LIMIT


@dataclass(frozen=True)
class User:
    username: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may(self, role: Role) -> bool:
        """Admins may do what clinicians do; clinicians only that."""
        return self.is_admin or role == "clinician"


class LoginThrottle:
    """Slows password guessing from one address: after `limit` failures within `window_s`,
    refuse logins from it until the window has passed."""

    def __init__(self, limit: int = 5, window_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s = limit, window_s
        self._clock = clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> list[float]:
        return [t for t in self._failures.get(key, []) if now - t < self.window_s]

    def blocked(self, key: str) -> bool:
        now = self._clock()
        with self._lock:
            recent = self._recent(key, now)
            if recent:
                self._failures[key] = recent
            else:
                self._failures.pop(key, None)
            return len(recent) >= self.limit

    def fail(self, key: str) -> None:
        now = self._clock()
        with self._lock:
            if len(self._failures) > 10_000:  # guesses at junk names must not grow memory without bound
                self._failures = {k: r for k in list(self._failures) if (r := self._recent(k, now))}
            self._failures.setdefault(key, []).append(now)

    def clear(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)


class NameDelay:
    """Slows guessing one user name from many addresses without locking its owner out.

    After `free` failures for a name, the next attempt for it must wait `base_s`, then twice
    as long after each further failure, up to `max_s`; an attempt made too early is refused
    without counting. Failures are forgotten `forget_s` after the last one. A browser holding
    the name's device cookie (it logged in as that person before) is not held back by this
    (the caller skips `wait_s`); its own address is still throttled by `LoginThrottle`.
    """

    def __init__(self, *, free: int = 5, base_s: float = 1.0, max_s: float = 900.0, forget_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.base_s, self.max_s, self.forget_s = free, base_s, max_s, forget_s
        self._clock = clock
        self._state: dict[str, tuple[int, float]] = {}  # name -> (failures, last failure)
        self._lock = threading.Lock()

    def delay_after(self, failures: int) -> float:
        if failures < self.free:
            return 0.0
        return min(self.max_s, self.base_s * 2.0 ** (failures - self.free))

    def wait_s(self, key: str) -> float:
        """Seconds until `key` may be tried again (0: now)."""
        now = self._clock()
        with self._lock:
            failures, last = self._state.get(key, (0, now))
            if now - last > self.forget_s:
                self._state.pop(key, None)
                return 0.0
            return max(0.0, last + self.delay_after(failures) - now)

    def fail(self, key: str) -> None:
        now = self._clock()
        with self._lock:
            if len(self._state) > 10_000:
                self._state = {k: v for k, v in self._state.items() if now - v[1] <= self.forget_s}
            failures, _ = self._state.get(key, (0, now))
            self._state[key] = (failures + 1, now)

    def clear(self, key: str) -> None:
        with self._lock:
            self._state.pop(key, None)


def wait_words(seconds: float) -> str:
    whole = max(1, math.ceil(seconds))
    return f"{whole} s" if whole < 120 else f"{math.ceil(whole / 60)} min"


def username_key(username: str) -> str:
    # Throttled case-insensitively: "Alice" and "alice" are one guess target.
    return username.strip().lower()[:64]


@dataclass(frozen=True)
class LoginResult:
    user: User | None
    # Who the audit trail names: the account's name when it exists, else "unknown" (a typed
    # name that is no account may be a password typed into the wrong field).
    actor: str
    reason: str | None = None  # why it was refused: bad_credentials, disabled


class Authenticator:
    """The page's view of the accounts: checks passwords and, every request, that a logged-in
    account still exists, is enabled and still has its role (re-read at most every
    `recheck_s`: a store read per request would be too slow on S3)."""

    def __init__(self, settings: WebSettings, *, access: AccessStore | None = None,
                 recheck_s: float = ACCOUNT_RECHECK_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.mode = settings.auth
        self._access = access
        self.recheck_s = recheck_s
        self._clock = clock
        # username -> (account record, when its sessions last ended (epoch s), read at)
        self._accounts: dict[str, tuple[AccountRecord | None, float | None, float]] = {}
        self._lock = threading.Lock()

    @property
    def access(self) -> AccessStore:
        if self._access is None:
            self._access = open_access(self.settings.store.model_store)
        return self._access

    # --- logging in -------------------------------------------------------------------------
    def _builtin_admin_password(self) -> str | None:
        password = self.settings.admin_password
        return None if password is None else password.get_secret_value()

    def _stored_account(self, username: str) -> AccountRecord | None:
        try:
            return self.access.account(username)
        except AccessError:  # not a valid account name: no such account
            return None

    def login(self, username: str, password: str) -> LoginResult:
        """Check a typed name and password (accounts mode)."""
        username = username.strip()
        builtin = self._builtin_admin_password()
        if builtin is not None and username == BUILTIN_ADMIN:
            # The built-in admin stands in for any stored account of that name.
            if hmac.compare_digest(password.encode(), builtin.encode()):
                return LoginResult(User(BUILTIN_ADMIN, "admin"), actor=BUILTIN_ADMIN)
            return LoginResult(None, actor=BUILTIN_ADMIN, reason="bad_credentials")
        record = self.access.verify_login(username, password)
        if record is not None:
            return LoginResult(User(record.username, record.role), actor=record.username)
        existing = self._stored_account(username)
        if existing is None:
            return LoginResult(None, actor="unknown", reason="bad_credentials")
        return LoginResult(None, actor=existing.username,
                           reason="disabled" if not existing.active else "bad_credentials")

    def account_exists(self, username: str) -> bool:
        username = username.strip()
        if self._builtin_admin_password() is not None and username == BUILTIN_ADMIN:
            return True
        return self._stored_account(username) is not None

    # --- sessions ---------------------------------------------------------------------------
    @staticmethod
    def start_session(session: MutableMapping[str, object], user: User, *, builtin: bool) -> None:
        session.clear()  # a fresh session on login: no fixation of an earlier cookie
        session.update({"user": user.username, "role": user.role, "login_at": time.time(),
                        "builtin": builtin})

    def end_sessions(self, username: str) -> None:
        """End every session of `username` (logout): in this process at once, in the others
        when they next re-read the person (within `recheck_s`)."""
        ended = self.access.end_sessions(username)
        with self._lock:
            cached = self._accounts.get(username)
            if cached is not None:
                self._accounts[username] = (cached[0], ended.ended_at.timestamp(), cached[2])

    def user_of(self, session: Mapping[str, object], header: HeaderLookup) -> User | None:
        """The user making this request, or None (not logged in, session too old, account
        disabled or gone)."""
        if self.mode == "off":
            return User(LOCAL_USER, "admin")
        if self.mode == "proxy":
            return self._proxy_user(header)
        username, login_at = session.get("user"), session.get("login_at")
        if not isinstance(username, str) or not isinstance(login_at, (int, float)):
            return None
        # Checked here, not only by the cookie's lifetime: a copied cookie replays forever.
        age = time.time() - float(login_at)
        if age < 0 or age > self.settings.session_hours * 3600:
            return None
        builtin = bool(session.get("builtin"))
        if builtin and (username != BUILTIN_ADMIN or self._builtin_admin_password() is None):
            return None
        fresh = self._fresh_account(username, builtin=builtin)
        if fresh is None:
            return None
        record, ended_at = fresh
        if ended_at is not None and float(login_at) <= ended_at:
            return None  # logged out (or password, role, account changed) since this login
        if builtin:
            return User(BUILTIN_ADMIN, "admin")
        if record is None or not record.active:
            return None
        return User(record.username, record.role)  # the stored role: a changed role applies at once

    def _fresh_account(self, username: str, *, builtin: bool) -> tuple[AccountRecord | None, float | None] | None:
        """(the account, when its sessions last ended) as of at most `recheck_s` ago; None
        when the store cannot be read and nothing is known of this person."""
        now = self._clock()
        with self._lock:
            cached = self._accounts.get(username)
        if cached is not None and now - cached[2] < self.recheck_s:
            return cached[0], cached[1]
        try:
            record = None if builtin else self._stored_account(username)
            ended = self.access.sessions_ended_at(username)
            ended_at = None if ended is None else ended.timestamp()
        except STORE_READ_ERRORS as exc:
            # A store hiccup must not log everyone out: keep the last answer for one more period.
            log.warning("re-reading account %s failed: %s", username, type(exc).__name__)
            if cached is None:
                return None
            record, ended_at = cached[0], cached[1]
        with self._lock:
            if len(self._accounts) > 10_000:
                self._accounts.clear()
            self._accounts[username] = (record, ended_at, now)
        return record, ended_at

    def _proxy_user(self, header: HeaderLookup) -> User | None:
        name = (header(self.settings.proxy_user_header) or "").strip()
        if not name or len(name) > MAX_PROXY_NAME or not name.isprintable():
            return None
        groups = {g.strip() for g in (header(self.settings.proxy_groups_header) or "").split(",")}
        return User(name, "admin" if self.settings.proxy_admin_group in groups else "clinician")


def register_page_key(settings: WebSettings, *, access: AccessStore | None = None) -> bool:
    """Register the page's inference API key in the store as key "web" (idempotent), so that
    one Secret configures both sides. A failure is logged (with its reason, never the key) and
    the page starts anyway: predictions then fail with a message naming the service desk."""
    if settings.inference_api_key is None:
        return False
    key = settings.inference_api_key.get_secret_value().strip()
    try:
        (access or open_access(settings.store.model_store)).register_key(PAGE_KEY_NAME, key)
    except AccessError as exc:
        log.warning("the page's inference API key could not be registered as %r: %s", PAGE_KEY_NAME, exc)
        return False
    except STORE_READ_ERRORS as exc:
        log.warning("the page's inference API key could not be registered as %r: the store at %s "
                    "cannot be written (%s)", PAGE_KEY_NAME, settings.store.model_store, type(exc).__name__)
        return False
    return True
