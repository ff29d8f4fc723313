"""Patching by recomputing only what a patch changes (below nnsight, checked against it).

A patch at (layer l, position t) leaves every layer below l and every position before t
exactly as in the receiving run. So one nnsight trace reads the clean and corrupted
activations of each pair (block inputs, attention and MLP outputs), and each patched run
is rebuilt from there: the receiver's layer-l output on positions t..T-1 with position t
patched, then blocks l+1..L-1 on those positions only, attending to the receiver's cached
keys and values for positions before t. That costs about (L-l)(T-t) token-layers instead
of L*T. The blocks are the model's own modules, called on the suffix with a stand-in key/value
cache that holds the receiver's prefix (read in the same trace), so every family runs the
same code; worker/model/families.py says where each keeps the parts a patched layer needs.
A head patch only changes layer l's attention output at t (the output projection of
the receiver's heads with the donor's slice for that head), so it recomputes like `attn`.
Where attention and MLP read the same block input (GPT-NeoX's parallel residual), an
attention patch changes the block's output by its change alone.
A patch of every position at once (`positions="all"`) is one at positions t..T-1 with t the
pair's first differing token: before it both runs are identical.
Rows that share t are batched; rows join the batch at the layer they patch.
Only the last position's final hidden state is unembedded: on the answer columns alone for
`logit_diff`, on the whole vocabulary for the metrics that need it (worker/batch/metrics.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from nnsight import TransformersModel

from worker.batch.donors import Donors
from worker.batch.group_read import GroupRead, read_groups
from worker.batch.rows import PairRows, per_batch
from worker.contract.options import COMPONENTS, PatchOptions
from worker.contract.pairs import Pair
from worker.kernels.suffix import block_on_suffix, patched_layer_output, readout, receiving_prefix, suffix_arguments
from worker.model.sites import (
    Cell,
    blocks,
)


def resolve_exact_path(path: str) -> str:
    """Which exact patching path runs: `reuse` (the default, `auto`) or `trace`."""
    if path not in ("auto", "trace", "reuse"):
        raise ValueError(f"exact_path must be auto, trace or reuse, got {path!r}")
    return "reuse" if path == "auto" else path


def run_rows(
    model: TransformersModel, read: GroupRead, rows: list[tuple[int, Cell]], start: int, whole: bool, metric: str
) -> torch.Tensor:
    """The patched metric of rows (pair index in `read`, cell) that all patch position `start` (all
    of start.. if `whole`)."""
    acts, answers = read.acts, read.answers
    device = acts.resid[0].device
    hidden, order, arguments = None, [], None
    for layer, block in enumerate(blocks(model)):
        if hidden is not None:
            pair_rows = torch.tensor([pair for pair, _ in order], device=device)
            arguments = arguments or suffix_arguments(model, start, hidden)
            hidden = block_on_suffix(
                model, block, hidden, *receiving_prefix(read, layer, pair_rows, start), arguments[layer]
            )
        for component in COMPONENTS:
            joining = [(pair, cell) for pair, cell in rows if cell.layer == layer and cell.component == component]
            if not joining:
                continue
            pairs = torch.tensor([pair for pair, _ in joining], device=device)
            heads = torch.tensor([cell.head or 0 for _, cell in joining], device=device)
            new = patched_layer_output(model, block, read, (component, layer), start, whole, pairs, heads)
            hidden = new if hidden is None else torch.cat([hidden, new])
            order += joining
    pair_rows = torch.tensor([pair for pair, _ in order], device=device)
    donor = None if acts.donor is None else acts.donor[pair_rows]
    values = readout(model, metric, hidden[:, -1], answers[pair_rows], donor).cpu()
    position_of = {(pair, cell): i for i, (pair, cell) in enumerate(order)}
    return values[torch.tensor([position_of[row] for row in rows])]


def patched_span(pair: Pair, cell: Cell, donors: Donors) -> tuple[int, bool]:
    """(first patched position, whether every later position is patched too)."""
    return (donors.start(pair), True) if cell.position is None else (cell.position, False)


def reuse_values(
    model: TransformersModel,
    pairs: Sequence[Pair],
    cells: Sequence[Cell],
    work: Sequence[tuple[int, int]],
    options: PatchOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as the trace path: baselines per pair and one patched metric per work item.

    Pairs are taken in groups whose clean and corrupted prompts fit `max_batch_tokens`, and
    each group's rows are run in chunks of at most `max_batch_tokens // T` rows.
    """
    rows_per_chunk = per_batch(options, pairs[0].n_tokens)
    values = torch.empty(len(work))
    baselines = []
    with torch.inference_mode():
        for read in read_groups(model, pairs, options, options.components):
            baselines.append(read.acts.metric)
            first = read.first
            mine = read.share_of(work)
            spans = {i: patched_span(pairs[work[i][0]], cells[work[i][1]], read.donors) for i in mine}
            for start, whole in sorted(set(spans.values())):
                at_start = [i for i in mine if spans[i] == (start, whole)]
                for chunk in range(0, len(at_start), rows_per_chunk):
                    indices = at_start[chunk : chunk + rows_per_chunk]
                    rows = [(work[i][0] - first, cells[work[i][1]]) for i in indices]
                    values[torch.tensor(indices)] = run_rows(model, read, rows, start, whole, options.metric)
    metric = torch.cat(baselines)
    return *PairRows.of(options).clean_and_corrupted(metric), values
