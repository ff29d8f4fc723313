"""Connecting to Ray and starting the pool of patching actors.

No address starts an embedded local Ray that lives as long as the driver; an address
(`auto`, `HOST:PORT`) joins a running cluster, and inside `ray job submit` RAY_ADDRESS
makes the plain init attach. One actor per GPU when the cluster has GPUs, else
`workers` CPU actors that split the CPUs between them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc
import ray
from ray._private.gcs_utils import create_gcs_channel
from ray._private.services import canonicalize_bootstrap_address_or_die
from ray.core.generated.gcs_service_pb2 import GetClusterIdRequest
from ray.core.generated.gcs_service_pb2_grpc import NodeInfoGcsServiceStub

from jobs.dispatch import InProcessActor
from worker.contract.storage import is_uri

MAX_RESTARTS = -1  # a dead actor (process exit, OOM kill) always comes back ...
MAX_TASK_RETRIES = 2  # ... but a shard that keeps killing it is given up and reported


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


def gcs_address(address: str, shown: str) -> str:
    """HOST:PORT of the GCS that `ray.init(address)` will join, found as `ray.init` finds it.

    `auto` is the address the last `ray start` recorded under the Ray temp dir, or a GCS found
    running on this machine, so it may be a cluster the user did not mean: every error says
    which address was found. A loopback host stands for the node's own IP, as in `ray.init`.
    """
    try:
        return canonicalize_bootstrap_address_or_die(address)
    except ConnectionError:  # `auto` found nothing
        raise NoCluster(shown) from None


def check_answers(address: str, shown: str, seconds: float) -> None:
    """Fail within `seconds` where no GCS answers: `ray.init` would wait minutes for one.

    `ray.init` retries a GCS that refuses, or that accepts connections but never replies (a
    stopped or half shut-down head, a stale address), for minutes, logging as it goes. One
    cheap GCS call with a deadline, on Ray's own gRPC channel (its token and TLS settings), asks
    the same GCS first. A GCS that refuses the token has answered: `ray.init` says the rest.
    Addresses of other schemes (ray://) are left to Ray.
    """
    if is_uri(address):
        return
    target = gcs_address(address, shown)
    found = f" (found {target})" if address == "auto" else ""
    channel = create_gcs_channel(target)
    try:
        NodeInfoGcsServiceStub(channel).GetClusterId(GetClusterIdRequest(), timeout=seconds)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise NoCluster(shown, f"{found}: {unanswered(error, seconds)}") from None
    finally:
        channel.close()


def unanswered(error: grpc.RpcError, seconds: float) -> str:
    """Why no GCS answered, in a few words."""
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"its GCS did not answer within {seconds:g} s (--connect-timeout)"
    if error.code() == grpc.StatusCode.UNAVAILABLE:  # gRPC's last word is the socket's: Connection refused, ...
        return (error.details() or "unavailable").rpartition(": ")[2].rstrip("]")
    return f"what answers is not a Ray GCS ({error.code().name}: {error.details()})"


def connect(address: str | None, seconds: float) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS) once its GCS answers within `seconds`, else
    start an embedded local Ray."""
    if address is not None or os.environ.get("RAY_ADDRESS"):
        target = address or os.environ["RAY_ADDRESS"]
        shown = address or f"{target} (from RAY_ADDRESS)"
        check_answers(target, shown, seconds)
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


def start_in_process(model: str, device: str, dtype: str) -> InProcessActor:
    """`--workers 0`: one worker in the driver's own process, on the threads torch has there (one
    per core, unless the process chose fewer), no Ray."""
    import torch  # with the worker: kept out of the driver's start-up

    from worker.actor import PatchWorker

    return InProcessActor(PatchWorker(model, device, dtype, torch.get_num_threads()))
