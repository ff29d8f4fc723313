"""Cutting validated pairs into shards: equal token length within a shard, stable ids across runs.

The same pair file and `batch_pairs` always give the same shards, which is what lets a
re-run skip the shards whose files already exist.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from worker.pairs import Pair


@dataclass(frozen=True)
class Shard:
    index: int
    pairs: tuple[Pair, ...]

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    @property
    def n_tokens(self) -> int:
        return self.pairs[0].n_tokens


def plan_shards(pairs: Sequence[Pair], batch_pairs: int) -> list[Shard]:
    """Bucket by token length (shortest first), keep file order inside a bucket, cut every `batch_pairs`."""
    if batch_pairs < 1:
        raise ValueError("batch_pairs must be at least 1")
    buckets: dict[int, list[Pair]] = defaultdict(list)
    for pair in pairs:
        buckets[pair.n_tokens].append(pair)
    shards = []
    for length in sorted(buckets):
        bucket = buckets[length]
        for start in range(0, len(bucket), batch_pairs):
            shards.append(Shard(len(shards), tuple(bucket[start:start + batch_pairs])))
    return shards
