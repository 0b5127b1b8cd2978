"""Print the pinned runtime requirements of the `ctscan` project, one per line.

The Dockerfiles install dependencies from this list (pyproject.toml stays the single source
of pins) before the project itself, so the dependency layer is cached across code changes.

    python docker/requirements.py [--variant cpu|cuda] [--extra NAME]... [pyproject.toml]

Without --extra: the core dependencies only. Each --extra adds that optional-dependency set
of pyproject.toml (`ml`, `inference`, `web`, `trainer`, ...); sets that name the project
itself (`ctscan[ml]`) are expanded, so `--extra inference` lists the core, the ML stack and
the inference service's own packages, each once.

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
from typing import Any

TENSORFLOW_CPU = re.compile(r"^tensorflow-cpu\s*==\s*(?P<version>[\w.]+)$")
SELF_REFERENCE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)\[(?P<extras>[^\]]+)\]$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _expand(project: dict[str, Any], requirements: list[str], seen_extras: set[str]) -> list[str]:
    """Requirements with self-references (`ctscan[ml]`) replaced by those extras' pins."""
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    result: list[str] = []
    for requirement in requirements:
        requirement = requirement.strip()
        match = SELF_REFERENCE.match(requirement.replace(" ", ""))
        if match and _normalise(match["name"]) == _normalise(project["name"]):
            for extra in match["extras"].split(","):
                result.extend(_extra(project, extra.strip(), optional, seen_extras))
            continue
        result.append(requirement)
    return result


def _extra(project: dict[str, Any], extra: str, optional: dict[str, list[str]], seen: set[str]) -> list[str]:
    if extra not in optional:
        raise SystemExit(f"no optional-dependency set {extra!r} in pyproject.toml; "
                         f"known: {', '.join(sorted(optional))}")
    if extra in seen:
        return []
    seen.add(extra)
    return _expand(project, optional[extra], seen)


def requirements(pyproject: Path, *, variant: str, extras: tuple[str, ...] = ()) -> list[str]:
    with pyproject.open("rb") as handle:
        project: dict[str, Any] = tomllib.load(handle)["project"]
    seen: set[str] = set()
    wanted = _expand(project, project["dependencies"], seen)
    for extra in extras:
        wanted.extend(_extra(project, extra, project.get("optional-dependencies", {}), seen))
    pinned: list[str] = []
    for requirement in wanted:
        if "==" not in requirement:
            raise SystemExit(f"unpinned dependency in {pyproject}: {requirement!r}")
        match = TENSORFLOW_CPU.match(requirement)
        if match and variant == "cuda":
            requirement = f"tensorflow[and-cuda]=={match['version']}"
        if requirement not in pinned:
            pinned.append(requirement)
    if variant == "cuda" and not any(r.startswith("tensorflow[and-cuda]") for r in pinned):
        raise SystemExit(f"no tensorflow-cpu pin in {pyproject} (with these extras) to turn into the CUDA variant")
    return pinned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME",
                        help="add this optional-dependency set (repeatable)")
    parser.add_argument("pyproject", nargs="?", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    pins = requirements(args.pyproject, variant=args.variant, extras=tuple(args.extra))
    sys.stdout.write("\n".join(pins) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
