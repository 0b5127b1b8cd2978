"""`ctscan admin`, `ctscan keys`, `ctscan accounts` and `ctscan audit-log`: who may use the
services, and what they did. Changing keys or accounts needs the admin credential, as
promoting does, checked against the store's verifier (`ctscan admin init` writes it)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from ctscan.access.admin_credential import AdminCredentialError, AdminVerifier
from ctscan.access.admin_credential import require_admin as require_admin_at
from ctscan.access.audit_trail import AuditTrail, read_events
from ctscan.access.keys_and_accounts import ROLES, AccessStore, describe_account, describe_key, open_access
from ctscan.errors import CTScanError


def _access(args: argparse.Namespace) -> AccessStore:
    from ctscan.settings import get_store_settings

    return open_access(args.store or get_store_settings().model_store)


def cli_trail() -> AuditTrail:
    from ctscan.settings import get_audit_settings

    return AuditTrail(get_audit_settings().audit_dir, service="cli")


def cli_actor() -> str:
    # The operating-system user who ran the command: the CLI has no login of its own.
    return os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"


def record_admin_action(action: str, *, outcome: str = "ok", **fields: Any) -> None:
    cli_trail().record(action=action, outcome=outcome, actor=cli_actor(), actor_kind="cli", **fields)


def require_admin(store: Any) -> str:
    """The admin credential (CTSCAN_ADMIN_TOKEN, never a flag) checked against the store's
    verifier, fail-closed (ctscan.access.admin_credential)."""
    return require_admin_at(store.url)


def _admin(args: argparse.Namespace, store: AccessStore) -> None:
    require_admin(store)


def _store_url(args: argparse.Namespace) -> str:
    from ctscan.settings import get_store_settings

    return str(args.store or get_store_settings().model_store)


def cmd_admin_init(args: argparse.Namespace) -> int:
    """Write the store's admin verifier from CTSCAN_ADMIN_TOKEN (set-up; idempotent)."""
    from pydantic import ValidationError

    from ctscan.settings import describe_settings_error, get_admin_settings

    try:
        token = get_admin_settings().token()
    except ValidationError as exc:
        raise AdminCredentialError(describe_settings_error(exc)) from None
    if not token:
        raise AdminCredentialError("set CTSCAN_ADMIN_TOKEN to the deployment's admin credential first")
    verifier = AdminVerifier.for_store(_store_url(args))
    outcome = verifier.init(token, replace=args.replace)
    record_admin_action("admin_init", outcome="ok", detail={"verifier": outcome})
    print(f"admin verifier {outcome}: {verifier.url}")
    return 0


def cmd_admin_check(args: argparse.Namespace) -> int:
    """Whether CTSCAN_ADMIN_TOKEN is this store's admin credential (exit 0) or not (exit 2)."""
    verifier = AdminVerifier.for_store(_store_url(args))
    require_admin_at(_store_url(args))
    print(f"CTSCAN_ADMIN_TOKEN is the admin credential of {verifier.url}")
    return 0


def _expiry(days: int | None) -> datetime | None:
    return None if days is None else datetime.now(UTC) + timedelta(days=days)


def cmd_keys_create(args: argparse.Namespace) -> int:
    access = _access(args)
    _admin(args, access)
    if args.key_from_env:
        key = os.environ.get(args.key_from_env, "")
        if not key:
            raise CTScanError(f"{args.key_from_env} is not set")
        record = access.register_key(args.name, key, expires_at=_expiry(args.expires_days),
                                     rate_limit_per_minute=args.rate_limit)
        shown = None
    else:
        record, shown = access.create_key(args.name, expires_at=_expiry(args.expires_days),
                                          rate_limit_per_minute=args.rate_limit)
    record_admin_action("key_create", detail={"key": record.name})
    print(json.dumps({**describe_key(record), **({"key": shown} if shown else {})}, indent=2))
    if shown:
        print("Keep this key now: it is not stored and cannot be shown again.", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    print(json.dumps([describe_key(r) for r in _access(args).list_keys()], indent=2))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    access = _access(args)
    _admin(args, access)
    revoked = access.revoke_key(args.name)
    record_admin_action("key_revoke", detail={"key": args.name, "count": len(revoked)})
    print(json.dumps([describe_key(r) for r in revoked], indent=2))
    return 0


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("New password: ")
    if getpass.getpass("Again: ") != first:
        raise CTScanError("the passwords differ")
    return first


def cmd_accounts_create(args: argparse.Namespace) -> int:
    access = _access(args)
    _admin(args, access)
    record = access.create_account(args.username, role=args.role, password=_password(args))
    record_admin_action("account_create", detail={"account": record.username, "role": record.role})
    print(json.dumps(describe_account(record), indent=2))
    return 0


def cmd_accounts_list(args: argparse.Namespace) -> int:
    print(json.dumps([describe_account(r) for r in _access(args).list_accounts()], indent=2))
    return 0


def cmd_accounts_password(args: argparse.Namespace) -> int:
    access = _access(args)
    _admin(args, access)
    record = access.set_password(args.username, _password(args))
    record_admin_action("account_password", detail={"account": record.username})
    print(json.dumps(describe_account(record), indent=2))
    return 0


def cmd_accounts_role(args: argparse.Namespace) -> int:
    access = _access(args)
    _admin(args, access)
    record = access.set_role(args.username, args.role)
    record_admin_action("account_role", detail={"account": record.username, "role": record.role})
    print(json.dumps(describe_account(record), indent=2))
    return 0


def cmd_accounts_remove(args: argparse.Namespace) -> int:
    access = _access(args)
    _admin(args, access)
    record = access.remove_account(args.username)
    record_admin_action("account_remove", detail={"account": record.username})
    print(json.dumps(describe_account(record), indent=2))
    return 0


def cmd_accounts_disable(args: argparse.Namespace) -> int:
    access = _access(args)
    _admin(args, access)
    record = access.disable_account(args.username)
    record_admin_action("account_disable", detail={"account": record.username})
    print(json.dumps(describe_account(record), indent=2))
    return 0


def _when(text: str) -> datetime:
    """An ISO time (UTC when no zone is given) or a span back from now: 30m, 12h, 7d."""
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if text[:-1].isdigit() and text[-1:] in units:
        return datetime.now(UTC) - timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CTScanError(f"{text!r} is neither an ISO time nor a span like 30m, 12h or 7d") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def cmd_audit_log(args: argparse.Namespace) -> int:
    from ctscan.settings import get_audit_settings

    directory = args.dir or get_audit_settings().audit_dir
    events = read_events(directory, since=_when(args.since) if args.since else None,
                         until=_when(args.until) if args.until else None, actor=args.user,
                         request_id=args.request_id, action=args.action,
                         client_request_id=args.client_request_id)
    count = 0
    for event in events:
        count += 1
        if args.json:
            print(event.model_dump_json(exclude_none=True))
        else:
            print(f"{event.time:%Y-%m-%dT%H:%M:%S}Z {event.service:<9} {event.actor_kind}:{event.actor:<16} "
                  f"{event.action:<14} {event.outcome:<14} {event.model or '-'} {event.model_version or '-'} "
                  f"{event.request_id or '-'}")
    if not args.json:
        print(f"{count} events", file=sys.stderr)
    return 0


def add_access_commands(sub: Any, positive_int: Callable[[str], int]) -> None:
    keys = sub.add_parser("keys", help="API keys for programs calling the inference API").add_subparsers(
        dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key (printed once) or register one from an environment variable")
    create.add_argument("name")
    create.add_argument("--expires-days", type=positive_int)
    create.add_argument("--rate-limit", type=positive_int, help="requests a minute (default: the service's)")
    create.add_argument("--key-from-env", metavar="VAR", help="register the key held in this variable instead")
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_keys_revoke)

    accounts = sub.add_parser("accounts", help="people who log in to the page").add_subparsers(
        dest="accounts_command", required=True)
    create = accounts.add_parser("create")
    create.add_argument("username")
    create.add_argument("--role", choices=ROLES, required=True)
    create.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    create.set_defaults(func=cmd_accounts_create)
    listing = accounts.add_parser("list")
    listing.set_defaults(func=cmd_accounts_list)
    password = accounts.add_parser("set-password")
    password.add_argument("username")
    password.add_argument("--password-stdin", action="store_true")
    password.set_defaults(func=cmd_accounts_password)  # ends the account's sessions
    disable = accounts.add_parser("disable", help="disable an account (ends its sessions)")
    disable.add_argument("username")
    disable.set_defaults(func=cmd_accounts_disable)
    role = accounts.add_parser("set-role", help="change an account's role (ends its sessions)")
    role.add_argument("username")
    role.add_argument("role", choices=ROLES)
    role.set_defaults(func=cmd_accounts_role)
    remove = accounts.add_parser("remove", help="remove an account (ends its sessions)")
    remove.add_argument("username")
    remove.set_defaults(func=cmd_accounts_remove)

    admin = sub.add_parser("admin", help="the admin credential: its verifier in the store").add_subparsers(
        dest="admin_command", required=True)
    init = admin.add_parser("init", help="write the store's admin verifier from CTSCAN_ADMIN_TOKEN (set-up)")
    init.add_argument("--replace", action="store_true",
                      help="replace a verifier of another token or an unreadable one (rotation, repair)")
    init.set_defaults(func=cmd_admin_init)
    check = admin.add_parser("check", help="whether CTSCAN_ADMIN_TOKEN is the store's admin credential")
    check.set_defaults(func=cmd_admin_check)
    for parser in (*keys.choices.values(), *accounts.choices.values(), *admin.choices.values()):
        parser.add_argument("--store", help="model store holding the keys and accounts (default: CTSCAN_MODEL_STORE)")

    audit_log = sub.add_parser("audit-log", help="who asked for which prediction, and what admins did")
    audit_log.add_argument("--user", help="a user name or API key name")
    audit_log.add_argument("--since", help="ISO time or a span back from now (30m, 12h, 7d)")
    audit_log.add_argument("--until")
    audit_log.add_argument("--request-id", help="the id a service minted (X-Request-ID of its answer)")
    audit_log.add_argument("--client-request-id", help="the id a caller sent (kept apart: callers may reuse one)")
    audit_log.add_argument("--action", help="predict, predict_study, login, promote, key_create, ...")
    audit_log.add_argument("--dir", help="audit folder (default: CTSCAN_AUDIT_DIR)")
    audit_log.add_argument("--json", action="store_true", help="one JSON event a line")
    audit_log.set_defaults(func=cmd_audit_log)
