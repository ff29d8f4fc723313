"""Sharding and the shape of the actor pool: pure functions, no Ray cluster needed."""
from __future__ import annotations

import pytest

from jobs import cluster
from jobs.shards import plan_shards


def test_shards_hold_one_length_and_are_stable(ioi_pairs):
    pairs = ioi_pairs * 3
    shards = plan_shards(pairs, batch_pairs=2)
    assert [s.name for s in shards] == [f"part-{i:05d}" for i in range(len(shards))]
    assert all(len({p.n_tokens for p in s.pairs}) == 1 and len(s.pairs) <= 2 for s in shards)
    assert sorted(id(p) for s in shards for p in s.pairs) == sorted(id(p) for p in pairs)
    assert [s.n_tokens for s in shards] == sorted(s.n_tokens for s in shards)
    assert plan_shards(pairs, batch_pairs=2) == shards
    with pytest.raises(ValueError):
        plan_shards(pairs, batch_pairs=0)


@pytest.mark.parametrize("resources, workers, device, expected", [
    ({"CPU": 2}, None, "auto", (1, 2, 0, 2)),
    ({"CPU": 2}, 2, "auto", (2, 1, 0, 1)),
    ({"CPU": 2}, 4, "cpu", (4, 0.5, 0, 1)),
    ({"CPU": 16, "GPU": 4}, None, "auto", (4, 1, 1, 1)),
    ({"CPU": 16, "GPU": 4}, 2, "auto", (2, 1, 1, 1)),
    ({"CPU": 16, "GPU": 4}, None, "cpu", (1, 16, 0, 16)),
    ({"CPU": 0}, 3, "cuda", (3, 1, 1, 1)),   # autoscaling cluster with no GPU node up yet
])
def test_pool_shape(monkeypatch, resources, workers, device, expected):
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: resources)
    shape = cluster.pool_shape(workers, device)
    assert (shape.n_actors, shape.num_cpus, shape.num_gpus, shape.threads) == expected
