"""Split-half stability: would another sample of the same task give the same answer?

The run's pairs (those the min gap keeps) are split into two halves at random, R times (split r
draws a permutation from `numpy.random.default_rng([seed, r])` over the pair ids in sorted
order: the first half of it is half A), each half is aggregated as the run is (per cell, the
mean over its pairs of the pair's mean statistic: `score`, or `estimate` where the run
estimates), and the halves are compared within each scope (a component; a path-patching
receiver; every edge of an edges run):
- `spearman`: the Spearman correlation (average ranks) of the cell means of the two halves, over
  the cells both halves have;
- `top-10 overlap`: the share of half A's 10 cells of largest |mean| among half B's 10;
- for edges also `top-P overlap` at each of MIB's edge budgets P (the share of the top N edges,
  N = int(P / 100 * edges), that both halves keep): how stable a circuit of that size is.

Cells whose effect is float rounding around zero are not ranked: within a scope, a cell mean
within `tolerance` of zero (`NOISE_ULPS` units of the run's dtype's precision times the scope's
largest |mean|) counts as 0, tied with the other zeros in Spearman and left out of the top-k
(whose overlap is then over the larger of the two tops). Rounding in a patched forward (sums
over the model's width, a metric that is the difference of two logits) leaves errors of a few
units of precision of the values it computes; a cell that no patch can move (exactly zero in
exact arithmetic, e.g. one the last position cannot read) would otherwise get a sign from the
CPU's summation order, and Spearman would rank it as an effect.

Each value is one row of `stability.parquet` (view `stability`), the split's number and the
halves' sizes with it; the report gives the median and range per scope and measure. With
`--group-by`, the groups are compared the same way, two at a time (their aggregate's cell
means; `groups` names them, `split` is null): do the templates agree with each other? The pairs
are read a batch of shards at a time, as the aggregate reads them: per batch, its (scope, cell,
pair) means are added into each split's two halves' sums, so memory holds the sums, not the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.results.aggregate import LABEL_SQL
from jobs.results.intervals import t_quantile
from jobs.results.query import duckdb_connection
from jobs.store import EDGES, FAITHFULNESS, Store
from worker.contract.layout import PAIR_PARTS_DIR, PAIRS_FILE, STABILITY_FILE
from worker.graph.circuits import MIB_BUDGETS, budget_edges

DEFAULT_SPLITS = 20
TOP = 10
NOISE_ULPS = 16  # how many units of the dtype's precision, of the scope's largest |mean|, count as zero
PRECISION = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}  # each dtype's machine epsilon
MAX_PAIRS = 100_000  # the report computes stability by default up to this many pairs

CELL_VALUES_SQL = """
WITH p AS (
    SELECT pair_id, n_tokens, labels FROM batch_pairs
    WHERE abs("clean_{metric}" - "corrupted_{metric}") >= {min_gap}
)
SELECT CAST(e.{kind} AS VARCHAR) AS scope,
       concat(e.{layer}, '|', coalesce(CAST(e.{head} AS VARCHAR), ''), '|', {label}, '|',
              CASE WHEN p.labels IS NULL AND e.{position} IS NOT NULL THEN CAST(p.n_tokens AS VARCHAR) ELSE '' END)
           AS cell,
       e.pair_id, avg(e.{statistic}::DOUBLE) AS value
FROM batch e JOIN p USING (pair_id)
WHERE e.{statistic} IS NOT NULL
GROUP BY ALL
"""
EDGE_VALUES_SQL = """
SELECT 'edges' AS scope, CAST(e.edge AS VARCHAR) AS cell, e.pair_id, e.{statistic}::DOUBLE AS value
FROM batch e JOIN batch_pairs p USING (pair_id)
WHERE abs(p."clean_{metric}" - p."corrupted_{metric}") >= {min_gap} AND e.{statistic} IS NOT NULL
"""


@dataclass
class HalfSums:
    """Per split, per half, per (scope, cell): the sum and count of the pairs' values."""

    halves: np.ndarray  # [halvings, pairs] int8: 0 for half A, 1 for half B, 2 for a pair left out
    pair_ids: pa.Array  # in sorted order: a pair's index in `halves`
    cells: dict[tuple[str, str], int] = field(default_factory=dict)
    sums: np.ndarray = field(default_factory=lambda: np.zeros((0,)))
    counts: np.ndarray = field(default_factory=lambda: np.zeros((0,)))

    def add(self, table: pa.Table) -> None:
        """Add a batch's (scope, cell, pair_id, value) rows."""
        keys = pc.binary_join_element_wise(table.column("scope"), table.column("cell"), "\x1f").dictionary_encode()
        keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        for key in keys.dictionary.to_pylist():
            self.cells.setdefault(tuple(key.split("\x1f", 1)), len(self.cells))
        local = np.array([self.cells[tuple(k.split("\x1f", 1))] for k in keys.dictionary.to_pylist()], dtype=np.int64)
        cell = local[keys.indices.to_numpy(zero_copy_only=False)]
        pairs = pc.index_in(table.column("pair_id"), value_set=self.pair_ids).to_numpy(zero_copy_only=False)
        values = table.column("value").to_numpy()
        splits, n = len(self.halves), len(self.cells)
        if self.sums.shape[-1:] != (n,):
            grown = np.zeros((splits, 2, n)), np.zeros((splits, 2, n))
            if self.sums.size:
                grown[0][..., : self.sums.shape[-1]], grown[1][..., : self.counts.shape[-1]] = self.sums, self.counts
            self.sums, self.counts = grown
        for split, halves in enumerate(self.halves):
            at = halves[pairs].astype(np.int64) * n + cell  # a pair left out (2) lands past the two halves' cells
            self.sums[split] += np.bincount(at, weights=values, minlength=3 * n)[: 2 * n].reshape(2, n)
            self.counts[split] += np.bincount(at, minlength=3 * n)[: 2 * n].reshape(2, n)


def halves(pair_ids: Sequence[str] | pa.Array, splits: int, seed: int, size: int | None = None) -> np.ndarray:
    """[splits, pairs] int8 (pairs in sorted id order): each split's random halves of every pair (0
    for A, 1 for B), or with `size` of `size` pairs drawn at random (the rest 2: left out)."""
    if size is None:
        result = np.ones((splits, len(pair_ids)), dtype=np.int8)
        for split in range(splits):
            order = np.random.default_rng([seed, split]).permutation(len(pair_ids))
            result[split, order[: len(pair_ids) // 2]] = 0
        return result
    result = np.full((splits, len(pair_ids)), 2, dtype=np.int8)
    for split in range(splits):
        order = np.random.default_rng([seed, split, size]).permutation(len(pair_ids))
        result[split, order[: size // 2]], result[split, order[size // 2 : size // 2 * 2]] = 0, 1
    return result


def subsample_sizes(n_pairs: int) -> list[int]:
    """The smaller samples "how many pairs" halves too: 8, 16, 32, ... below the run's pairs."""
    sizes, size = [], 8
    while size < n_pairs:
        sizes.append(size)
        size *= 2
    return sizes


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def top_cells(values: np.ndarray, n: int) -> set[int]:
    """The (at most) `n` cells of largest |value|, zeros left out (ties in cell order)."""
    return {i for i in np.argsort(-np.abs(values), kind="mergesort")[:n].tolist() if values[i] != 0}


def top_overlap(a: np.ndarray, b: np.ndarray, n: int) -> float | None:
    """The share of `a`'s `n` largest |values| among `b`'s, over the larger of the two tops: zeros
    (`tied_zeros`) are in neither; None where both halves are all zeros."""
    top_a, top_b = top_cells(a, n), top_cells(b, n)
    if not (top_a or top_b):
        return None
    return len(top_a & top_b) / max(len(top_a), len(top_b))


def tolerance(a: np.ndarray, b: np.ndarray, dtype: str) -> float:
    """How close to zero a cell mean of `a` or `b` is float rounding: `NOISE_ULPS` units of the
    run's dtype's precision times the largest |mean| of either half."""
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0))
    return NOISE_ULPS * PRECISION[dtype] * scale


def tied_zeros(values: np.ndarray, within: float) -> np.ndarray:
    return np.where(np.abs(values) <= within, 0.0, values)


def measures(scope: str, a: np.ndarray, b: np.ndarray, dtype: str) -> list[tuple[str, float | None]]:
    """The two halves' (or groups') agreement over the same cells, float noise around zero tied at 0."""
    within = tolerance(a, b, dtype)
    a, b = tied_zeros(a, within), tied_zeros(b, within)
    found = [("spearman", spearman(a, b)), (f"top-{TOP} overlap", top_overlap(a, b, TOP))]
    if scope == "edges":
        found += [(f"top-{budget} overlap", top_overlap(a, b, budget_edges(budget, len(a)))) for budget in MIB_BUDGETS]
    return found


def group_agreement(store: Store, grouped: list[dict], statistic: str, dtype: str) -> list[dict]:
    """Rows comparing every two groups of a grouped aggregate per scope: the measures of two
    halves, over the cells both groups have."""
    if store.kind is EDGES:
        scope_column, cell_columns = None, ("edge",)
    else:
        scope_column, cell_columns = store.kind.cell[0], (*store.kind.cell[1:], "label", "n_tokens")
    means: dict[tuple[str, str], dict[tuple, float]] = {}
    sizes: dict[str, int] = {}
    for row in grouped:
        value = row.get(f"mean_{statistic}")
        if row["group"] is not None and value is not None:
            key = tuple(row.get(column) for column in cell_columns)
            scope = "edges" if scope_column is None else str(row[scope_column])
            means.setdefault((scope, row["group"]), {})[key] = value
            sizes[row["group"]] = max(sizes.get(row["group"], 0), row["pairs"])
    rows = []
    for scope in sorted({scope for scope, _ in means}):
        groups = sorted(group for s, group in means if s == scope)
        for i, first in enumerate(groups):
            for second in groups[i + 1 :]:
                a, b = means[(scope, first)], means[(scope, second)]
                shared = sorted(set(a) & set(b), key=str)
                x, y = np.array([a[k] for k in shared]), np.array([b[k] for k in shared])
                for measure, value in measures(scope, x, y, dtype):
                    rows.append(
                        {
                            "scope": scope,
                            "split": None,
                            "measure": measure,
                            "value": value,
                            "pairs_a": sizes[first],
                            "pairs_b": sizes[second],
                            "groups": f"{first} vs {second}",
                        }
                    )
    return rows


def cell_values_sql(store: Store, metric: str, min_gap: float, statistic: str) -> str:
    fields = {"metric": metric, "min_gap": float(min_gap), "statistic": statistic}
    if store.kind is EDGES:
        return EDGE_VALUES_SQL.format(**fields)
    (kind, layer, head), position = store.kind.cell, store.kind.position
    label = LABEL_SQL.format(position=position)
    return CELL_VALUES_SQL.format(kind=kind, layer=layer, head=head, position=position, label=label, **fields)


def kept_pair_ids(store: Store, metric: str, min_gap: float) -> pa.Array:
    """The ids of the pairs the min gap keeps, sorted (as Python sorts them: UTF-8 bytes sort as
    code points), in Arrow: no Python string per pair."""
    pairs = pq.read_table(
        store.path(PAIRS_FILE), filesystem=store.fs, columns=["pair_id", f"clean_{metric}", f"corrupted_{metric}"]
    )
    gap = pc.abs(pc.subtract(pairs.column(f"clean_{metric}"), pairs.column(f"corrupted_{metric}")))
    kept = pairs.filter(pc.greater_equal(gap, min_gap)).column("pair_id").combine_chunks()
    return kept.take(pc.array_sort_indices(kept))


def stability(
    store: Store,
    metric: str,
    min_gap: float,
    statistic: str,
    splits: int = DEFAULT_SPLITS,
    seed: int = 0,
    grouped: list[dict] | None = None,
    dtype: str = "float32",
) -> pa.Table | None:
    """The split-half table of the run in `store` (see the module's docstring), with the
    agreement of the groups of `grouped` (a grouped aggregate's rows) when given, written as
    `stability.parquet`; None for a circuit run (its few circuits have their intervals instead)
    or a run of fewer than four kept pairs. `dtype`: the run's, which sets what is float noise."""
    pair_ids = kept_pair_ids(store, metric, min_gap)
    if store.kind is FAITHFULNESS or len(pair_ids) < 4:
        store.remove(STABILITY_FILE)
        return None
    sizes = [None, *subsample_sizes(len(pair_ids))]  # the run's own halvings, then the smaller samples'
    halvings = np.empty((splits * len(sizes), len(pair_ids)), dtype=np.int8)  # filled in place: no copy
    for i, size in enumerate(sizes):
        halvings[i * splits : (i + 1) * splits] = halves(pair_ids, splits, seed, size)
    sums = HalfSums(halvings, pair_ids)
    pairs_schema = pq.read_schema(store.path(PAIRS_FILE), filesystem=store.fs)
    connection, sql = duckdb_connection(threads=1), cell_values_sql(store, metric, min_gap, statistic)
    for results, shards in store.row_batches():  # a query's (scope, cell, pair) rows: about QUERY_ROWS
        connection.register("batch", results)
        connection.register("batch_pairs", store.parts(PAIR_PARTS_DIR, shards, pairs_schema))
        sums.add(connection.sql(sql).to_arrow_table())
    rows = []
    scopes: dict[str, list[int]] = {}
    for (scope, _), index in sums.cells.items():
        scopes.setdefault(scope, []).append(index)
    for halving in range(len(halvings)):
        split, counted = halving % splits, np.bincount(sums.halves[halving], minlength=3)
        for scope, cells in sorted(scopes.items()):
            counts = sums.counts[halving][:, cells]
            both = (counts > 0).all(axis=0)
            a, b = (sums.sums[halving][h, cells][both] / counts[h][both] for h in (0, 1))
            for measure, value in measures(scope, a, b, dtype):
                rows.append(
                    {
                        "scope": scope,
                        "split": split,
                        "measure": measure,
                        "value": value,
                        "pairs_a": int(counted[0]),
                        "pairs_b": int(counted[1]),
                    }
                )
    if grouped:
        rows += group_agreement(store, grouped, statistic, dtype)
    table = pa.Table.from_pylist(rows, schema=STABILITY_SCHEMA).replace_schema_metadata(
        {
            b"patchsweep.seed": str(seed).encode(),
            b"patchsweep.splits": str(splits).encode(),
            b"patchsweep.statistic": statistic.encode(),
            b"patchsweep.min_gap": str(min_gap).encode(),
            b"patchsweep.dtype": dtype.encode(),
        }
    )
    store.write_table(table, STABILITY_FILE)
    return table


STABILITY_SCHEMA = pa.schema(
    [
        ("scope", pa.string()),
        ("split", pa.int16()),
        ("measure", pa.string()),
        ("value", pa.float64()),
        ("pairs_a", pa.int64()),
        ("pairs_b", pa.int64()),
        ("groups", pa.string()),  # with --group-by: the two groups compared (split null)
    ]
)


@dataclass(frozen=True)
class SplitHalves:
    """What the report is asked for: stability on, off, or (None) on up to `MAX_PAIRS` pairs."""

    on: bool | None = None
    splits: int = DEFAULT_SPLITS
    seed: int = 0

    def wanted(self, n_pairs: int) -> bool:
        return self.on if self.on is not None else n_pairs <= MAX_PAIRS

    def said(self, n_pairs: int, table: pa.Table | None) -> str:
        """The report summary's line."""
        if table is not None:
            return f"{self.splits} random halvings of the pairs (seed {self.seed}); see Stability"
        if not self.wanted(n_pairs):
            return "off (--no-stability)" if self.on is False else f"skipped above {MAX_PAIRS:,} pairs (--stability)"
        return "not computed: a circuit run, or fewer than four pairs"


DEFAULT_HALVES = SplitHalves()


def full_halvings(table: pa.Table) -> int:
    """How many pairs the run's own halvings split (the smaller samples split fewer)."""
    halved = table.filter(pc.is_null(table.column("groups")))
    return pc.max(pc.add(halved.column("pairs_a"), halved.column("pairs_b"))).as_py() or 0


def summary_rows(table: pa.Table) -> list[dict]:
    """Per scope and measure: the median, lowest and highest value over the run's halvings (and
    over the pairs of groups compared)."""
    grouped: dict[tuple[str, str, str], list[float]] = {}
    full = full_halvings(table)
    for row in table.to_pylist():
        if row["value"] is not None and (row["groups"] is not None or row["pairs_a"] + row["pairs_b"] == full):
            compared = row["groups"] or "random halves"
            grouped.setdefault((row["scope"], compared, row["measure"]), []).append(row["value"])
    return [
        {
            "scope": scope,
            "halves": halves,
            "measure": measure,
            "median": float(np.median(v)),
            "low": min(v),
            "high": max(v),
        }
        for (scope, halves, measure), v in grouped.items()
    ]


def pairs_needed(table: pa.Table) -> dict[str, list[tuple[int, float]]]:
    """Per scope, (pairs halved, median top-10 overlap) for each sample size, the run's own last."""
    medians: dict[str, dict[int, list[float]]] = {}
    for row in table.to_pylist():
        if row["groups"] is None and row["measure"] == f"top-{TOP} overlap" and row["value"] is not None:
            medians.setdefault(row["scope"], {}).setdefault(row["pairs_a"] + row["pairs_b"], []).append(row["value"])
    return {scope: [(n, float(np.median(v))) for n, v in sorted(by_n.items())] for scope, by_n in medians.items()}


def how_many_pairs(table: pa.Table, aggregate_rows: list[dict], statistic: str, run: str) -> go.Figure:
    """Per scope the median top-10 overlap of the halves against the pairs halved (the smallest
    sample reaching 0.9 named), and the 95% interval's half-width against the number of pairs for
    each scope's top cell (t(0.975, n - 1) * its std / sqrt(n))."""
    figure = go.Figure()
    for scope, curve in pairs_needed(table).items():
        reached = next((n for n, overlap in curve if overlap >= 0.9), None)
        said = f"0.9 at {reached} pairs" if reached else f"not 0.9 within {curve[-1][0]} pairs"
        figure.add_scatter(
            x=[n for n, _ in curve], y=[o for _, o in curve], mode="lines+markers", name=f"{scope} ({said})"
        )
    full = full_halvings(table)
    sizes = [*subsample_sizes(full), full]
    tops: dict[str, dict] = {}
    for row in aggregate_rows:
        if row.get("group") is None and row.get(f"std_{statistic}") is not None:
            scope = "edges" if "edge" in row else str(row.get("component", row.get("receiver")))
            if scope not in tops or abs(row[f"mean_{statistic}"]) > abs(tops[scope][f"mean_{statistic}"]):
                tops[scope] = row
    for scope, row in tops.items():
        std = row[f"std_{statistic}"]
        width = [t_quantile(0.975, n - 1) * std / np.sqrt(n) for n in sizes if n > 1]
        figure.add_scatter(
            x=[n for n in sizes if n > 1],
            y=width,
            mode="lines",
            line={"dash": "dot"},
            yaxis="y2",
            name=f"{scope}: top cell's interval half-width",
        )
    figure.update_layout(
        title=f"{run}: how many pairs? Top-10 overlap of two halves, and the top cell's 95% half-width",
        xaxis={"title": "pairs (both halves)", "type": "log"},
        yaxis={"title": f"median top-{TOP} overlap", "range": [0, 1.05]},
        yaxis2={"title": f"half-width of the mean {statistic}", "overlaying": "y", "side": "right"},
        height=420,
    )
    return figure


def noise_said(dtype: str) -> str:
    """What the measures do with float noise, as the report says it."""
    return (
        f"cell means within {NOISE_ULPS} x {dtype}'s precision of a scope's largest |mean| count as 0: "
        "tied in Spearman, left out of the top-k"
    )


def stability_figures(
    table: pa.Table, run: str, aggregate_rows: list[dict], statistic: str
) -> list[tuple[str, go.Figure]]:
    """A table of every scope's medians and ranges, "how many pairs", and per scope the run's
    halvings' values per measure."""
    rows = summary_rows(table)
    if not rows:
        return []
    metadata = table.schema.metadata or {}
    splits, seed, dtype = (
        metadata.get(f"patchsweep.{key}".encode(), b"?").decode() for key in ("splits", "seed", "dtype")
    )
    columns = {
        "scope": [r["scope"] for r in rows],
        "halves": [r["halves"] for r in rows],
        "measure": [r["measure"] for r in rows],
        "median": [f"{r['median']:.3f}" for r in rows],
        "range": [f"[{r['low']:.3f}, {r['high']:.3f}]" for r in rows],
    }
    summary = go.Figure(go.Table(header={"values": list(columns)}, cells={"values": list(columns.values())}))
    summary.update_layout(
        title=f"{run}: split-half stability ({splits} random halvings, seed {seed})<br><sup>{noise_said(dtype)}</sup>",
        height=240 + 28 * len(rows),
    )
    figures = [("stability", summary), ("how-many-pairs", how_many_pairs(table, aggregate_rows, statistic, run))]
    full = full_halvings(table)
    values = [
        r
        for r in table.filter(
            pc.and_(pc.is_valid(table.column("value")), pc.is_null(table.column("groups")))
        ).to_pylist()
        if r["pairs_a"] + r["pairs_b"] == full
    ]
    for scope in dict.fromkeys(r["scope"] for r in rows):
        mine = [r for r in values if r["scope"] == scope]
        figure = go.Figure(go.Box(x=[r["measure"] for r in mine], y=[r["value"] for r in mine], boxpoints="all"))
        figure.update_layout(
            title=f"{run}: {scope}, one point per halving (1 = the halves agree)",
            yaxis={"title": "between the two halves", "range": [-1.05, 1.05]},
            height=360,
        )
        figures.append((f"stability-{scope}", figure))
    return figures
