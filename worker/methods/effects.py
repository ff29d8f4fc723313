"""The effects runner (methods exact, atp, atpstar): every cell of a group of pairs, estimated
(worker/engines/atp.py, worker/engines/atpstar.py) and/or patched exactly on the trace path
(worker/engines/trace.py) or the reuse path (worker/engines/reuse.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import pyarrow as pa
import torch
from nnsight import TransformersModel

from worker.batch.cells import model_cells, selected_cells
from worker.batch.donors import Donors
from worker.batch.rows import PairRows
from worker.contract.options import (
    PatchOptions,
    position_labels,
)
from worker.contract.pairs import Pair
from worker.contract.tables import effects_table, empty_effects
from worker.engines.reuse import resolve_exact_path, reuse_values
from worker.engines.trace import cells_to_run, row_values, trace_values
from worker.kernels.attribution import Estimates
from worker.methods.common import normalized_score, per_length, verified_rows
from worker.model.sites import n_layers

Estimator = Callable[..., Estimates]  # (model, pairs, cells, work, options): AtP's, AtP*'s


def patch_group(
    model: TransformersModel,
    pairs: Sequence[Pair],
    options: PatchOptions,
    exact_path: str,
    estimate: Estimator | None,
) -> tuple[pa.Table, torch.Tensor, torch.Tensor]:
    """Patch pairs that share one token length; returns their effects and both baselines.

    Without `estimate`: every row's patched metric. With one (AtP's): every row's estimate, and
    the patched metric of the rows `verify_top` picks (null elsewhere).
    """
    n_tokens = pairs[0].n_tokens
    assert all(p.n_tokens == n_tokens for p in pairs), "patch_group needs equal-length pairs"
    cells = model_cells(model, options.components, n_tokens, options.positions)
    rows = selected_cells(pairs, cells, position_labels(options.positions))
    work = cells_to_run(pairs, cells, rows, Donors.of(options), n_layers(model))
    exact_values = reuse_values if exact_path == "reuse" else trace_values
    row_pairs = torch.tensor([p for p, _ in rows], dtype=torch.long)
    estimate_scores, exact_rows, sizes = None, None, None
    if estimate is not None:
        estimates = estimate(model, pairs, cells, work, options)
        clean, corrupted = estimates.clean, estimates.corrupted
    else:
        clean, corrupted, values = exact_values(model, pairs, cells, work, options)
    receiver = PairRows.of(options).receiving_of(clean, corrupted)[row_pairs]
    if estimate is not None:
        estimated = row_values(rows, receiver, work, estimates.patched)
        estimate_scores = normalized_score(estimated, clean[row_pairs], corrupted[row_pairs], options.direction)
        ranking = estimated - receiver
        if estimates.size is not None:
            ranking = row_values(rows, torch.zeros_like(receiver), work, estimates.size)
            sizes = ranking / (clean - corrupted)[row_pairs].abs()
        verified = verified_rows([p.pair_id for p in pairs], rows, ranking, options.verify_top)
        exact_rows = torch.tensor([row in verified for row in rows], dtype=torch.bool)
        work = [item for item in work if item in verified]
        values = exact_values(model, pairs, cells, work, options)[2] if work else torch.empty(0)
    patched = row_values(rows, receiver, work, values)
    scores = normalized_score(patched, clean[row_pairs], corrupted[row_pairs], options.direction)
    row_cells = [cells[c] for _, c in rows]
    unverified = None if exact_rows is None else ~exact_rows.numpy()
    columns = {
        "pair_id": [pairs[p].pair_id for p, _ in rows],
        "component": [c.component for c in row_cells],
        "layer": [c.layer for c in row_cells],
        "position": [c.position for c in row_cells],
        "head": [c.head for c in row_cells],
        options.metric: pa.array(patched.numpy(), pa.float32(), mask=unverified),
        "score": pa.array(scores.numpy(), pa.float32(), mask=unverified),
        "estimate": pa.array(
            estimate_scores.numpy() if estimate_scores is not None else [None] * len(rows), pa.float32()
        ),
        "graddrop": pa.array(sizes.numpy() if sizes is not None else [None] * len(rows), pa.float32()),
    }
    return effects_table(columns, options), clean, corrupted


def effects_batch(
    model: TransformersModel,
    pairs: Sequence[Pair],
    options: PatchOptions,
    estimate: Estimator | None,
    exact_path: str = "auto",
) -> tuple[pa.Table, pa.Table]:
    """The effects and pairs tables of `pairs` (see `patch_batch`); `estimate`: how the method
    estimates before it patches exactly, or None to patch every cell (worker/methods/registry.py)."""
    exact_path = resolve_exact_path(exact_path)
    run_group = partial(patch_group, model, options=options, exact_path=exact_path, estimate=estimate)
    parts, pairs_rows = per_length(pairs, options, run_group)
    return pa.concat_tables(parts) if parts else empty_effects(options), pairs_rows
