"""Arrow schemas of the result tables (see DESIGN.md) and the builders that fill them."""
from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from worker.pairs import Pair

EFFECTS_SCHEMA = pa.schema([
    ("pair_id", pa.string()),
    ("component", pa.string()),
    ("layer", pa.int16()),
    ("position", pa.int16()),
    ("head", pa.int16()),
    ("logit_diff", pa.float32()),
    ("score", pa.float32()),
])

PAIR_COLUMNS = [
    ("pair_id", pa.string()),
    ("clean", pa.string()),
    ("corrupted", pa.string()),
    ("correct", pa.string()),
    ("incorrect", pa.string()),
    ("correct_id", pa.int32()),
    ("incorrect_id", pa.int32()),
    ("n_tokens", pa.int16()),
    ("tokens", pa.list_(pa.string())),
    ("labels", pa.list_(pa.string())),
    ("clean_logit_diff", pa.float32()),
    ("corrupted_logit_diff", pa.float32()),
]


def with_direction(table: pa.Table, direction: str) -> pa.Table:
    """Record the patching direction in the table itself, so a saved file says how to read `score`."""
    return table.replace_schema_metadata({b"patchsweep.direction": direction.encode()})


def effects_table(columns: dict[str, Sequence], direction: str) -> pa.Table:
    return with_direction(pa.table(columns, schema=EFFECTS_SCHEMA), direction)


def empty_effects(direction: str) -> pa.Table:
    return with_direction(EFFECTS_SCHEMA.empty_table(), direction)


def pairs_table(
    pairs: Sequence[Pair], clean_ld: Sequence[float], corrupted_ld: Sequence[float], direction: str
) -> pa.Table:
    """One row per pair; metadata keys become extra columns (null where a pair lacks one)."""
    values = {
        "pair_id": [p.pair_id for p in pairs],
        "clean": [p.clean for p in pairs],
        "corrupted": [p.corrupted for p in pairs],
        "correct": [p.correct for p in pairs],
        "incorrect": [p.incorrect for p in pairs],
        "correct_id": [p.correct_id for p in pairs],
        "incorrect_id": [p.incorrect_id for p in pairs],
        "n_tokens": [p.n_tokens for p in pairs],
        "tokens": [list(p.tokens) for p in pairs],
        "labels": [list(p.labels) if p.labels is not None else None for p in pairs],
        "clean_logit_diff": list(clean_ld),
        "corrupted_logit_diff": list(corrupted_ld),
    }
    table = pa.table(values, schema=pa.schema(PAIR_COLUMNS))
    metadata_keys = sorted({key for p in pairs for key in p.metadata})
    for key in metadata_keys:
        table = table.append_column(key, pa.array([p.metadata.get(key) for p in pairs]))
    return with_direction(table, direction)
