"""Cutting pairs into shards: equal token length within a shard, stable names across runs.

Shards are planned from the number of good pairs of each token length alone (what the
validation pass counts): buckets by length, shortest first, file order inside a bucket, a shard
every `batch_pairs`. The same pair file and `batch_pairs` always give the same shards, which is
what lets a re-run skip the shards whose files already exist. The pairs themselves are read
again as a stream and routed to their planned shard; a shard is handed out the moment it is
full, so at most one shard per token length is ever being filled.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from jobs.pairfile import PairFileError
from worker.contract.layout import part_name
from worker.contract.pairs import Pair


@dataclass(frozen=True)
class Shard:
    index: int
    n_tokens: int
    size: int  # pairs

    @property
    def name(self) -> str:
        return part_name(self.index)


def plan_shards(lengths: Mapping[int, int], batch_pairs: int) -> list[Shard]:
    """The shards of a file with `lengths[n]` good pairs of n tokens."""
    if batch_pairs < 1:
        raise ValueError("batch_pairs must be at least 1")
    shards = []
    for n_tokens in sorted(lengths):
        for start in range(0, lengths[n_tokens], batch_pairs):
            shards.append(Shard(len(shards), n_tokens, min(batch_pairs, lengths[n_tokens] - start)))
    return shards


def filled_shards(
    pairs: Iterable[Pair], shards: list[Shard], batch_pairs: int, wanted: set[str]
) -> Iterator[tuple[Shard, tuple[Pair, ...]]]:
    """Route `pairs` (the good pairs in file order) into their planned shards; yield each shard
    named in `wanted` with its pairs as soon as it is full (the others' pairs are dropped)."""
    first = {}
    for shard in shards:
        first.setdefault(shard.n_tokens, shard.index)
    seen: Counter[int] = Counter()
    filling: dict[int, list[Pair]] = {}
    for pair in pairs:
        index = first[pair.n_tokens] + seen[pair.n_tokens] // batch_pairs
        seen[pair.n_tokens] += 1
        shard = shards[index]
        if shard.name not in wanted:
            continue
        filling.setdefault(index, []).append(pair)
        if len(filling[index]) == shard.size:
            yield shard, tuple(filling.pop(index))
    if filling:
        raise PairFileError("the pair file changed while the job ran: some shards never filled")


def read_ahead(items: Iterator, depth: int) -> Iterator:
    """`items`, produced by a thread up to `depth` ahead of the consumer: the next shard is being
    read and tokenized while the actors patch (the tokenizer releases the GIL)."""
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in items:
                ahead.put(item)
        except BaseException as error:  # handed to the consumer, which raises it
            ahead.put(error)
        ahead.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := ahead.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
