"""The running compose stack that scripts/compose_test.py (`make compose-test`) started: its
URLs, secrets and containers come in CTSCAN_STACK_* variables. These tests are collected only
then (tests/deploy/conftest.py leaves this folder out otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import CHROMIUM_ARGS, chromium_executable


@dataclass
class Stack:
    engine: str  # docker | podman
    project: str
    containers: dict[str, str]  # compose service -> container name
    web_url: str
    inference_url: str
    admin_password: str
    api_key: str
    bucket: str
    s3_user: str
    s3_password: str

    def engine_run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([self.engine, *args], capture_output=True, text=True, timeout=timeout, check=False)
        if check:
            assert done.returncode == 0, f"{self.engine} {' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    def exec(self, service: str, *argv: str) -> str:
        return self.engine_run("exec", self.containers[service], *argv).stdout

    def s3(self, *argv: str) -> str:
        """`mc ARGS` in the MinIO container, alias `local` with the stack's credentials."""
        alias = f"MC_HOST_local=http://{self.s3_user}:{self.s3_password}@localhost:9000"
        return self.engine_run("exec", "--env", alias, self.containers["minio"], "mc", *argv).stdout

    def inspect(self, service: str, template: str) -> str:
        return self.engine_run("inspect", "--format", template, self.containers[service]).stdout.strip()


@pytest.fixture(scope="session")
def stack() -> Stack:
    return Stack(
        engine=os.environ["CTSCAN_STACK_ENGINE"],
        project=os.environ["CTSCAN_STACK_PROJECT"],
        containers=json.loads(os.environ["CTSCAN_STACK_CONTAINERS"]),
        web_url=os.environ["CTSCAN_STACK_WEB_URL"],
        inference_url=os.environ["CTSCAN_STACK_INFERENCE_URL"],
        admin_password=os.environ["CTSCAN_STACK_ADMIN_PASSWORD"],
        api_key=os.environ["CTSCAN_STACK_API_KEY"],
        bucket=os.environ["CTSCAN_STACK_BUCKET"],
        s3_user=os.environ["CTSCAN_STACK_S3_USER"],
        s3_password=os.environ["CTSCAN_STACK_S3_PASSWORD"],
    )


@pytest.fixture(scope="session")
def stack_artifacts(artifacts_dir: Path) -> Path:
    folder = artifacts_dir / "compose"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable(), args=CHROMIUM_ARGS)
        yield browser
        browser.close()
