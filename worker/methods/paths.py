"""The paths runner (method paths): path patching (worker/engines/path_patching.py) of every
sender head of a group of pairs to each receiver; the `paths` and `pairs` tables."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch
from nnsight import TransformersModel

from worker.batch.cells import model_cells, selected_cells
from worker.batch.group_read import read_groups
from worker.batch.rows import PairRows
from worker.contract.options import PatchOptions, position_labels
from worker.contract.pairs import Pair
from worker.contract.receivers import parse_receivers
from worker.contract.tables import paths_table
from worker.engines.path_patching import receiver_values
from worker.methods.common import normalized_score, per_length


@dataclass(frozen=True)
class PathResult:
    paths: pa.Table
    pairs: pa.Table


def path_group(
    model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions
) -> tuple[pa.Table, torch.Tensor, torch.Tensor]:
    """Path-patch pairs of one token length: their paths rows (receiver, then pair, then sender
    order) and both baselines per pair."""
    receivers = parse_receivers(options.receivers)
    n_tokens = pairs[0].n_tokens
    senders = model_cells(model, ("head",), n_tokens, options.positions)
    rows = selected_cells(pairs, senders, position_labels(options.positions))
    values = {receiver: torch.empty(len(rows)) for receiver in receivers}
    baselines = []
    with torch.inference_mode():
        for read in read_groups(model, pairs, options, ("head", "attn")):
            baselines.append(read.acts.metric)
            first = read.first
            mine = read.share_of(rows)
            items = [(rows[i][0] - first, senders[rows[i][1]]) for i in mine]
            for receiver in receivers:
                values[receiver][torch.tensor(mine)] = receiver_values(model, read, items, receiver, options)
    metric = torch.cat(baselines)
    clean, corrupted = PairRows.of(options).clean_and_corrupted(metric)
    row_pairs = torch.tensor([pair for pair, _ in rows], dtype=torch.long)
    columns: dict[str, list] = defaultdict(list)
    for receiver in receivers:
        scores = normalized_score(values[receiver], clean[row_pairs], corrupted[row_pairs], options.direction)
        columns["pair_id"] += [pairs[p].pair_id for p, _ in rows]
        columns["sender_layer"] += [senders[c].layer for _, c in rows]
        columns["sender_head"] += [senders[c].head for _, c in rows]
        columns["sender_position"] += [senders[c].position for _, c in rows]
        columns["receiver"] += [receiver.name] * len(rows)
        columns[options.metric] += values[receiver].tolist()
        columns["score"] += scores.tolist()
    return paths_table(columns, options), clean, corrupted


def path_batch(model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions) -> PathResult:
    """Path-patch every head sender of every pair through each of `options.receivers`; the
    `paths` and `pairs` tables. Pairs of different token lengths go in separate groups."""
    parts, pairs_rows = per_length(pairs, options, lambda group: path_group(model, group, options))
    return PathResult(pa.concat_tables(parts), pairs_rows)
