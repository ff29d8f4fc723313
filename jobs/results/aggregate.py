"""Dataset-level heatmap values, computed after the per-pair results (never instead of them).

Rows of aggregate.parquet are (component, layer, head, position label[, group]); `head` is
null except for the `head` component. In a path-patching run they are (receiver, sender_layer,
sender_head, sender position label[, group]). Labels come from the pair file's `labels`; unlabelled
pairs are aligned by position index and kept apart by token length (`n_tokens` is set for
them), so no cell mixes unaligned positions. A patch of every position at once (position
null) has the label `all`, whatever the pair's length.
Pairs whose clean and corrupted metric values are closer than `min_gap` would make
the per-pair score explode: they are left out of the score statistics and counted in
`excluded_pairs`, while the dataset-level `normalized_effect` (the TransformerLens-style
ratio of means) uses every pair. In an AtP run `score` (and the metric) exist only on the
verified rows, so their statistics cover those; `*_estimate` cover every row.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.results.curves import curves_table
from jobs.results.intervals import with_interval
from jobs.results.query import QueryError, duckdb_connection
from jobs.store import EDGES, FAITHFULNESS, QUERY_ROWS, Store
from worker.contract.layout import AGGREGATE_FILE, CURVES_FILE, GROUPS_FILE, PAIR_PARTS_DIR, PAIRS_FILE
from worker.contract.options import DEFAULT_METRIC, METHODS
from worker.graph.circuits import EMPTY

DEFAULT_MIN_GAP = 0.1
ALL_POSITIONS = "all"  # the label of rows that patched every position at once

# In stages, so that memory does not grow with the run: per batch of whole results files of about
# `QUERY_ROWS` rows (`Store.row_batches`: their results parts joined with their pairs parts), sums
# per (cell, pair) then per cell, kept in a DuckDB table; at the end, the batches' sums per cell.
# A count of distinct pairs per cell over the whole run keeps a hash set of ids in every group,
# which grows with the run until it runs out of memory, and so does the per (cell, pair) stage
# over a thousand shards at once (docs/PERFORMANCE.md, the scale benchmark).
ESTIMATE_SUMS = """
           count(estimate) AS n_e, sum(estimate::DOUBLE) AS s_e, sum(estimate::DOUBLE * estimate) AS ss_e,"""
ESTIMATE_BATCH_TOTALS = """
           coalesce(sum(n_e) FILTER (WHERE NOT excluded), 0) AS n_e, sum(s_e) FILTER (WHERE NOT excluded) AS s_e,
           sum(ss_e) FILTER (WHERE NOT excluded) AS ss_e,"""
ESTIMATE_TOTALS = """
           sum(n_e)::BIGINT AS n_e, sum(s_e) AS s_e, sum(ss_e) AS ss_e,"""
ESTIMATE_STATISTICS = """
       n_e AS estimate_count, s_e / nullif(n_e, 0) AS mean_estimate,
       CASE WHEN n_e > 1 THEN sqrt(greatest((ss_e - s_e * s_e / n_e) / (n_e - 1), 0)) END AS std_estimate,"""
GRADDROP_SUMS = """
           count(graddrop) AS n_g, sum(graddrop::DOUBLE) AS s_g,"""
GRADDROP_BATCH_TOTALS = """
           coalesce(sum(n_g) FILTER (WHERE NOT excluded), 0) AS n_g, sum(s_g) FILTER (WHERE NOT excluded) AS s_g,"""
GRADDROP_TOTALS = """
           sum(n_g)::BIGINT AS n_g, sum(s_g) AS s_g,"""
GRADDROP_STATISTICS = """
       s_g / nullif(n_g, 0) AS mean_graddrop,"""
LABEL_SQL = (  # a row's label: the pair's label of its position, else the position; `all` for every position
    "CASE WHEN e.{position} IS NULL THEN '" + ALL_POSITIONS + "' "
    "ELSE coalesce(p.labels[e.{position} + 1], CAST(e.{position} AS VARCHAR)) END"
)
BATCH_SQL = """
WITH p AS (
    SELECT pair_id, n_tokens, labels, "clean_{metric}"::DOUBLE AS clean, "corrupted_{metric}"::DOUBLE AS corrupted,
           {group} AS "group",
           abs("clean_{metric}" - "corrupted_{metric}") < {min_gap} AS excluded
    FROM batch_pairs
), cells AS (
    SELECT {cell}, e.{position} AS position, e.score::DOUBLE AS score, {estimate}
           {graddrop} e."{metric}"::DOUBLE AS value,
           p.pair_id, p.clean, p.corrupted, p."group", p.excluded,
           {label} AS label,
           CASE WHEN p.labels IS NULL AND e.{position} IS NOT NULL THEN p.n_tokens END AS length_group
    FROM batch e JOIN p USING (pair_id)
), per_pair AS (
    SELECT {kind}, {layer}, {head}, label, "group", length_group, pair_id, excluded, clean, corrupted,
           count(score) AS n, sum(score) AS s, sum(score * score) AS ss,{estimate_sums}{graddrop_sums}
           count(*) AS n_rows, count(value) AS n_v, sum(value) AS v, count(position) AS n_pos, sum(position) AS pos
    FROM cells
    GROUP BY ALL
)
SELECT {kind}, {layer}, {head}, label, "group", length_group,
       count(*) FILTER (WHERE NOT excluded) AS pairs,
       count(*) FILTER (WHERE excluded) AS excluded_pairs,
       coalesce(sum(n) FILTER (WHERE NOT excluded), 0) AS n, sum(s) FILTER (WHERE NOT excluded) AS s,
       sum(ss) FILTER (WHERE NOT excluded) AS ss,{estimate_batch_totals}{graddrop_batch_totals}
       sum(n_rows) AS n_rows, sum(n_v) AS n_v, sum(v) AS v, sum(clean * n_rows) AS clean,
       sum(corrupted * n_rows) AS corrupted, sum(n_pos) AS n_pos, sum(pos) AS pos
FROM per_pair
GROUP BY ALL
"""
AGGREGATE_SQL = """
WITH sums AS (
    SELECT {kind}, {layer}, {head}, label, "group", length_group,
           sum(pairs)::BIGINT AS pairs, sum(excluded_pairs)::BIGINT AS excluded_pairs, sum(n)::BIGINT AS n,
           sum(s) AS s, sum(ss) AS ss,{estimate_totals}{graddrop_totals}
           sum(n_rows) AS n_rows, sum(n_v) AS n_v, sum(v) AS v, sum(clean) AS clean, sum(corrupted) AS corrupted,
           sum(n_pos) AS n_pos, sum(pos) AS pos
    FROM batches
    GROUP BY ALL
)
SELECT {kind}, CAST({layer} AS SMALLINT) AS {layer}, CAST({head} AS SMALLINT) AS {head}, label, "group",
       CAST(length_group AS SMALLINT) AS n_tokens, pairs, excluded_pairs, n AS count,
       s / nullif(n, 0) AS mean_score,
       CASE WHEN n > 1 THEN sqrt(greatest((ss - s * s / n) / (n - 1), 0)) END AS std_score,{estimate_statistics}
       {graddrop_statistics}
       v / nullif(n_v, 0) AS "mean_{metric}",
       clean / n_rows AS "mean_clean_{metric}",
       corrupted / n_rows AS "mean_corrupted_{metric}",
       CASE WHEN {noise}
            THEN (v / nullif(n_v, 0) - clean / n_rows) / ((corrupted - clean) / n_rows)
            ELSE (v / nullif(n_v, 0) - corrupted / n_rows) / ((clean - corrupted) / n_rows) END
           AS normalized_effect,
       pos / nullif(n_pos, 0) AS mean_position
FROM sums
ORDER BY {kind}, "group" NULLS FIRST, n_tokens NULLS FIRST, {layer}, {head} NULLS FIRST, mean_position, label
"""


EDGE_BATCH_SQL = """
WITH p AS (
    SELECT pair_id, {group} AS "group", abs("clean_{metric}" - "corrupted_{metric}") < {min_gap} AS excluded,
           ("clean_{metric}" - "corrupted_{metric}")::DOUBLE AS gap
    FROM batch_pairs
)
SELECT CAST(e.edge AS VARCHAR) AS edge, CAST(e.sender AS VARCHAR) AS sender, CAST(e.receiver AS VARCHAR) AS receiver,
       p."group",
       count(*) FILTER (WHERE NOT excluded) AS pairs, count(*) FILTER (WHERE excluded) AS excluded_pairs,
       count(e.estimate) FILTER (WHERE NOT excluded) AS n_e, sum(e.estimate::DOUBLE) FILTER (WHERE NOT excluded) AS s_e,
       sum(e.estimate::DOUBLE * e.estimate) FILTER (WHERE NOT excluded) AS ss_e,
       sum(e.estimate::DOUBLE * p.gap) FILTER (WHERE NOT excluded) AS s_x,
       count(e.score) FILTER (WHERE NOT excluded) AS n, sum(e.score::DOUBLE) FILTER (WHERE NOT excluded) AS s,
       sum(e.score::DOUBLE * e.score) FILTER (WHERE NOT excluded) AS ss
FROM batch e JOIN p USING (pair_id)
GROUP BY ALL
"""
EDGE_AGGREGATE_SQL = """
WITH sums AS (
    SELECT edge, sender, receiver, "group", sum(pairs)::BIGINT AS pairs, sum(excluded_pairs)::BIGINT AS excluded_pairs,
           sum(n_e)::BIGINT AS n_e, sum(s_e) AS s_e, sum(ss_e) AS ss_e, sum(s_x) AS s_x,
           sum(n)::BIGINT AS n, sum(s) AS s, sum(ss) AS ss
    FROM batches
    GROUP BY ALL
)
SELECT edge, sender, receiver, "group", pairs, excluded_pairs,
       n_e AS estimate_count, s_e / nullif(n_e, 0) AS mean_estimate,
       CASE WHEN n_e > 1 THEN sqrt(greatest((ss_e - s_e * s_e / n_e) / (n_e - 1), 0)) END AS std_estimate,
       s_x / nullif(n_e, 0) AS mean_effect,
       n AS count, s / nullif(n, 0) AS mean_score,
       CASE WHEN n > 1 THEN sqrt(greatest((ss - s * s / n) / (n - 1), 0)) END AS std_score
FROM sums
ORDER BY "group" NULLS FIRST, abs(mean_estimate) DESC NULLS LAST, edge
"""


FAITHFULNESS_BATCH_SQL = """
WITH f AS (
    SELECT pair_id, CAST(circuit AS VARCHAR) AS circuit, edges, "{metric}"::DOUBLE AS value,
           faithfulness::DOUBLE AS faithfulness
    FROM batch
), p AS (
    SELECT f.pair_id, {group} AS "group", "clean_{metric}"::DOUBLE AS clean, f.value AS empty,
           abs("clean_{metric}" - f.value) < {min_gap} AS excluded
    FROM batch_pairs JOIN f ON f.pair_id = batch_pairs.pair_id AND f.circuit = '{empty}'
)
SELECT f.circuit, f.edges, p."group",
       count(*) FILTER (WHERE NOT excluded) AS pairs, count(*) FILTER (WHERE excluded) AS excluded_pairs,
       count(f.faithfulness) FILTER (WHERE NOT excluded) AS n, sum(f.faithfulness) FILTER (WHERE NOT excluded) AS s,
       sum(f.faithfulness * f.faithfulness) FILTER (WHERE NOT excluded) AS ss,
       sum(f.value) FILTER (WHERE NOT excluded) AS v, sum(p.empty) FILTER (WHERE NOT excluded) AS e,
       sum(p.clean) FILTER (WHERE NOT excluded) AS c
FROM f JOIN p USING (pair_id)
GROUP BY ALL
"""
FAITHFULNESS_AGGREGATE_SQL = """
WITH sums AS (
    SELECT circuit, edges, "group", sum(pairs)::BIGINT AS pairs, sum(excluded_pairs)::BIGINT AS excluded_pairs,
           sum(n)::BIGINT AS n, sum(s) AS s, sum(ss) AS ss, sum(v) AS v, sum(e) AS e, sum(c) AS c
    FROM batches
    GROUP BY ALL
)
SELECT circuit, edges, "group", pairs, excluded_pairs, n AS count, s / nullif(n, 0) AS mean_faithfulness,
       CASE WHEN n > 1 THEN sqrt(greatest((ss - s * s / n) / (n - 1), 0)) END AS std_faithfulness,
       (v - e) / nullif(c - e, 0) AS faithfulness,
       v / nullif(pairs, 0) AS "mean_{metric}", e / nullif(pairs, 0) AS "mean_empty_{metric}",
       c / nullif(pairs, 0) AS "mean_clean_{metric}"
FROM sums
ORDER BY "group" NULLS FIRST, edges, circuit
"""


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def aggregate(
    store: Store,
    direction: str,
    group_by: str | None = None,
    min_gap: float = DEFAULT_MIN_GAP,
    metric: str = DEFAULT_METRIC,
) -> pa.Table:
    """Compute the aggregate table of the run in `store` (its finished shards: results and pairs
    parts) and write it: aggregate.parquet over every pair (`group` null), or with `group_by` one
    row per group to aggregate_groups.parquet, so the overall table never changes meaning."""
    if not store.exists(PAIRS_FILE):
        raise QueryError(f"{store.uri}: no {PAIRS_FILE} here; is this a patchsweep output directory?")
    schema = pq.read_schema(store.path(PAIRS_FILE), filesystem=store.fs)  # every pairs part's columns
    if group_by is not None and group_by not in schema.names:
        raise QueryError(f"cannot group by {group_by!r}: pairs has no such column ({', '.join(schema.names)})")
    if store.kind is EDGES:
        return aggregate_edges(store, group_by, min_gap, metric)
    if store.kind is FAITHFULNESS:
        return aggregate_faithfulness(store, group_by, min_gap, metric)
    (kind, layer, head), position, estimates = store.kind.cell, store.kind.position, store.kind.estimates
    graddrop = METHODS[(store.read_manifest() or {}).get("method", "exact")].ranks_by == "graddrop"  # AtP*
    fields = {
        "kind": kind,
        "layer": layer,
        "head": head,
        "position": position,
        "cell": ", ".join(f"e.{column}" for column in (kind, layer, head)),
        "estimate": "e.estimate," if estimates else "",
        "estimate_sums": ESTIMATE_SUMS if estimates else "",
        "estimate_batch_totals": ESTIMATE_BATCH_TOTALS if estimates else "",
        "estimate_totals": ESTIMATE_TOTALS if estimates else "",
        "estimate_statistics": ESTIMATE_STATISTICS if estimates else "",
        "graddrop": " e.graddrop::DOUBLE AS graddrop," if graddrop else "",
        "graddrop_sums": GRADDROP_SUMS if graddrop else "",
        "graddrop_batch_totals": GRADDROP_BATCH_TOTALS if graddrop else "",
        "graddrop_totals": GRADDROP_TOTALS if graddrop else "",
        "graddrop_statistics": GRADDROP_STATISTICS if graddrop else "",
        "group": "CAST(" + quote_identifier(group_by) + " AS VARCHAR)" if group_by else "NULL::VARCHAR",
        "min_gap": float(min_gap),
        "noise": "true" if direction == "noise" else "false",
        "label": LABEL_SQL.format(position=position),
        "metric": metric,
    }
    table = in_batches(store, schema, BATCH_SQL.format(**fields), AGGREGATE_SQL.format(**fields), QUERY_ROWS)
    return written(store, with_intervals(table, estimates), group_by)


def in_batches(
    store: Store, pairs_schema: pa.Schema, batch_sql: str, total_sql: str, rows: int | None = None
) -> pa.Table:
    """`batch_sql` over each batch of finished shards (views `batch`, `batch_pairs`; `rows`: of
    about that many results rows, for a query grouping per pair, see `Store.row_batches`), then
    `total_sql` over their results (table `batches`, DuckDB's, so under its memory limit):
    memory bounded by a batch, not the run."""
    connection, into = duckdb_connection(threads=1 if rows else None), "CREATE TEMP TABLE batches AS"
    for results, shards in store.row_batches(rows):
        connection.register("batch", results)
        connection.register("batch_pairs", store.parts(PAIR_PARTS_DIR, shards, pairs_schema))
        connection.execute(f"{into} {batch_sql}")
        into = "INSERT INTO batches"
    if into.startswith("CREATE"):
        raise QueryError(f"{store.uri}: no finished shards to aggregate")
    return connection.sql(total_sql).to_arrow_table()


def aggregate_edges(store: Store, group_by: str | None, min_gap: float, metric: str) -> pa.Table:
    """An edges run's aggregate: per edge (and group), the mean, std and count of `estimate` over
    the pairs (those with a gap below `min_gap` left out and counted), and of `score` where exact;
    `mean_effect`, the mean of estimate x (clean - corrupted metric): the edge's estimated effect
    in metric units, positive where it carries the behaviour (MIB's importance score)."""
    schema = pq.read_schema(store.path(PAIRS_FILE), filesystem=store.fs)
    fields = {
        "group": "CAST(" + quote_identifier(group_by) + " AS VARCHAR)" if group_by else "NULL::VARCHAR",
        "min_gap": float(min_gap),
        "metric": metric,
    }
    table = in_batches(store, schema, EDGE_BATCH_SQL.format(**fields), EDGE_AGGREGATE_SQL)
    return written(store, with_intervals(table, estimates=True), group_by)


def aggregate_faithfulness(store: Store, group_by: str | None, min_gap: float, metric: str) -> pa.Table:
    """A circuit run's aggregate: per circuit (and group), the mean, std, 95% interval and count of
    the pairs' faithfulness (pairs whose clean and empty-circuit metrics are closer than `min_gap`
    left out and counted), and MIB's dataset-level faithfulness, the ratio of the means:
    (mean m(C) - mean m(empty)) / (mean m(clean) - mean m(empty)) over the same pairs. Over every
    pair, also the run's curves (jobs/results/curves.py) to curves.parquet."""
    schema = pq.read_schema(store.path(PAIRS_FILE), filesystem=store.fs)
    fields = {
        "group": "CAST(" + quote_identifier(group_by) + " AS VARCHAR)" if group_by else "NULL::VARCHAR",
        "min_gap": float(min_gap),
        "metric": metric,
        "empty": EMPTY,
    }
    table = in_batches(
        store, schema, FAITHFULNESS_BATCH_SQL.format(**fields), FAITHFULNESS_AGGREGATE_SQL.format(**fields)
    )
    table = written(store, with_interval(table, "mean_faithfulness", "std_faithfulness", "count"), group_by)
    if not group_by:
        entries = (store.read_manifest() or {}).get("circuits", [])
        store.write_table(curves_table(table.to_pylist(), entries), CURVES_FILE)
    return table


def with_intervals(table: pa.Table, estimates: bool) -> pa.Table:
    """`table` with the 95% interval of `mean_score` (`ci_low`, `ci_high`) and, where the run
    estimates, of `mean_estimate` (`estimate_ci_low`, `estimate_ci_high`)."""
    table = with_interval(table, "mean_score", "std_score", "count")
    return with_interval(table, "mean_estimate", "std_estimate", "estimate_count", "estimate_") if estimates else table


def written(store: Store, table: pa.Table, group_by: str | None) -> pa.Table:
    """`table` stored as the run's aggregate, or with `group_by` as its grouped aggregate."""
    if group_by:
        table = table.replace_schema_metadata({"patchsweep.group_by": group_by})
    store.write_table(table, GROUPS_FILE if group_by else AGGREGATE_FILE)
    return table
