"""The admin credential fails closed (issue 24's attack): on a fresh store, with a corrupted
verifier (`{"salt":"zz"}`) or with a wrong token, every admin command of `ctscan` is refused
with a message saying what to do; after `ctscan admin init` the right token works."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctscan.access.admin_credential import AdminCredentialError, AdminVerifier
from ctscan.access.keys_and_accounts import open_access
from ctscan.cli import main
from ctscan.settings import get_admin_settings, get_store_settings

TOKEN = "admin-credential-tests-token-0123456789"
# Every command that changes who may do what, or what is served.
ADMIN_COMMANDS = [
    ["keys", "create", "attacker-key"],
    ["keys", "revoke", "victim-key"],
    ["accounts", "create", "mallory", "--role", "admin", "--password-stdin"],
    ["accounts", "set-password", "dr.jones", "--password-stdin"],
    ["accounts", "set-role", "dr.jones", "admin"],
    ["accounts", "disable", "dr.jones"],
    ["accounts", "remove", "dr.jones"],
    ["models", "promote", "mobilenetv2", "20260101T000000Z-aaaa"],
    ["models", "rollback", "mobilenetv2"],
]


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    store = tmp_path / "store"
    access = open_access(str(store))
    access.register_key("victim-key", "ctk_victim-key-" + "v" * 30)
    access.create_account("dr.jones", role="clinician", password="clinician-pass-0123")
    monkeypatch.setenv("CTSCAN_AUDIT_DIR", str(tmp_path / "audit"))
    monkeypatch.setenv("CTSCAN_MODEL_STORE", str(store))
    yield store
    get_admin_settings.cache_clear()
    get_store_settings.cache_clear()


def _run(argv: list[str], *, token: str | None, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture[str], store: Path) -> tuple[int, str]:
    if token is None:
        monkeypatch.delenv("CTSCAN_ADMIN_TOKEN", raising=False)
    else:
        monkeypatch.setenv("CTSCAN_ADMIN_TOKEN", token)
    get_admin_settings.cache_clear()
    monkeypatch.setattr("sys.stdin", io.StringIO("mallorys-password-0123\n"))
    needs_store = argv[0] in ("keys", "accounts", "admin", "models")
    status = main([*argv, "--store", str(store)] if needs_store else argv)
    return status, capsys.readouterr().err


def _unchanged(store: Path) -> None:
    access = open_access(str(store))
    assert [k.name for k in access.list_keys()] == ["victim-key"]
    assert [k.state() for k in access.list_keys()] == ["active"]
    [account] = access.list_accounts()
    assert (account.username, account.role, account.active) == ("dr.jones", "clinician", True)


@pytest.mark.parametrize("argv", ADMIN_COMMANDS, ids=lambda argv: " ".join(argv[:2]))
def test_a_fresh_store_refuses_every_admin_command_whatever_the_token(
        argv: list[str], store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    status, error = _run(argv, token="any-token-the-attacker-likes-01", monkeypatch=monkeypatch, capsys=capsys,
                         store=store)
    assert status == 2 and "no admin verifier" in error and "ctscan admin init" in error
    _unchanged(store)


@pytest.mark.parametrize("verifier", ['{"salt":"zz"}', "not json", '{"salt": "00", "scrypt": "11"}', "{}"])
def test_a_corrupt_verifier_refuses_every_admin_command(
        verifier: str, store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (store / ".jobs").mkdir(parents=True, exist_ok=True)
    (store / ".jobs" / ".admin-verifier.json").write_text(verifier)
    for argv in ADMIN_COMMANDS:
        status, error = _run(argv, token=TOKEN, monkeypatch=monkeypatch, capsys=capsys, store=store)
        assert status == 2 and "unreadable" in error and "--replace" in error, (argv, error)
    _unchanged(store)


def test_after_init_only_the_right_token_works(store: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    status, _ = _run(["admin", "init"], token=TOKEN, monkeypatch=monkeypatch, capsys=capsys, store=store)
    assert status == 0
    for argv in ADMIN_COMMANDS:
        status, error = _run(argv, token="a-wrong-token-0123456789", monkeypatch=monkeypatch, capsys=capsys,
                             store=store)
        assert status == 2 and "admin token rejected" in error, (argv, error)
        status, error = _run(argv, token=None, monkeypatch=monkeypatch, capsys=capsys, store=store)
        assert status == 2 and "set CTSCAN_ADMIN_TOKEN" in error, (argv, error)
    _unchanged(store)
    status, _ = _run(["keys", "create", "ward-7"], token=TOKEN, monkeypatch=monkeypatch, capsys=capsys, store=store)
    assert status == 0
    status, _ = _run(["accounts", "set-role", "dr.jones", "admin"], token=TOKEN, monkeypatch=monkeypatch,
                     capsys=capsys, store=store)
    assert status == 0 and open_access(str(store)).account("dr.jones").role == "admin"  # type: ignore[union-attr]


def test_init_keeps_its_token_and_replaces_only_when_told(store: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["admin", "init"], token=TOKEN, monkeypatch=monkeypatch, capsys=capsys, store=store)[0] == 0
    before = (store / ".jobs" / ".admin-verifier.json").read_bytes()
    assert _run(["admin", "init"], token=TOKEN, monkeypatch=monkeypatch, capsys=capsys, store=store)[0] == 0
    assert (store / ".jobs" / ".admin-verifier.json").read_bytes() == before  # idempotent
    # Another token cannot take the store over by running init again...
    status, error = _run(["admin", "init"], token="an-attackers-token-0123456", monkeypatch=monkeypatch,
                         capsys=capsys, store=store)
    assert status == 2 and "another token" in error
    assert _run(["admin", "check"], token=TOKEN, monkeypatch=monkeypatch, capsys=capsys, store=store)[0] == 0
    # ...only a deliberate replacement (rotation) does, and then the old token stops working.
    new = "the-rotated-admin-token-0123456"
    assert _run(["admin", "init", "--replace"], token=new, monkeypatch=monkeypatch, capsys=capsys, store=store)[0] == 0
    assert _run(["admin", "check"], token=TOKEN, monkeypatch=monkeypatch, capsys=capsys, store=store)[0] == 2
    assert _run(["admin", "check"], token=new, monkeypatch=monkeypatch, capsys=capsys, store=store)[0] == 0
    verifier = json.loads((store / ".jobs" / ".admin-verifier.json").read_text())
    assert TOKEN not in json.dumps(verifier) and new not in json.dumps(verifier)  # only a salted hash


def test_the_verifier_written_by_a_worker_is_never_replaced_by_another_worker(tmp_path: Path) -> None:
    verifier = AdminVerifier.for_store(str(tmp_path / "store"))
    verifier.init(TOKEN)  # the first worker on a fresh store, as services/trainer/main.py does
    with pytest.raises(AdminCredentialError, match="another token"):
        verifier.init("a-worker-with-another-token-01")
    assert AdminVerifier.for_store(str(tmp_path / "store")).require(TOKEN) == TOKEN
