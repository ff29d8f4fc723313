"""The circuit method's runner: each pair's clean run with every edge outside a circuit ablated
(EAP-IG's `evaluate_graph`, worker/engines/edge_sets.py), for every circuit of the run, one table.

Per pair and circuit C: m(C), the clean prompt's metric with each edge outside C carrying its
sender's ablated output (the corrupted prompt's, for the pair donor); faithfulness =
(m(C) - m(empty)) / (m(full) - m(empty)), where m(full) is the clean run's metric (every edge
kept) and m(empty) the run with every edge ablated (the corrupted run's, for the pair donor),
evaluated like any circuit and written as the circuit `empty`, so the table holds every term.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import pyarrow as pa
import torch
from nnsight import TransformersModel

from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair
from worker.contract.tables import faithfulness_table
from worker.engines.edge_sets import edge_set_values
from worker.graph.circuits import EMPTY, Circuit, run_circuit
from worker.graph.mib import Graph
from worker.methods.common import per_length


@cache
def load_circuits(root: str, names: tuple[str, ...], graph: Graph) -> tuple[Circuit, ...]:
    """The circuits `names` of the run at `root` (a local path or URI), read once per process."""
    return tuple(run_circuit(root, name, graph) for name in names)


def circuit_group(
    model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions, circuits: Sequence[Circuit]
) -> tuple[pa.Table, torch.Tensor, torch.Tensor]:
    """Faithfulness rows of pairs of one token length (pair-major; the circuits, then `empty`), and both baselines."""
    n_edges = len(circuits[0].graph.edges) if circuits else 0
    kept = torch.zeros(len(circuits) + 1, n_edges, dtype=torch.bool)
    for i, circuit in enumerate(circuits):
        kept[i, list(circuit.edges)] = True
    items = [(p, c) for p in range(len(pairs)) for c in range(len(kept))]
    clean, corrupted, values = edge_set_values(model, pairs, options, ~kept, items)
    values = values.view(len(pairs), len(kept))
    empty = values[:, -1:]
    faithfulness = (values - empty) / (clean[:, None] - empty)
    names = pa.array([c.name for c in circuits] + [EMPTY]).dictionary_encode()
    index = np.tile(np.arange(len(kept), dtype=np.int32), len(pairs))
    columns = {
        "pair_id": pa.array(np.repeat([p.pair_id for p in pairs], len(kept))),
        "circuit": pa.DictionaryArray.from_arrays(pa.array(index), names.dictionary),
        "edges": pa.array(np.tile([len(c.edges) for c in circuits] + [0], len(pairs)), pa.int32()),
        options.metric: pa.array(values.flatten().numpy(), pa.float32()),
        "faithfulness": pa.array(faithfulness.flatten().numpy(), pa.float32()),
    }
    return faithfulness_table(columns, options), clean, corrupted


def circuit_tables(model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions) -> tuple[pa.Table, pa.Table]:
    """The faithfulness and pairs tables of `pairs`: every circuit of the run `options.circuits_at`
    names evaluated on every pair."""
    circuits = load_circuits(options.circuits_at, options.circuits, Graph.of(model))
    return evaluate_circuits(model, pairs, options, circuits)


def evaluate_circuits(
    model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions, circuits: Sequence[Circuit]
) -> tuple[pa.Table, pa.Table]:
    """The faithfulness and pairs tables of `circuits` (in memory) evaluated on every pair."""
    parts, pairs_rows = per_length(pairs, options, lambda group: circuit_group(model, group, options, circuits))
    return (pa.concat_tables(parts) if parts else faithfulness_table({}, options)), pairs_rows
