"""patchsweep in a notebook: the command line's methods on pairs in memory, one import, no Ray.

    import patchsweep as ps
    pair_file = ps.read_pairs("examples/ioi_pairs.jsonl", model="examples/toy-ioi-gpt2")
    model = ps.load_model("examples/toy-ioi-gpt2")
    ps.patch(model, pair_file.pairs, components=["resid", "head"]).effects

A facade and nothing more: each function hands its keyword arguments, named as the command's
options (`--verify-top` is `verify_top`), to the code the actors run (worker/methods/), and
returns the tables a run writes, as pyarrow tables with the same columns and metadata. What a
run of the driver wrote is read with `open_run`. README.md, "Python API", shows each in use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from jobs.circuit_sources import chosen_circuits, edges_table_scores
from jobs.pairfile import PairFile
from jobs.pairfile import read_pairs as read_pair_file
from jobs.results.query import connect_tables
from jobs.store import Store
from worker.contract.options import (
    DEFAULT_DONOR,
    DEFAULT_IG_STEPS,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_METRIC,
    DEFAULT_MODEL,
    PATHS,
    PatchOptions,
)
from worker.contract.pairs import Pair
from worker.contract.receivers import canonical_receivers
from worker.graph.circuits import MIB_BUDGETS, Circuit
from worker.graph.mib import Graph
from worker.methods.faithfulness import evaluate_circuits as evaluate_circuit_set
from worker.methods.registry import PatchResult, patch_batch, run_method
from worker.model.checkpoint import load_tokenizer
from worker.model.load import load_model

__all__ = [
    "Circuit",
    "CircuitsResult",
    "EdgesResult",
    "Graph",
    "PairFile",
    "PatchResult",
    "PathsResult",
    "edges",
    "evaluate_circuits",
    "load_model",
    "open_run",
    "patch",
    "paths",
    "read_pairs",
]


@dataclass(frozen=True)
class PathsResult:
    paths: pa.Table  # one row per pair, sender head (and position) and receiver: as OUT/paths/
    pairs: pa.Table  # one row per pair: as OUT/pairs.parquet


@dataclass(frozen=True)
class EdgesResult:
    edges: pa.Table  # one row per pair and edge of `graph`: as OUT/edges/
    pairs: pa.Table
    graph: Graph  # the model's nodes and edges, as EAP-IG and MIB name them


@dataclass(frozen=True)
class CircuitsResult:
    faithfulness: pa.Table  # one row per pair and circuit (and `empty`): as OUT/faithfulness/
    pairs: pa.Table
    circuits: tuple[Circuit, ...]  # what was evaluated; `circuit.to_json()` is EAP-IG's graph JSON


def read_pairs(path: str, model: str = DEFAULT_MODEL, **options) -> PairFile:
    """The pair file at `path` (JSONL, gzip/zstd JSONL or Parquet; a path or URI) checked against
    `model`'s tokenizer (a hub id or directory; no weights are loaded): `.pairs` the good lines,
    `.invalid` the bad ones (`FILE:LINE: reason`). `options` are those of the run the pairs are
    for, where they change what is valid: `positions` labels, `metric`, `donor="resample"` with
    its `seed` (which picks each pair's donor, as the driver does), `receivers`."""
    tokenizer, n_ctx = load_tokenizer(model)
    if options.get("receivers"):  # the pairs of a `paths` run
        options = {
            "components": ("head",),
            "method": PATHS,
            **options,
            "receivers": canonical_receivers(options["receivers"]),
        }
    return read_pair_file(path, tokenizer, n_ctx, PatchOptions(**options))


patch = patch_batch  # the main command on `pairs`: `.effects` (as OUT/effects/) and `.pairs`


def paths(
    model,
    pairs: Sequence[Pair],
    receivers: Sequence[str] = ("logits",),
    positions: str = "all",
    direction: str = "denoise",
    metric: str = DEFAULT_METRIC,
    donor: str = DEFAULT_DONOR,
    means: str | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> PathsResult:
    """`driver.py paths`: every head's effect through each of `receivers` (`logits`, or heads'
    inputs such as `"2.3:v,3.3:v@END"`); `.paths` and `.pairs`."""
    options = PatchOptions(
        ("head",),
        positions,
        direction,
        metric,
        max_batch_tokens,
        PATHS,
        receivers=canonical_receivers(receivers),
        donor=donor,
        means=means,
    )
    return PathsResult(*run_method(model, pairs, options))


def edges(
    model,
    pairs: Sequence[Pair],
    method: str = "eap",
    ig_steps: int = DEFAULT_IG_STEPS,
    verify_top: int = 0,
    direction: str = "denoise",
    metric: str = DEFAULT_METRIC,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> EdgesResult:
    """`driver.py edges`: every edge of the model's graph scored for every pair by `method` (eap or
    eap-ig), each pair's `verify_top` largest (and as many random) patched exactly; `.edges`,
    `.pairs` and `.graph`."""
    options = PatchOptions(
        (), "each", direction, metric, max_batch_tokens, method, verify_top, ig_steps=ig_steps, donor=DEFAULT_DONOR
    )
    return EdgesResult(*run_method(model, pairs, options), Graph.of(model))


def evaluate_circuits(
    model,
    pairs: Sequence[Pair],
    edges: EdgesResult | None = None,
    budgets: Sequence[str] = MIB_BUDGETS,
    select: str = "top",
    circuit: Sequence[str] = (),
    metric: str = DEFAULT_METRIC,
    donor: str = DEFAULT_DONOR,
    means: str | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> CircuitsResult:
    """`driver.py circuit`: the faithfulness of circuits on every pair, the clean run with every
    edge outside the circuit ablated. The circuits: one selected from `edges` (an `edges` result;
    each edge's mean over its pairs) at each of `budgets` by `select` (top, greedy, or mib: MIB's
    two curves, signed and by size, of each edge's mean effect in metric units), and one per
    graph JSON file in `circuit` (EAP-IG's format, named by the file). `.faithfulness`, `.pairs`
    and `.circuits`."""
    graph = Graph.of(model)
    scores = None if edges is None else edges_table_scores(edges.edges, edges.pairs, graph, select)
    circuits = chosen_circuits(graph, scores, tuple(circuit), tuple(budgets), select)
    options = PatchOptions(
        (),
        "each",
        "noise",
        metric,
        max_batch_tokens,
        "circuit",
        donor=donor,
        means=means,
        circuits=tuple(c.name for c in circuits),
    )
    return CircuitsResult(*evaluate_circuit_set(model, pairs, options, circuits), circuits)


def open_run(out: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection to the run the driver wrote at `out` (a path or URI), with the views
    `driver.py query` has: effects (paths, edges or faithfulness, by the run), pairs, aggregate,
    aggregate_groups and stability, as far as the run has written them."""
    return connect_tables(Store(out))
