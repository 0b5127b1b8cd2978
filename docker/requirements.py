"""Print the pinned runtime requirements of the `ctscan` project, one per line.

The Dockerfiles install dependencies from this list (pyproject.toml stays the single source
of pins) before the project itself, so the dependency layer is cached across code changes.

    python docker/requirements.py [--variant cpu|cuda] [pyproject.toml]

`cuda` swaps the `tensorflow-cpu` pin for `tensorflow[and-cuda]` at the same version: that
extra brings CUDA and cuDNN as pip wheels matched to the TensorFlow build, so the GPU image
needs only the host's NVIDIA driver (NVIDIA Container Toolkit), not a CUDA base image.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

TENSORFLOW_CPU = re.compile(r"^tensorflow-cpu\s*==\s*(?P<version>[\w.]+)$")


def requirements(pyproject: Path, *, variant: str) -> list[str]:
    with pyproject.open("rb") as handle:
        dependencies: list[str] = tomllib.load(handle)["project"]["dependencies"]
    pinned = []
    for requirement in dependencies:
        requirement = requirement.strip()
        if "==" not in requirement:
            raise SystemExit(f"unpinned dependency in {pyproject}: {requirement!r}")
        match = TENSORFLOW_CPU.match(requirement)
        if match and variant == "cuda":
            requirement = f"tensorflow[and-cuda]=={match['version']}"
        pinned.append(requirement)
    if variant == "cuda" and not any(r.startswith("tensorflow[and-cuda]") for r in pinned):
        raise SystemExit(f"no tensorflow-cpu pin in {pyproject} to turn into the CUDA variant")
    return pinned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("pyproject", nargs="?", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    sys.stdout.write("\n".join(requirements(args.pyproject, variant=args.variant)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
