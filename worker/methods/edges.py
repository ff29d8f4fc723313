"""The edge methods' runner (`eap`, `eap-ig`): every edge of every pair estimated (worker/engines/eap.py),
the edges `verify_top` picks per pair patched exactly (worker/engines/edge_patching.py), one table.

As for AtP's cells, `verify_top` K takes each pair's K edges of largest |estimate| and K more
drawn at random from the rest (seeded by the pair's id), so what the estimate misses is measured
too; their metric and `score` are exact, the other rows' null.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from nnsight import TransformersModel

from worker.batch.rows import PairRows
from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair
from worker.contract.tables import edges_table
from worker.engines.eap import eap_estimates
from worker.engines.edge_patching import exact_edge_values
from worker.graph.mib import Graph
from worker.methods.common import normalized_score, per_length, verified_rows
from worker.model.weights import ungrouped


def edge_group(
    model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions
) -> tuple[pa.Table, torch.Tensor, torch.Tensor]:
    """Edge rows of pairs of one token length (pair-major, edges in `Graph.edges` order), and both baselines."""
    graph = Graph.of(model)
    steps = options.ig_steps if options.method == "eap-ig" else 0
    clean, corrupted, estimates = eap_estimates(model, pairs, options, steps)
    n_edges = len(graph.edges)
    estimates = estimates.flatten()
    pair_of = torch.arange(len(pairs)).repeat_interleave(n_edges)
    normalized = normalized_score(estimates, clean[pair_of], corrupted[pair_of], options.direction)
    exact, verified = verify(model, pairs, options, estimates, clean, corrupted)
    names = pa.array(graph.edge_names).dictionary_encode()
    senders = pa.array([graph.senders[s][0] for s, _ in graph.edges]).dictionary_encode()
    receivers = pa.array([graph.receivers[r][0] for _, r in graph.edges]).dictionary_encode()
    index = np.tile(np.arange(n_edges, dtype=np.int32), len(pairs))

    def names_of(encoded: pa.DictionaryArray) -> pa.DictionaryArray:  # per row, its edge's
        return pa.DictionaryArray.from_arrays(encoded.indices.to_numpy()[index], encoded.dictionary)

    columns = {
        "pair_id": pa.array(np.repeat([p.pair_id for p in pairs], n_edges)),
        "edge": names_of(names),
        "sender": names_of(senders),
        "receiver": names_of(receivers),
        options.metric: pa.array(exact.numpy(), pa.float32(), mask=~verified.numpy()),
        "score": pa.array(
            normalized_score(exact, clean[pair_of], corrupted[pair_of], options.direction).numpy(),
            pa.float32(),
            mask=~verified.numpy(),
        ),
        "estimate": pa.array(normalized.numpy(), pa.float32()),
    }
    return edges_table(columns, options), clean, corrupted


def edge_tables(model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions) -> tuple[pa.Table, pa.Table]:
    """The edges and pairs tables of `pairs` (`options.method` eap or eap-ig): every edge of every pair."""
    with ungrouped(model):
        parts, pairs_rows = per_length(pairs, options, lambda group: edge_group(model, group, options))
    return (pa.concat_tables(parts) if parts else edges_table({}, options)), pairs_rows


def verify(
    model: TransformersModel,
    pairs: Sequence[Pair],
    options: PatchOptions,
    estimates: torch.Tensor,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact patched metric of the rows (pair-major, every edge) `verify_top` picks, and which
    rows those are (the other rows' values are meaningless)."""
    n_edges = len(estimates) // len(pairs)
    exact, verified = torch.zeros(len(estimates)), torch.zeros(len(estimates), dtype=torch.bool)
    if not options.verify_top:
        return exact, verified
    rows = [(p, e) for p in range(len(pairs)) for e in range(n_edges)]
    receiving = PairRows.of(options).receiving_of(clean, corrupted).repeat_interleave(n_edges)
    chosen = sorted(verified_rows([p.pair_id for p in pairs], rows, estimates - receiving, options.verify_top))
    index = torch.tensor([p * n_edges + e for p, e in chosen])
    exact[index] = exact_edge_values(model, pairs, options, chosen)[2]
    verified[index] = True
    return exact, verified
