"""Each fact written once: the core never imports a service, settings are declared in one
module, URL schemes are told apart in one place, model names come from the registry, and the
services plug into the command line through entry points."""

from __future__ import annotations

import ast
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from ctscan.models import architecture_names

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO_ROOT / "ctscan").rglob("*.py")) + sorted((REPO_ROOT / "services").rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO_ROOT)}:{getattr(node, 'lineno', '?')}"


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def test_the_core_never_imports_a_service() -> None:
    offenders = []
    for path in sorted((REPO_ROOT / "ctscan").rglob("*.py")):
        for node in ast.walk(_tree(path)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [_where(path, node) for name in names if name.split(".")[0] in ("services", "bench")]
    assert offenders == []


def test_settings_classes_live_in_one_module() -> None:
    declared = [_where(path, node) for path in SOURCES for node in ast.walk(_tree(path))
                if isinstance(node, ast.ClassDef)
                and any(getattr(base, "id", getattr(base, "attr", "")) in ("BaseSettings", "Section")
                        for base in node.bases)]
    assert declared and all(place.startswith("ctscan/settings.py:") for place in declared), declared


def test_only_the_object_store_layer_knows_url_schemes() -> None:
    allowed = {"ctscan/objects.py", "ctscan/s3store.py"}
    found = [_where(path, node) for path in SOURCES for node in ast.walk(_tree(path))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("s3://")
             and str(path.relative_to(REPO_ROOT)) not in allowed and id(node) not in _docstrings(_tree(path))]
    # Help texts and messages may show an example URL; nothing may branch on one.
    branching = [place for place in found if "startswith" in _line(place)]
    assert branching == []


def _line(place: str) -> str:
    path, _, line = place.partition(":")
    return (REPO_ROOT / path).read_text().splitlines()[int(line) - 1]


def test_model_names_are_written_only_in_the_registry() -> None:
    names = set(architecture_names())
    found = []
    for path in SOURCES:
        if path.relative_to(REPO_ROOT).as_posix() == "ctscan/models.py":
            continue
        tree = _tree(path)
        docstrings = _docstrings(tree)
        found += [_where(path, node) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings]
    assert found == []


def test_services_plug_into_the_command_line_through_entry_points() -> None:
    services = {entry.name: entry.value for entry in entry_points(group="ctscan.services")}
    assert services == {"inference": "services.inference.main:cli_serve", "web": "services.web.main:cli_serve",
                        "worker": "services.trainer.main:cli_serve"}
    commands = {entry.name: entry.value for entry in entry_points(group="ctscan.commands")}
    assert commands == {"jobs": "services.trainer.cli:register"}
    from ctscan.cli import build_parser

    args = build_parser().parse_args(["serve", "worker", "--concurrency", "2"])
    assert (args.service, args.concurrency) == ("worker", 2)
    assert build_parser().parse_args(["jobs", "list"]).jobs_command == "list"


@pytest.mark.slow  # starts a Python process
def test_access_control_runs_in_every_image() -> None:
    """Keys, accounts and the audit trail are core: the inference and trainer images have no
    Flask or werkzeug, and their `ctscan` command builds its parser with these modules."""
    import subprocess
    import sys

    code = ("import sys; sys.modules.update(flask=None, werkzeug=None, flask_wtf=None); "
            "import ctscan.access, ctscan.audit_trail, ctscan.cli; ctscan.cli.build_parser(); "
            "h = ctscan.access.generate_password_hash('a-long-password-1'); "
            "assert ctscan.access.check_password_hash(h, 'a-long-password-1')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
