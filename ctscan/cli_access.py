"""`ctscan keys`, `ctscan accounts` and `ctscan audit-log`: who may use the services, and what
they did. Changing keys or accounts needs the admin credential, as promoting does."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from ctscan.access import ROLES, AccessStore, describe_account, describe_key, open_access
from ctscan.audit_trail import AuditTrail, read_events
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


def require_admin(store: Any) -> None:
    """Changing production needs the admin credential (CTSCAN_ADMIN_TOKEN, never a flag), as
    queueing a job does; once a trainer worker has published its token's verifier in this
    store, the token must be that one."""
    from pydantic import ValidationError

    from ctscan.settings import describe_settings_error, get_admin_settings
    from ctscan.storage.job_records import JobRecords

    try:
        token = get_admin_settings().token()
    except ValidationError as exc:
        raise CTScanError(describe_settings_error(exc)) from None
    if not token:
        raise CTScanError("set CTSCAN_ADMIN_TOKEN: changing production, API keys or accounts needs the admin "
                          "credential")
    if JobRecords.for_store(store.url).token_accepted(token) is False:
        raise CTScanError("admin token rejected: the trainer workers of this store hold another CTSCAN_ADMIN_TOKEN")


def _admin(args: argparse.Namespace, store: AccessStore) -> None:
    require_admin(store)


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
                         request_id=args.request_id, action=args.action)
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
    password.set_defaults(func=cmd_accounts_password)
    disable = accounts.add_parser("disable")
    disable.add_argument("username")
    disable.set_defaults(func=cmd_accounts_disable)
    for parser in (*keys.choices.values(), *accounts.choices.values()):
        parser.add_argument("--store", help="model store holding the keys and accounts (default: CTSCAN_MODEL_STORE)")

    audit_log = sub.add_parser("audit-log", help="who asked for which prediction, and what admins did")
    audit_log.add_argument("--user", help="a user name or API key name")
    audit_log.add_argument("--since", help="ISO time or a span back from now (30m, 12h, 7d)")
    audit_log.add_argument("--until")
    audit_log.add_argument("--request-id")
    audit_log.add_argument("--action", help="predict, predict_study, login, promote, key_create, ...")
    audit_log.add_argument("--dir", help="audit folder (default: CTSCAN_AUDIT_DIR)")
    audit_log.add_argument("--json", action="store_true", help="one JSON event a line")
    audit_log.set_defaults(func=cmd_audit_log)
