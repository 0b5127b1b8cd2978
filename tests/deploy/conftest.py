"""Shared helpers for the deployment tests: the repository root and the `ctscan` CLI check."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# stack/ checks a running compose stack: collected only when scripts/compose_test.py
# (`make compose-test`) has started one and says where it is.
collect_ignore = [] if os.environ.get("CTSCAN_STACK_WEB_URL") else ["stack"]
LONG_RUNNING = {"inference", "web", "worker"}


def parse_ctscan(argv: Sequence[str]) -> argparse.Namespace:
    """Parse `ctscan ...` with the real CLI parser; fail the test on any argparse error."""
    from ctscan.cli import build_parser

    assert list(argv)[:1] == ["ctscan"], f"command does not run the ctscan entry point: {argv}"
    try:
        return build_parser().parse_args(list(argv)[1:])
    except SystemExit:
        pytest.fail(f"`{' '.join(argv)}` is not accepted by ctscan's argument parser")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def check_serve_command() -> Callable[[Sequence[str], str], argparse.Namespace]:
    """Assert `argv` is `ctscan serve <service> ...` as the CLI parses it."""

    def check(argv: Sequence[str], service: str) -> argparse.Namespace:
        args = parse_ctscan(argv)
        assert args.command == "serve", f"{argv} is not a `ctscan serve` command"
        assert args.service == service, f"{argv} serves {args.service}, expected {service}"
        if service in ("inference", "web"):
            assert args.host == "0.0.0.0", f"{argv}: a container must listen on 0.0.0.0"
            assert args.port, f"{argv}: give the port explicitly"
        return args

    return check
