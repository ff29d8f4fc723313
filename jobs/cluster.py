"""Connecting to Ray and starting the pool of patching actors.

No address starts an embedded local Ray that lives as long as the driver; an address
(`auto`, `HOST:PORT`) joins a running cluster, and inside `ray job submit` RAY_ADDRESS
makes the plain init attach. One actor per GPU when the cluster has GPUs, else
`workers` CPU actors that split the CPUs between them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import ray

MAX_RESTARTS = -1       # a dead actor (process exit, OOM kill) always comes back ...
MAX_TASK_RETRIES = 2    # ... but a shard that keeps killing it is given up and reported


@dataclass(frozen=True)
class PoolShape:
    n_actors: int
    num_cpus: float
    num_gpus: int
    threads: int


def connect(address: str | None) -> None:
    if address is not None or "RAY_ADDRESS" in os.environ:
        ray.init(address=address, logging_level="WARNING")
    else:
        # "local" starts a fresh Ray even where a stale `ray start` left its address behind;
        # its warnings are about a cluster the user never asked for (e.g. token auth), so quiet.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 logging_level="ERROR")


def pool_shape(workers: int | None, device: str) -> PoolShape:
    """How many actors, and what each asks of the cluster.

    `--device cuda` asks for GPU actors even before any GPU node exists, so an autoscaling
    cluster grows to fit them; `auto` uses GPUs only where the cluster already has some.
    """
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0)
    if device == "cuda" or (device == "auto" and gpus):
        n_actors = workers or max(gpus, 1)
        return PoolShape(n_actors, num_cpus=1, num_gpus=1, threads=1)
    n_actors = workers or 1
    share = cpus / n_actors if cpus else 1
    return PoolShape(n_actors, num_cpus=share, num_gpus=0, threads=max(1, int(share)))


def start_actors(shape: PoolShape, model: str, device: str, dtype: str) -> list:
    from worker.actor import PatchWorker  # torch and nnsight: kept out of the driver's start-up

    actor_class = ray.remote(PatchWorker).options(
        num_cpus=shape.num_cpus, num_gpus=shape.num_gpus,
        max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
    )
    return [actor_class.remote(model, device, dtype, shape.threads) for _ in range(shape.n_actors)]
