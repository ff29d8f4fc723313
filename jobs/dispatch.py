"""Handing shards to actors: one full shard in flight per actor, and the nodes a run can lose.

Each actor holds one shard at a time, so a shard that kills its actor takes no innocent queued
shard down with it (Ray retries only the task that was running). Every `NODE_CHECK_SECONDS` the
cluster is asked for lost nodes: their actors leave the pool and their shards go to the others.

With `--workers 0` there is no Ray: one `InProcessActor` runs each call in the driver's own
process as it is made, and its `Finished` stands where Ray's object reference would; `first_done`
and `outcome` take either, so the dispatch below is the same for both.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ray
from tqdm import tqdm

from jobs.shards import Shard, read_ahead
from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair


class JobError(RuntimeError):
    """A problem the user must fix; the message is printed as it is (may span several lines)."""


class NodesLost(JobError):
    """Every node with an actor is gone: the run stops as failed, and a re-run resumes it."""


class ShardFailed(RuntimeError):
    """What a call of an in-process actor raised, as one line (Ray gives a task's error as `RayError`)."""


TASK_ERRORS = (ray.exceptions.RayError, ShardFailed)  # a call that failed: its shard failed, the run goes on
NODE_CHECK_SECONDS = 2.0  # how often the dispatcher asks the cluster for lost nodes


@dataclass(frozen=True, eq=False)
class Finished:
    """A call an in-process actor has made: what it returned, or what it raised."""

    value: object = None
    error: Exception | None = None


class InProcessActor:
    """A worker object in the driver's own process, with a Ray actor's face: `actor.method.remote(...)`
    makes the call there and then, and returns its `Finished`."""

    def __init__(self, worker) -> None:
        self.worker = worker

    def __getattr__(self, name: str) -> InProcessMethod:
        return InProcessMethod(getattr(self.worker, name))


@dataclass(frozen=True)
class InProcessMethod:
    method: Callable

    def remote(self, *args, **kwargs) -> Finished:
        try:
            return Finished(self.method(*args, **kwargs))
        except Exception as error:  # a failed shard is recorded, as Ray's task errors are
            return Finished(error=error)


def first_done(refs: list, timeout: float) -> list:
    """One of `refs` that is done (a `Finished` at once, else what `ray.wait` gives), or none in `timeout` s."""
    finished = [ref for ref in refs if isinstance(ref, Finished)]
    return finished[:1] if finished else ray.wait(refs, num_returns=1, timeout=timeout)[0]


def outcome(ref):
    """What a call returned (`ray.get` of a Ray reference); what it raised, as a `TASK_ERRORS`."""
    if not isinstance(ref, Finished):
        return ray.get(ref)
    if ref.error is not None:
        raise ShardFailed(f"{type(ref.error).__name__}: {ref.error}") from ref.error
    return ref.value


def wait_until_ready(actors: list, options: PatchOptions) -> None:
    """Wait until every actor has loaded its model and can do what `options` ask."""
    for reason in [outcome(actor.ready.remote(options)) for actor in actors]:
        if reason is not None:
            raise JobError(reason)


@dataclass
class Pool:
    """The actors and the node each started on. An actor whose node the cluster reports dead
    leaves the pool: Ray would restart it, but the node's resources are gone, so on a cluster with
    no room it would wait for a place forever, and its shard with it. (Where another node has
    room, Ray may have restarted it there already; it is dropped all the same: the pool shrinks
    rather than risk waiting forever.)"""

    actors: list
    nodes: list[str]

    @classmethod
    def of(cls, actors: list) -> Pool:
        return cls(list(actors), [outcome(actor.node.remote()) for actor in actors])

    def has(self, actor) -> bool:
        return any(actor is kept for kept in self.actors)

    def drop_lost(self) -> list:
        """The actors on nodes that are gone, killed (never to restart) and out of the pool; none
        while the cluster cannot say (asked again at the next check)."""
        if not ray.is_initialized():  # in process: no node to lose
            return []
        try:
            dead = {node["NodeID"] for node in ray.nodes() if not node["Alive"]}
        except ray.exceptions.RayError:
            return []
        lost = [actor for actor, node in zip(self.actors, self.nodes) if node in dead]
        for actor in lost:
            ray.kill(actor, no_restart=True)
        kept = [(actor, node) for actor, node in zip(self.actors, self.nodes) if node not in dead]
        self.actors, self.nodes = [actor for actor, _ in kept], [node for _, node in kept]
        return lost


def short_error(error: Exception) -> str:
    """The last non-empty line of a remote traceback: the exception itself."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def in_turn(
    pool: Pool, shards: Iterator[tuple[Shard, tuple[Pair, ...]]], send: Callable, what: str, total: int
) -> Iterator[tuple[Shard, ray.ObjectRef]]:
    """Keep every actor busy with the next full shard, one in flight per actor (`send(actor,
    shard, pairs)` starts it and returns its reference); each shard and its reference as it
    finishes, with a progress bar of `what` over `total` pairs. Every `NODE_CHECK_SECONDS` the
    cluster is asked for lost nodes: their actors leave the pool and their shards in flight go
    to the next free actor (a shard its lost actor had written already is written again, to the
    same names, so its rows are there once)."""
    shards = read_ahead(shards, depth=len(pool.actors))
    again: list[tuple[Shard, tuple[Pair, ...]]] = []  # shards whose actor's node was lost
    in_flight: dict = {}

    def submit(actor) -> None:
        if (next_shard := again.pop(0) if again else next(shards, None)) is not None:
            in_flight[send(actor, *next_shard)] = (next_shard, actor)

    for actor in pool.actors:
        submit(actor)
    next_check = time.monotonic() + NODE_CHECK_SECONDS
    with tqdm(total=total, unit="pair", file=sys.stderr, desc=what, dynamic_ncols=True, mininterval=1.0) as progress:
        while in_flight:
            ready = first_done(list(in_flight), NODE_CHECK_SECONDS)
            if time.monotonic() >= next_check:  # on the clock, not only when nothing finishes
                send_again(pool, in_flight, again, submit)
                next_check = time.monotonic() + NODE_CHECK_SECONDS
                ready = [ref for ref in ready if ref in in_flight]
            if not ready:
                continue
            (shard, _), actor = in_flight.pop(ready[0])
            if pool.has(actor):
                submit(actor)
            yield shard, ready[0]
            progress.update(shard.size)


def send_again(pool: Pool, in_flight: dict, again: list, submit: Callable) -> None:
    """Drop the actors of lost nodes from `pool`, queue their shards in flight `again`, and
    start them on the actors left idle."""
    lost = pool.drop_lost()
    if not lost:
        return
    for ref, (shard, actor) in list(in_flight.items()):
        if any(actor is gone for gone in lost):
            del in_flight[ref]
            again.append(shard)
            tqdm.write(f"shard {shard[0].name}: its actor's node was lost; sent to another actor", file=sys.stderr)
    if not pool.actors:
        raise NodesLost("every node with an actor was lost; run the same command again to resume")
    busy = [actor for _, actor in in_flight.values()]
    for actor in pool.actors:
        if again and not any(actor is other for other in busy):
            submit(actor)
