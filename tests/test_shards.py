"""Sharding and the shape of the actor pool: pure functions, no Ray cluster needed."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from jobs import cluster
from jobs.shards import filled_shards, plan_shards, read_ahead


def whole_file_shards(pairs, batch_pairs):
    """The plan written out plainly from all the pairs at once: buckets by length, shortest first,
    file order inside, a shard every `batch_pairs`."""
    buckets = {}
    for pair in pairs:
        buckets.setdefault(pair.n_tokens, []).append(pair)
    return [
        tuple(bucket[i : i + batch_pairs])
        for n in sorted(buckets)
        for bucket in [buckets[n]]
        for i in range(0, len(bucket), batch_pairs)
    ]


def test_streamed_shards_are_the_whole_file_plan(ioi_pairs):
    """Planned from counts, filled from a stream (out of order: lengths interleave in the file),
    the shards hold exactly what cutting the whole file at once gives, under stable names."""
    pairs = [dataclasses.replace(p, pair_id=f"{p.pair_id}-{k}") for k in range(5) for p in ioi_pairs]
    lengths = Counter(p.n_tokens for p in pairs)
    shards = plan_shards(lengths, batch_pairs=2)
    assert [s.name for s in shards] == [f"part-{i:05d}" for i in range(len(shards))]
    assert plan_shards(lengths, batch_pairs=2) == shards
    filled = list(filled_shards(iter(pairs), shards, 2, {s.name for s in shards}))
    assert [s.index for s, _ in filled] != sorted(s.index for s, _ in filled)  # handed out as they fill
    assert [held for _, held in sorted(filled, key=lambda item: item[0].index)] == whole_file_shards(pairs, 2)
    assert all(len(held) == s.size and {p.n_tokens for p in held} == {s.n_tokens} for s, held in filled)
    wanted = {shards[1].name, shards[-1].name}
    assert [s for s, _ in filled_shards(iter(pairs), shards, 2, wanted)] == sorted(
        (shards[1], shards[-1]), key=lambda s: [x for x, _ in filled].index(s)
    )
    with pytest.raises(ValueError):
        plan_shards(lengths, batch_pairs=0)


def test_read_ahead_keeps_order_and_passes_errors_on():
    assert list(read_ahead(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(read_ahead(failing(), depth=2))


@pytest.mark.parametrize(
    "resources, workers, device, expected",
    [
        ({"CPU": 2}, None, "auto", (1, 2, 0, 2)),
        ({"CPU": 2}, 2, "auto", (2, 1, 0, 1)),
        ({"CPU": 2}, 4, "cpu", (4, 0.5, 0, 1)),
        ({"CPU": 16, "GPU": 4}, None, "auto", (4, 1, 1, 1)),
        ({"CPU": 16, "GPU": 4}, 2, "auto", (2, 1, 1, 1)),
        ({"CPU": 16, "GPU": 4}, None, "cpu", (1, 16, 0, 16)),
        ({"CPU": 0}, 3, "cuda", (3, 1, 1, 1)),  # autoscaling cluster with no GPU node up yet
    ],
)
def test_pool_shape(monkeypatch, resources, workers, device, expected):
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: resources)
    shape = cluster.pool_shape(workers, device)
    assert (shape.n_actors, shape.num_cpus, shape.num_gpus, shape.threads) == expected
