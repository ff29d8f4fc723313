"""Pair-file generators for known tasks (`driver.py make-ioi`, `make-greater-than`)."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(records: list[dict], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(record) + "\n" for record in records))
