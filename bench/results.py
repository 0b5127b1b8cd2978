"""Where the benchmarks keep their runs: one JSON per run (for --from-json) and the latest table."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def save_and_print(report: dict[str, Any], render: Callable[[dict[str, Any]], str], *, prefix: str = "") -> str:
    """Write `<prefix><stamp>.json` and `<prefix>latest.md` under bench/results, print the table."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS_DIR / f"{prefix}{stamp}.json").write_text(json.dumps(report, indent=2))
    table = render(report)
    (RESULTS_DIR / f"{prefix}latest.md").write_text(table)
    print(table)
    return table
