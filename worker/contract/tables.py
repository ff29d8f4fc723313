"""Arrow schemas of the result tables (see docs/DESIGN.md) and the builders that fill them.

The patched value's column, and the pairs' baseline columns, are named after the run's
metric (`logit_diff`, `clean_logit_diff`, ...); the metric and the direction are also in
each table's schema metadata, so a saved file says how to read it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from worker.contract.options import METRICS, PatchOptions
from worker.contract.pairs import Pair


def effects_schema(metric: str) -> pa.Schema:
    return pa.schema(
        [
            ("pair_id", pa.string()),
            ("component", pa.string()),
            ("layer", pa.int16()),
            ("position", pa.int16()),
            ("head", pa.int16()),
            (metric, pa.float32()),
            ("score", pa.float32()),
            ("estimate", pa.float32()),  # AtP's (AtP*'s) estimate of `score`; null in exact runs
            ("graddrop", pa.float32()),  # AtP*'s GradDrop size of the effect over |clean - corrupted|; else null
        ]
    )


def paths_schema(metric: str) -> pa.Schema:
    return pa.schema(
        [
            ("pair_id", pa.string()),
            ("sender_layer", pa.int16()),
            ("sender_head", pa.int16()),
            ("sender_position", pa.int16()),  # null: the sender patched at every position
            ("receiver", pa.string()),  # `logits`, or a head set such as 9.9:q,9.6:q@END
            (metric, pa.float32()),
            ("score", pa.float32()),
        ]
    )


def edges_schema(metric: str) -> pa.Schema:
    names = pa.dictionary(pa.int32(), pa.string())  # a few hundred distinct names over millions of rows
    return pa.schema(
        [
            ("pair_id", pa.string()),
            ("edge", names),  # `sender->receiver`, EAP-IG's name (worker/engines/eap.py)
            ("sender", names),
            ("receiver", names),
            (metric, pa.float32()),  # the patched metric of an exactly patched edge; null otherwise
            ("score", pa.float32()),
            ("estimate", pa.float32()),  # EAP's (or EAP-IG's) estimate of `score`
        ]
    )


def faithfulness_schema(metric: str) -> pa.Schema:
    return pa.schema(
        [
            ("pair_id", pa.string()),
            ("circuit", pa.dictionary(pa.int32(), pa.string())),  # its name: OUT/circuits/NAME.json; `empty`: no edge
            ("edges", pa.int32()),  # how many edges it keeps
            (metric, pa.float32()),  # the clean run's metric with every edge outside the circuit ablated
            ("faithfulness", pa.float32()),  # (metric - empty's) / (clean's - empty's)
        ]
    )


def pair_columns(metric: str) -> list[tuple[str, pa.DataType]]:
    return [
        ("pair_id", pa.string()),
        ("clean", pa.string()),
        ("corrupted", pa.string()),
        ("correct", pa.list_(pa.string())),
        ("incorrect", pa.list_(pa.string())),
        ("correct_ids", pa.list_(pa.int32())),
        ("incorrect_ids", pa.list_(pa.int32())),
        ("n_tokens", pa.int16()),
        ("tokens", pa.list_(pa.string())),
        ("labels", pa.list_(pa.string())),
        (f"clean_{metric}", pa.float32()),
        (f"corrupted_{metric}", pa.float32()),
    ]


DONOR_PAIR_ID = "donor_pair_id"  # pairs, with --donor resample: the pair each one resamples from

RESULT_COLUMNS = (
    {DONOR_PAIR_ID}
    | {
        name
        for metric in METRICS
        for schema in (effects_schema(metric), paths_schema(metric), edges_schema(metric), faithfulness_schema(metric))
        for name in schema.names
    }
    | {name for metric in METRICS for name, _ in pair_columns(metric)}
)


def with_metadata(table: pa.Table, options: PatchOptions) -> pa.Table:
    """Record how to read `score` (the direction, the donor) and which metric the values are, in the table itself."""
    return table.replace_schema_metadata(
        {
            b"patchsweep.direction": options.direction.encode(),
            b"patchsweep.metric": options.metric.encode(),
            b"patchsweep.donor": options.donor.encode(),
        }
    )


def effects_table(columns: dict[str, Sequence], options: PatchOptions) -> pa.Table:
    return with_metadata(pa.table(columns, schema=effects_schema(options.metric)), options)


def paths_table(columns: dict[str, Sequence], options: PatchOptions) -> pa.Table:
    return with_metadata(pa.table(columns, schema=paths_schema(options.metric)), options)


def edges_table(columns: dict[str, Sequence], options: PatchOptions) -> pa.Table:
    return with_metadata(pa.table(columns, schema=edges_schema(options.metric)), options)


def faithfulness_table(columns: dict[str, Sequence], options: PatchOptions) -> pa.Table:
    return with_metadata(pa.table(columns, schema=faithfulness_schema(options.metric)), options)


def empty_effects(options: PatchOptions) -> pa.Table:
    return with_metadata(effects_schema(options.metric).empty_table(), options)


def pairs_table(
    pairs: Sequence[Pair], clean: Sequence[float], corrupted: Sequence[float], options: PatchOptions
) -> pa.Table:
    """One row per pair; metadata keys become extra columns (null where a pair lacks one)."""
    values = {
        "pair_id": [p.pair_id for p in pairs],
        "clean": [p.clean for p in pairs],
        "corrupted": [p.corrupted for p in pairs],
        "correct": [list(p.correct) for p in pairs],
        "incorrect": [list(p.incorrect) or None for p in pairs],
        "correct_ids": [list(p.correct_ids) for p in pairs],
        "incorrect_ids": [list(p.incorrect_ids) or None for p in pairs],
        "n_tokens": [p.n_tokens for p in pairs],
        "tokens": [list(p.tokens) for p in pairs],
        "labels": [list(p.labels) if p.labels is not None else None for p in pairs],
        f"clean_{options.metric}": list(clean),
        f"corrupted_{options.metric}": list(corrupted),
    }
    table = pa.table(values, schema=pa.schema(pair_columns(options.metric)))
    if options.donor == "resample":
        table = table.append_column(DONOR_PAIR_ID, pa.array([p.donor_pair_id for p in pairs], pa.string()))
    metadata_keys = sorted({key for p in pairs for key in p.metadata})
    for key in metadata_keys:
        table = table.append_column(key, pa.array([p.metadata.get(key) for p in pairs]))
    return with_metadata(table, options)
