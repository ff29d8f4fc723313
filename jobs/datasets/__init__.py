"""Pair-file generators for known tasks (`driver.py make-ioi`, `make-greater-than`)."""

from __future__ import annotations

import json

from worker.contract.storage import written_to


def write_jsonl(records: list[dict], location: str) -> None:
    """The records as a JSONL pair file at a local path or a URI (s3://BUCKET/KEY)."""
    try:
        with written_to(str(location)) as stream:
            stream.write("".join(json.dumps(record) + "\n" for record in records).encode())
    except (OSError, ValueError) as error:
        raise ValueError(f"{location}: cannot write it: {str(error).strip().splitlines()[0]}") from None
