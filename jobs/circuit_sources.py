"""The circuits a `driver.py circuit` run evaluates: selected from an edges run's aggregate (or, in
the Python API, an edges table in memory) at edge budgets (worker/graph/circuits.py), or read from
graph JSON files made by hand or by another tool.

Selection ranks edges by |mean estimate| over the edges run's pairs, or by |mean score| where
every edge of every pair was patched exactly (`--verify-top` at least the edge count); `mib`
ranks them by MIB's importance, `mean_effect` (the estimate in metric units, signed so that an
edge carrying the behaviour is positive), signed and by size; `consistent` by the end of each
edge's 95% interval (over the pairs) nearest zero, 0 where it holds zero. Both the edges run and
each file must be of the model's graph; anything else is one line and exit 2.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.results.intervals import with_interval
from jobs.results.query import QueryError
from jobs.store import EDGES, Store
from worker.contract.layout import AGGREGATE_FILE
from worker.graph.circuits import CURVES, EMPTY, Circuit, read_circuit
from worker.graph.mib import Graph


def edge_scores(edges_run: str, graph: Graph, model: str, select: str) -> list[float]:
    """Each edge's score (graph order) from the edges run at `edges_run`, scored on `model`, as `select` ranks them."""
    store = Store(edges_run)
    manifest = store.read_manifest()
    if manifest is None or store.kind is not EDGES or not store.exists(AGGREGATE_FILE):
        raise QueryError(f"{edges_run}: not a finished edges run (driver.py edges writes one, with {AGGREGATE_FILE})")
    if manifest.get("model") != model:
        raise QueryError(f"{edges_run}: its edges were scored on {manifest.get('model')!r}, not {model!r} (--model)")
    table = pq.read_table(store.path(AGGREGATE_FILE), filesystem=store.fs)
    return ranking_scores(table.filter(pc.is_null(table.column("group"))), graph, edges_run, select)


def scoring_method(edges_run: str | None) -> str | None:
    """The edge method (eap, eap-ig, ...) of the edges run the circuits were selected from; None for none."""
    return Store(edges_run).read_manifest()["method"] if edges_run else None


def edges_table_scores(edges: pa.Table, pairs: pa.Table, graph: Graph, select: str) -> list[float]:
    """Each edge's score (graph order) from an edges table and its pairs table in memory (the
    Python API's `edges`): its mean over every pair of the table, as the aggregate computes it
    (which also leaves out pairs whose gap is under the report's --min-gap)."""
    metric = edges.schema.metadata[b"patchsweep.metric"].decode()
    gaps = pairs.select(["pair_id"]).append_column(
        "gap", pc.subtract(pairs.column(f"clean_{metric}"), pairs.column(f"corrupted_{metric}")).cast(pa.float64())
    )
    rows = edges.select(["pair_id", "edge", "estimate", "score"]).join(gaps, "pair_id")
    sums = pa.table(
        {
            "edge": rows.column("edge").cast(pa.string()),
            "estimate": rows.column("estimate").cast(pa.float64()),
            "score": rows.column("score").cast(pa.float64()),
            "effect": pc.multiply(rows.column("estimate").cast(pa.float64()), rows.column("gap")),
        }
    )
    sample = pc.VarianceOptions(ddof=1)
    table = sums.group_by("edge").aggregate(
        [
            ("estimate", "mean"),
            ("estimate", "count"),
            ("estimate", "stddev", sample),
            ("score", "count"),
            ("score", "mean"),
            ("effect", "mean"),
        ]
    )
    names = {"estimate_mean": "mean_estimate", "estimate_count": "estimate_count", "effect_mean": "mean_effect"}
    names |= {"estimate_stddev": "std_estimate", "score_count": "count", "score_mean": "mean_score", "edge": "edge"}
    renamed = table.rename_columns([names[c] for c in table.column_names])
    intervals = with_interval(renamed, "mean_estimate", "std_estimate", "estimate_count", "estimate_")
    return ranking_scores(intervals, graph, "the edges table", select)


def ranking_scores(aggregate: pa.Table, graph: Graph, source: str, select: str) -> list[float]:
    """What `select` ranks edges by, in graph order, from one aggregate row per edge: the mean
    estimate, or the mean exact score where every edge of every pair was patched exactly; for
    `mib`, the mean effect (MIB's importance)."""
    wanted = ["edge", "mean_estimate", "estimate_count", "count", "mean_score", "mean_effect"]
    wanted += ["estimate_ci_low", "estimate_ci_high"]
    rows = {row["edge"]: row for row in aggregate.select(wanted).to_pylist()}
    if set(rows) != set(graph.edge_names):
        raise QueryError(f"{source}: its {len(rows)} edges are not this model's graph of {len(graph.edges)} edges")
    if select == "consistent":
        return [reliable(rows[name]["estimate_ci_low"], rows[name]["estimate_ci_high"]) for name in graph.edge_names]
    exact = all(row["count"] and row["count"] == row["estimate_count"] for row in rows.values())
    column = "mean_effect" if select == "mib" else "mean_score" if exact else "mean_estimate"
    return [float("nan") if rows[name][column] is None else rows[name][column] for name in graph.edge_names]


def reliable(low: float | None, high: float | None) -> float:
    """How surely an edge's mean is away from zero: the end of its interval nearest zero, 0 where
    the interval holds zero (or is missing: fewer than two pairs)."""
    if low is None or high is None or low <= 0 <= high:
        return 0.0
    return low if low > 0 else high


def circuits_from_files(files: tuple[str, ...], graph: Graph) -> list[Circuit]:
    """Each file's circuit, named by its file name (without .json)."""
    circuits = []
    for file in files:
        name = Path(file).stem
        if name == EMPTY:
            raise ValueError(f"{file}: {EMPTY!r} names the circuit of no edge, evaluated with every run; rename it")
        circuits.append(read_circuit(file, name, graph))
    return circuits


def circuits_to_evaluate(
    model: str, edges_run: str | None, files: tuple[str, ...], budgets: tuple[str, ...], select: str
) -> tuple[Circuit, ...]:
    """The selected circuits (one per budget) and the given ones, of `model`'s graph."""
    if not edges_run and not files:
        raise ValueError("give circuits to evaluate: --edges EDGES_RUN (selected at --budgets) or --circuit FILE.json")
    from worker.model.checkpoint import load_config  # transformers: only once the options are known to be complete

    graph = Graph.of_config(load_config(model))
    scores = edge_scores(edges_run, graph, model, select) if edges_run else None
    return chosen_circuits(graph, scores, files, budgets, select)


def chosen_circuits(
    graph: Graph, scores: list[float] | None, files: tuple[str, ...], budgets: tuple[str, ...], select: str
) -> tuple[Circuit, ...]:
    """The circuits of each of `select`'s curves, picked from edge `scores` at each budget (none
    without scores), and those of `files`."""
    circuits = []
    if scores is not None:
        circuits = [Circuit.selected(graph, scores, curve, budget) for curve in CURVES[select] for budget in budgets]
    circuits += circuits_from_files(files, graph)
    names = [c.name for c in circuits]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"two circuits are named {twice[0]!r}; circuits are files OUT/circuits/NAME.json")
    return tuple(circuits)
