"""API keys, accounts, rate limits and the audit trail, on a real store folder."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from ctscan.access.audit_trail import AuditTrail, read_events, upload_digest
from ctscan.access.keys_and_accounts import AccessError, KeyRing, RateLimiter, open_access
from ctscan.storage.store import open_store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_are_stored_hashed_and_shown_once(tmp_path: Path) -> None:
    access = open_access(str(tmp_path))
    record, key = access.create_key("pacs-bridge", rate_limit_per_minute=30)
    assert key.startswith("ctk_") and len(key) > 40
    stored = "".join(p.read_text() for p in (tmp_path / ".access").rglob("*.json"))
    assert key not in stored and record.sha256 in stored
    assert access.find_key(key) == record and access.find_key(key + "x") is None
    # The access folder is not a model.
    assert open_store(tmp_path).list_models() == []
    with pytest.raises(AccessError, match="active key named"):
        access.create_key("pacs-bridge")


def test_revoked_and_expired_keys_are_refused(tmp_path: Path) -> None:
    access = open_access(str(tmp_path))
    _, key = access.create_key("old-client")
    access.revoke_key("old-client")
    assert access.find_key(key).state() == "revoked"
    with pytest.raises(AccessError, match="revoked"):
        access.register_key("old-client", key)
    with pytest.raises(AccessError, match="no active key"):
        access.revoke_key("old-client")
    record, _ = access.create_key("old-client", expires_at=datetime.now(UTC) + timedelta(days=1))
    assert record.state() == "active"
    assert record.state(datetime.now(UTC) + timedelta(days=2)) == "expired"
    with pytest.raises(AccessError, match="at least"):
        access.register_key("short", "too-short")
    with pytest.raises(AccessError, match="not valid"):
        access.create_key("../escape")


def test_registering_the_same_key_again_is_a_no_op(tmp_path: Path) -> None:
    access = open_access(str(tmp_path))
    key = "operator-chosen-key-" + "k" * 20
    first = access.register_key("web", key)
    assert access.register_key("web", key) == first
    with pytest.raises(AccessError, match="already registered as 'web'"):
        access.register_key("other", key)


def test_key_ring_sees_new_keys_at_once_and_revocations_within_the_reload_time(tmp_path: Path) -> None:
    access = open_access(str(tmp_path))
    clock = Clock()
    ring = KeyRing(access, reload_seconds=5, min_refresh_seconds=1, clock=clock)
    assert ring.check(None).outcome == "missing"
    assert ring.check("ctk_unknown-unknown-unknown").outcome == "unknown"
    key = "lab-key-" + "q" * 30
    assert ring.check(key).outcome == "unknown"
    access.register_key("lab", key)
    assert ring.check(key).outcome == "unknown"  # asked for less than a second ago: cached
    assert ring.cached(key) is None  # unknown keys always go to the store (rate-limited above)
    clock.now += 1.5
    assert ring.check(key).outcome == "ok" and ring.check(key).name == "lab"
    assert ring.cached(key) == ring.check(key) and ring.cached(None).outcome == "missing"
    access.revoke_key("lab")
    clock.now += 4
    assert ring.check(key).outcome == "ok"  # still cached
    clock.now += 2
    assert ring.cached(key) is None  # older than the reload time: read the store again
    assert ring.check(key).outcome == "revoked"


def test_rate_limiter_refills_over_time() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    assert [limiter.take("a", 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("a", 3)
    assert wait == pytest.approx(20.0)  # 3 a minute: one every 20 s
    assert limiter.take("b", 3) == 0.0  # keys do not share a bucket
    clock.now += 20
    assert limiter.take("a", 3) == 0.0


def test_accounts_have_roles_and_hashed_passwords(tmp_path: Path) -> None:
    access = open_access(str(tmp_path))
    access.create_account("dr.house", role="clinician", password="a-long-password-1")
    stored = (tmp_path / ".access" / "accounts" / "dr.house.json").read_text()
    assert "a-long-password-1" not in stored and json.loads(stored)["password_hash"].startswith("scrypt:")
    assert access.verify_login("dr.house", "a-long-password-1").role == "clinician"
    assert access.verify_login("dr.house", "wrong-password-99") is None
    assert access.verify_login("nobody", "a-long-password-1") is None
    assert access.verify_login("../../etc", "a-long-password-1") is None
    with pytest.raises(AccessError, match="at least"):
        access.create_account("short", role="admin", password="short")
    with pytest.raises(AccessError, match="role"):
        access.create_account("root", role="superuser", password="a-long-password-1")
    with pytest.raises(AccessError, match="exists"):
        access.create_account("dr.house", role="admin", password="a-long-password-2")
    access.set_password("dr.house", "another-password-2")
    assert access.verify_login("dr.house", "another-password-2") is not None
    access.disable_account("dr.house")
    assert access.verify_login("dr.house", "another-password-2") is None
    assert [a.username for a in access.list_accounts()] == ["dr.house"]


def test_audit_trail_appends_and_filters(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path, service="inference")
    first = trail.record(action="predict", outcome="covid", actor="pacs", actor_kind="key", request_id="r1",
                         model="ensemble", model_version="v1", upload_sha256=upload_digest([b"abc"]), status=200)
    trail.record(action="promote", outcome="ok", actor="alice", actor_kind="user", model="mobilenetv2")
    files = list(tmp_path.rglob("*.jsonl"))
    assert len(files) == 1 and files[0].parent.name == first.time.date().isoformat()
    (files[0]).open("a").write("not json\n")  # a damaged line is skipped, not fatal
    assert [e.action for e in read_events(tmp_path)] == ["predict", "promote"]
    assert [e.request_id for e in read_events(tmp_path, actor="pacs")] == ["r1"]
    assert [e.actor for e in read_events(tmp_path, action="promote")] == ["alice"]
    assert list(read_events(tmp_path, since=datetime.now(UTC) + timedelta(minutes=1))) == []
    assert first.upload_sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    # Only reviewed fields: nothing else (a patient's name, a file name) can be written.
    with pytest.raises(ValidationError):
        trail.record(action="predict", outcome="ok", actor="x", actor_kind="key", patient_name="Doe^Jane")
    long = trail.record(action="x", outcome="ok", actor="x", actor_kind="cli", detail={"note": "n" * 1000})
    assert len(str(long.detail["note"])) == 200


def test_audit_log_command_filters_by_user_request_and_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctscan.cli import main

    trail = AuditTrail(tmp_path, service="web")
    trail.record(action="login", outcome="ok", actor="alice", actor_kind="user", request_id="req-1")
    trail.record(action="predict", outcome="covid", actor="alice", actor_kind="user", request_id="req-2",
                 model="ensemble", model_version="v7", status=200)
    trail.record(action="promote", outcome="ok", actor="bob", actor_kind="user", model="mobilenetv2")
    assert main(["audit-log", "--dir", str(tmp_path), "--user", "alice", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["action"], e["request_id"]) for e in lines] == [("login", "req-1"), ("predict", "req-2")]
    assert main(["audit-log", "--dir", str(tmp_path), "--request-id", "req-2"]) == 0
    captured = capsys.readouterr()
    assert "predict" in captured.out and "ensemble v7 req-2" in captured.out and "1 events" in captured.err
    assert main(["audit-log", "--dir", str(tmp_path), "--since", "5m", "--action", "promote", "--json"]) == 0
    assert [json.loads(line)["actor"] for line in capsys.readouterr().out.splitlines()] == ["bob"]
    assert main(["audit-log", "--dir", str(tmp_path), "--until", "2000-01-01T00:00", "--json"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["audit-log", "--dir", str(tmp_path), "--since", "yesterday"]) == 2
    assert "neither an ISO time" in capsys.readouterr().err
