"""Path patching (Wang et al. 2022, appendix B): a sender head's effect through one receiver only.

In the receiving run the sender head's output takes the donor's value, every other attention
head keeps the receiving run's value, and MLPs and norms are recomputed ("the frozen run").
With every head frozen, positions no longer mix: a sender's change at position t travels down
position t's residual stream through the MLPs alone. So a sender reaches the logits only at the
last position, and a receiver's input at position t only from a sender patched at t.

The frozen run is rebuilt from one nnsight read of both prompts (worker/engines/reuse.py), on the
positions the receiver reads only: per layer, the receiving run's cached attention output plus
the recomputed MLP (`block_given_attention`), for every sender of a group of pairs at once,
each row joining at its sender's layer.
- `logits`: the frozen run's last position goes through the final norm and the metric.
- head receivers: the frozen stream entering each receiver's layer gives that head's query, key
  or value (the family's projection and layout: worker/model/sites.py::site_values). They are written
  into a plain receiving run, recomputed from the lowest receiver layer and the first position
  read with the model's own blocks (as the reuse path does), and its metric is read.
A sender at or above every receiver's layer, or at positions the receiver does not read, changes
nothing: its row is the receiving run's own value, exactly, with no forward pass.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from nnsight import TransformersModel

from worker.batch.donors import Donors
from worker.batch.group_read import GroupRead
from worker.batch.rows import per_batch
from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair
from worker.contract.receivers import Receiver, ReceiverHead
from worker.kernels.suffix import (
    block_given_attention,
    block_on_suffix,
    heads_through_projection,
    readout,
    receiving_prefix,
    suffix_arguments,
)
from worker.model.families import part
from worker.model.sites import Cell, blocks, family, projection, site_values


def read_positions(pair: Pair, receiver: Receiver, donors: Donors) -> list[int]:
    """The positions whose stream the receiver reads and a patch can change (from `donors.start` on)."""
    if not receiver.heads:
        wanted = [pair.n_tokens - 1]
    elif receiver.label is None:
        wanted = range(pair.n_tokens)
    else:
        wanted = [i for i, label in enumerate(pair.labels) if label == receiver.label]
    return [t for t in wanted if t >= donors.start(pair)]


def reaches(cell: Cell, positions: list[int], receiver: Receiver) -> bool:
    """Whether a sender can change what the receiver reads: below some receiver's layer, at a read position."""
    below = not receiver.heads or cell.layer < max(receiver.layers)
    return below and bool(positions) and (cell.position is None or cell.position in positions)


def frozen_stream(
    model: TransformersModel, read: GroupRead, rows: list[tuple[int, Cell]], positions: list[int], record: list[int]
) -> tuple[list[int], torch.Tensor, dict[int, torch.Tensor]]:
    """The frozen run of each (pair, sender) row on `positions`: the row indices in the order they
    joined (by sender layer), their final stream (with `record` empty), and the stream entering
    each layer of `record`, for the rows whose sender is below it (the first rows of that order)."""
    acts, device = read.acts, read.acts.resid[0].device
    at = torch.tensor(positions, device=device)
    hidden, order, recorded = None, [], {}
    for layer, block in enumerate(blocks(model)):
        if layer in record and hidden is not None:
            recorded[layer] = hidden
        if record and layer >= max(record):
            break
        if hidden is not None:
            receiving = read.donors.rows.receiving_rows(torch.tensor([rows[i][0] for i in order], device=device))
            hidden = block_given_attention(model, block, hidden, acts.sites[("attn", layer)][:, at][receiving])
        joining = [i for i, (_, cell) in enumerate(rows) if cell.layer == layer]
        if not joining:
            continue
        pairs = torch.tensor([rows[i][0] for i in joining], device=device)
        receiving, donors = read.donors.rows.receiving_rows(pairs), read.donors.source_rows(pairs)
        heads = torch.tensor([rows[i][1].head for i in joining], device=device)
        where = torch.stack(
            [
                at == rows[i][1].position if rows[i][1].position is not None else torch.ones_like(at, dtype=torch.bool)
                for i in joining
            ]
        )
        z = acts.sites[("head", layer)]
        donated = read.donors.take(("head", layer), z, donors[:, None], at, heads)
        attention = heads_through_projection(model, block, z[:, at][receiving], donated, heads, where)
        new = block_given_attention(model, block, acts.resid[layer][:, at][receiving], attention)
        hidden = new if hidden is None else torch.cat([hidden, new])
        order += joining
    return order, hidden, recorded


def receiving_run_with_inputs(
    model: TransformersModel,
    read: GroupRead,
    pairs: torch.Tensor,
    positions: list[int],
    receiver: Receiver,
    recorded: dict[int, torch.Tensor],
) -> torch.Tensor:
    """The receiving run of each row (of pair `pairs[i]`) with its receivers' inputs at `positions`
    taken from the frozen stream (`recorded`: per receiver layer, for the first rows); the final
    stream at the last position."""
    acts, device = read.acts, read.acts.resid[0].device
    start, first = positions[0], min(receiver.layers)
    at = torch.tensor(positions, device=device) - start
    hidden = acts.resid[first][read.donors.rows.receiving_rows(pairs), start:]
    arguments = suffix_arguments(model, start, hidden)
    handles = []
    try:
        for layer in recorded:
            block = blocks(model)[layer]
            stream = part(block, family(model).attn_norm)(recorded[layer])
            for h in (h for h in receiver.heads if h.layer == layer):
                module = projection(model, block, h.input)
                handles.append(module.register_forward_hook(overwrite(model, module(stream), at, h)))
        for layer, block in enumerate(blocks(model)[first:], start=first):
            hidden = block_on_suffix(
                model, block, hidden, *receiving_prefix(read, layer, pairs, start), arguments[layer]
            )
    finally:
        for handle in handles:
            handle.remove()
    return hidden[:, -1]


def overwrite(model: TransformersModel, computed: torch.Tensor, at: torch.Tensor, head: ReceiverHead):
    """A forward hook setting head `head`'s input (its projection's output) to what the projection
    `computed` from the frozen stream, on its first rows (those `computed` has), at suffix positions `at`."""
    inputs = site_values(model, head.input, computed)[:, at, head.head]  # k, v receivers: no grouped-query sharing

    def hook(module, args, output):
        output = output.clone()
        site_values(model, head.input, output)[: len(inputs), at, head.head] = inputs
        return output

    return hook


def receiver_values(
    model: TransformersModel, read: GroupRead, items: list[tuple[int, Cell]], receiver: Receiver, options: PatchOptions
) -> torch.Tensor:
    """The metric of each (pair, sender) item through `receiver`: the receiving run's own where the
    sender cannot reach it, else the path-patched run's."""
    values = read.acts.metric[read.donors.rows.receiving_rows(torch.tensor([pair for pair, _ in items]))].clone()
    group = read.pairs
    reads = [read_positions(pair, receiver, read.donors) for pair in group]
    by_positions: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (pair, cell) in enumerate(items):
        if reaches(cell, reads[pair], receiver):
            by_positions[tuple(reads[pair])].append(i)
    for positions, live in by_positions.items():
        per_chunk = per_batch(options, group[0].n_tokens - positions[0])
        for first in range(0, len(live), per_chunk):
            chunk = live[first : first + per_chunk]
            order, hidden, recorded = frozen_stream(
                model, read, [items[i] for i in chunk], list(positions), receiver.layers
            )
            pairs = torch.tensor([items[chunk[i]][0] for i in order], device=hidden.device)
            if receiver.heads:
                final = receiving_run_with_inputs(model, read, pairs, list(positions), receiver, recorded)
            else:
                final = hidden[:, -1]
            donor = None if read.acts.donor is None else read.acts.donor[pairs]
            patched = readout(model, options.metric, final, read.answers[pairs], donor).cpu()
            values[torch.tensor([chunk[i] for i in order])] = patched
    return values
