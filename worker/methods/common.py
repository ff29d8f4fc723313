"""What every results-table runner shares: per-length grouping of pairs (so padding never shifts a
position) with the pairs table, the normalised score, and the verification rows of an estimating method."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence

import pyarrow as pa
import torch

from worker.contract.options import (
    PatchOptions,
)
from worker.contract.pairs import Pair
from worker.contract.tables import pairs_table


def normalized_score(value: torch.Tensor, clean: torch.Tensor, corrupted: torch.Tensor, direction: str) -> torch.Tensor:
    """0 = the receiving run's own behaviour, 1 = fully moved to the donor's (for `kl`, the
    donor's own value is 0, so this is (KL(donor||receiver) - KL(donor||patched)) / KL(donor||receiver))."""
    if direction == "denoise":
        return (value - corrupted) / (clean - corrupted)
    return (value - clean) / (corrupted - clean)


def per_length(
    pairs: Sequence[Pair],
    options: PatchOptions,
    run_group: Callable[[list[Pair]], tuple[pa.Table, torch.Tensor, torch.Tensor]],
) -> tuple[list[pa.Table], pa.Table]:
    """`run_group` on each group of pairs of one token length (so padding never shifts a position):
    the groups' result tables, and the pairs table with each pair's clean and corrupted baselines."""
    groups: dict[int, list[int]] = defaultdict(list)
    for index, pair in enumerate(pairs):
        groups[pair.n_tokens].append(index)
    parts, clean_values, corrupted_values = [], [0.0] * len(pairs), [0.0] * len(pairs)
    for indices in groups.values():
        table, clean, corrupted = run_group([pairs[i] for i in indices])
        parts.append(table)
        for i, c, k in zip(indices, clean.tolist(), corrupted.tolist()):
            clean_values[i], corrupted_values[i] = c, k
    return parts, pairs_table(pairs, clean_values, corrupted_values, options)


def verified_rows(
    pair_ids: Sequence[str], rows: Sequence[tuple[int, int]], size: torch.Tensor, k: int
) -> set[tuple[int, int]]:
    """Per pair: the `k` rows whose estimated effect is largest in size (|`size`|), and `k` more
    drawn at random from the rest (seeded by the pair's id, so a re-run draws the same), so that
    what the estimate misses is measured too."""
    by_pair: dict[int, list[int]] = {}
    for i, (pair, _) in enumerate(rows):
        by_pair.setdefault(pair, []).append(i)
    chosen = set()
    for pair, indices in by_pair.items():
        ranked = sorted(indices, key=lambda i: -abs(float(size[i])))
        rest = sorted(ranked[k:])  # in row order, so float noise in the ranking cannot change the draw
        drawn = random.Random(f"verify:{pair_ids[pair]}").sample(rest, min(k, len(rest)))
        chosen.update(rows[i] for i in ranked[:k] + drawn)
    return chosen
