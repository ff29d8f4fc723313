"""Connecting to Ray and starting the pool of patching actors.

No address starts an embedded local Ray that lives as long as the driver; an address
(`auto`, `HOST:PORT`) joins a running cluster, and inside `ray job submit` RAY_ADDRESS
makes the plain init attach. One actor per GPU when the cluster has GPUs, else
`workers` CPU actors that split the CPUs between them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import ray
from ray._private.services import canonicalize_bootstrap_address_or_die

from worker.parts import is_uri

MAX_RESTARTS = -1  # a dead actor (process exit, OOM kill) always comes back ...
MAX_TASK_RETRIES = 2  # ... but a shard that keeps killing it is given up and reported
PROBE_SECONDS = 5  # how long an address may take to accept a connection before it counts as down


class NoCluster(ConnectionError):
    """No Ray cluster answers at the address asked for; the message is one line for the user."""

    def __init__(self, address: str, why: str = "") -> None:
        super().__init__(
            f"no running Ray cluster at {address}{why}; start one with ray start --head, or leave out --address"
        )


@dataclass(frozen=True)
class PoolShape:
    n_actors: int
    num_cpus: float
    num_gpus: int
    threads: int


def probe(address: str, shown: str) -> None:
    """Fail fast where nothing listens: `ray.init` would retry a dead address for two minutes.

    `auto` is resolved the way `ray.init` resolves it (the last `ray start`, or a running GCS);
    HOST:PORT is tried as given. Addresses of other schemes (ray://) are left to Ray.
    `shown` is how the address is named to the user.
    """
    if is_uri(address):
        return
    try:
        bootstrap = canonicalize_bootstrap_address_or_die(address) if address == "auto" else address
    except ConnectionError:
        raise NoCluster(shown) from None
    host, _, port = bootstrap.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except (OSError, ValueError) as error:
        found = f" (found {bootstrap})" if bootstrap != address else ""
        raise NoCluster(shown, f"{found}: {getattr(error, 'strerror', None) or error}") from None


def connect(address: str | None) -> None:
    if address is not None or os.environ.get("RAY_ADDRESS"):
        target = address or os.environ["RAY_ADDRESS"]
        shown = address or f"{target} (from RAY_ADDRESS)"
        probe(target, shown)
        try:
            ray.init(address=address, logging_level="WARNING")
        except ConnectionError:
            raise NoCluster(shown) from None
    else:
        # "local" starts a fresh Ray even where a stale `ray start` left its address behind;
        # its warnings are about a cluster the user never asked for (e.g. token auth), so quiet.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")


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
        num_cpus=shape.num_cpus,
        num_gpus=shape.num_gpus,
        max_restarts=MAX_RESTARTS,
        max_task_retries=MAX_TASK_RETRIES,
    )
    return [actor_class.remote(model, device, dtype, shape.threads) for _ in range(shape.n_actors)]
