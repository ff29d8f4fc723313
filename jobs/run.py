"""Running one job: validate, plan the shards, stream them to actors, record their receipts.

The pair file is validated in a thread while Ray starts and the actors load their model
(loading torch, transformers and the tokenizer is most of the driver's start-up, Ray's start
is mostly waiting, and an actor's start is its own process loading the model); that pass keeps
only the bad lines and the number of pairs of each length, enough to plan every shard. The
file is then read again as a stream, each shard handed out as soon as it is full, so the
driver's memory does not grow with the file. Each actor has one shard in flight at a time, and
a shard that kills its actor takes no innocent queued shard down with it (Ray retries only the
task that was running). Actors write their shards themselves, so an interrupted or failed run
keeps every finished shard.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa
import ray
from tqdm import tqdm

from jobs.cluster import connect, pool_shape, start_actors
from jobs.means_pass import means_table
from jobs.pairfile import FileScan, scan_pairs, stream_pairs
from jobs.results.report import build_report
from jobs.shards import Shard, filled_shards, plan_shards, read_ahead
from jobs.spec import JobSpec, config_hash, versions
from jobs.store import Store, results_kind
from worker.contract.options import MEAN_DONORS, METHODS, PatchOptions
from worker.contract.pairs import Pair
from worker.contract.storage import MEANS_FILE, PAIR_PARTS_DIR
from worker.graph.circuits import CIRCUITS_DIR
from worker.graph.mib import Graph

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_INTERRUPTED = 0, 1, 130


class JobError(RuntimeError):
    """A problem the user must fix; the message is printed as it is (may span several lines)."""


class NodesLost(JobError):
    """Every node with an actor is gone: the run stops as failed, and a re-run resumes it."""


RECEIPT_KEYS = ("rows", "bytes", "seconds", "node")
NODE_CHECK_SECONDS = 2.0  # how often the dispatcher asks the cluster for lost nodes


@dataclass
class ShardLog:
    """What happened to each shard: finished (in this run or an earlier one), failed, and what
    the actor that wrote it reported (`Receipt`: rows, bytes, seconds, node)."""

    finished: set[str]
    failed: dict[str, str] = field(default_factory=dict)
    receipts: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def resumed(cls, finished: set[str], previous: dict | None) -> ShardLog:
        """Finished shards keep the receipts an earlier run recorded for them."""
        log = cls(finished)
        for entry in (previous or {}).get("shards", []):
            if entry["name"] in finished:
                log.receipts[entry["name"]] = {key: entry.get(key) for key in RECEIPT_KEYS}
        return log

    def status(self, name: str) -> str:
        if name in self.failed:
            return "failed"
        return "done" if name in self.finished else "pending"


@dataclass
class Phases:
    """Wall seconds of each phase of a run, kept in the manifest to show where the time went.

    Phases are listed in the order they began (validation overlaps Ray's start); a phase
    still under way has no seconds yet.
    """

    seconds: dict[str, float | None] = field(default_factory=dict)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self.seconds[name] = None
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


@dataclass(frozen=True)
class Reading:
    """What reading the pair file again as pairs needs: the tokenizer, its context, the bad lines."""

    tokenizer: object
    n_ctx: int
    scan: FileScan


def validated_file(spec: JobSpec, phases: Phases) -> Reading:
    with phases.timed("validate"):
        from worker.model.checkpoint import (
            load_tokenizer,  # here, in the validation thread: torch loads while Ray starts
        )

        tokenizer, n_ctx = load_tokenizer(spec.model)
        scan = scan_pairs(spec.pairs, tokenizer, n_ctx, spec.patch_options())
        say_if_every_edge_verified(spec)
    if scan.invalid and not spec.skip_invalid:
        lines = "\n".join(map(str, scan.invalid))
        raise JobError(
            f"{lines}\n{len(scan.invalid)} invalid line(s) in {spec.pairs}; "
            "fix them or pass --skip-invalid to run the valid ones"
        )
    if not scan.lengths:
        raise JobError(f"{spec.pairs}: no valid pairs to run")
    return Reading(tokenizer, n_ctx, scan)


def say_if_every_edge_verified(spec: JobSpec) -> None:
    """An edge method's `--verify-top` above the model's edge count verifies every edge: said once."""
    if METHODS[spec.method].results != "edges" or not spec.verify_top:
        return
    from worker.model.checkpoint import load_config

    edges = len(Graph.of_config(load_config(spec.model)).edges)
    if spec.verify_top > edges:
        print(
            f"note: --verify-top {spec.verify_top} is more than the model's {edges} edges: "
            "every edge is patched exactly",
            file=sys.stderr,
        )


def wait_until_ready(actors: list, options: PatchOptions) -> None:
    """Wait until every actor has loaded its model and can do what `options` ask."""
    for reason in ray.get([actor.ready.remote(options) for actor in actors]):
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
        return cls(list(actors), ray.get([actor.node.remote() for actor in actors]))

    def has(self, actor) -> bool:
        return any(actor is kept for kept in self.actors)

    def drop_lost(self) -> list:
        """The actors on nodes that are gone, killed (never to restart) and out of the pool; none
        while the cluster cannot say (asked again at the next check)."""
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


def shards_to_run(job: Job, shards: list[Shard]) -> Iterator[tuple[Shard, tuple[Pair, ...]]]:
    """`shards` with their pairs, as another read of the file fills them."""
    spec, reading = job.spec, job.reading
    scan = reading.scan
    pairs = stream_pairs(
        spec.pairs, reading.tokenizer, reading.n_ctx, spec.patch_options(), scan.skipped, scan.resampling
    )
    return filled_shards(pairs, job.shards, spec.batch_pairs, {shard.name for shard in shards})


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
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=NODE_CHECK_SECONDS)
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


def donor_means(job: Job, pool: Pool, options: PatchOptions) -> PatchOptions:
    """The first pass of a mean-donor run: every shard's donor-side sums from the actors, added
    into OUT/donor_means.parquet (reused when a run of this configuration already wrote it; this
    pass reads the pair file once more); `options` with the means for the actors to read."""
    store = job.store
    if store.exists(MEANS_FILE):
        job.means = {"file": MEANS_FILE, "reused": True}
    else:

        def send(actor, _: Shard, pairs: tuple[Pair, ...]) -> ray.ObjectRef:
            return actor.sum_shard.remote(pairs, options)

        def sums() -> Iterator[pa.Table]:  # added as they come: one shard's sums in memory at a time
            for shard, ref in in_turn(pool, shards_to_run(job, job.shards), send, "donor means", job.pair_count):
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as error:
                    raise JobError(f"the donor means pass failed on shard {shard.name}: {short_error(error)}") from None

        store.write_table(means_table(sums()), MEANS_FILE)
        job.means = {"file": MEANS_FILE, "reused": False}
    store.write_manifest(job.manifest("running"))
    return replace(options, means=store.part_writer().root)


def dispatch(job: Job, pool: Pool, options: PatchOptions) -> None:
    """Patch the unfinished shards; each actor writes its shard's parts itself and returns a
    receipt, which is recorded; failures are recorded by shard."""
    log, writer = job.log, job.store.part_writer()

    def send(actor, shard: Shard, pairs: tuple[Pair, ...]) -> ray.ObjectRef:
        return actor.run_shard.remote(shard.name, pairs, options, writer)

    todo = job.todo
    for shard, ref in in_turn(pool, shards_to_run(job, todo), send, "patching", sum(s.size for s in todo)):
        try:
            log.receipts[shard.name] = asdict(ray.get(ref))
            log.finished.add(shard.name)
        except ray.exceptions.RayError as error:
            log.failed[shard.name] = short_error(error)
            tqdm.write(f"shard {shard.name} failed: {log.failed[shard.name]}", file=sys.stderr)


@dataclass
class Job:
    """One run's state as the manifest reports it."""

    spec: JobSpec
    config: dict
    reading: Reading
    shards: list[Shard]
    store: Store
    log: ShardLog
    n_resumed: int
    started: float
    phases: Phases
    means: dict | None = None  # mean donors: the stored means' file, and whether a run before wrote it

    @property
    def todo(self) -> list[Shard]:
        return [s for s in self.shards if s.name not in self.log.finished]

    @property
    def pair_count(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def n_invalid(self) -> int:
        return len(self.reading.scan.invalid)

    def manifest(self, status: str) -> dict:
        spec, log = self.spec, self.log
        return {
            "status": status,
            "config_hash": config_hash(self.config),
            "config": self.config,
            "model": spec.model,
            "components": list(spec.components),
            "positions": spec.positions,
            "direction": spec.direction,
            "metric": spec.metric,
            "method": spec.method,
            "verify_top": spec.verify_top,
            "receivers": list(spec.receivers),
            "donor": spec.donor,
            "seed": spec.seed,
            "pairs_file": spec.pairs,
            "pair_count": self.pair_count,
            "invalid_count": self.n_invalid,
            "donor_means": self.means,
            **({"circuits": circuit_entries(spec.circuits)} if spec.circuits else {}),
            "versions": versions(),
            "shards": [
                {
                    "name": s.name,
                    "pairs": s.size,
                    "n_tokens": s.n_tokens,
                    "status": log.status(s.name),
                    **{key: log.receipts.get(s.name, {}).get(key) for key in RECEIPT_KEYS},
                    "error": log.failed.get(s.name),
                }
                for s in self.shards
            ],
            "timings": {
                "started_unix": round(self.started, 3),
                "wall_seconds": round(time.time() - self.started, 3),
                "phase_seconds": self.phases.seconds,
            },
        }


def circuit_entries(circuits) -> list[dict]:
    """What the manifest says of each circuit: its file, size, budget and place on the curve."""
    return [
        {
            "name": c.name,
            "file": f"{CIRCUITS_DIR}/{c.name}.json",
            "edges": len(c.edges),
            "budget": c.budget,
            "fraction": c.fraction(),
        }
        for c in circuits
    ]


def prepare_job(spec: JobSpec, reading: Reading, started: float, phases: Phases) -> Job:
    """Plan the shards and open the output; finished shards of an earlier run count as done."""
    config = spec.config()
    shards = plan_shards(reading.scan.lengths, spec.batch_pairs)
    store = Store(spec.out, results_kind(spec.method))
    previous = store.prepare(config_hash(config), spec.overwrite)
    if reading.scan.invalid:
        store.write_invalid(reading.scan.invalid)
    if spec.circuits:
        store.fs.create_dir(store.path(CIRCUITS_DIR), recursive=True)
    for circuit in spec.circuits:  # what the actors evaluate, in EAP-IG's graph JSON
        store.write_bytes(circuit.to_json().encode(), CIRCUITS_DIR, f"{circuit.name}.json")
    log = ShardLog.resumed(store.finished_shards() & {s.name for s in shards}, previous)
    job = Job(spec, config, reading, shards, store, log, len(log.finished), started, phases)
    store.write_manifest(job.manifest("running"))
    return job


@contextmanager
def ray_running(spec: JobSpec, phases: Phases) -> Iterator[None]:
    with phases.timed("start_ray"):
        connect(spec.address, spec.connect_timeout)
    try:
        yield
    finally:
        with phases.timed("stop_ray"):
            ray.shutdown()


def ready_actors(spec: JobSpec, phases: Phases) -> Pool:
    """The actor pool, each with its model loaded and able to do what `spec` asks."""
    with phases.timed("start_actors"):
        actors = start_actors(pool_shape(spec.workers, spec.device), spec.model, spec.device, spec.dtype)
        wait_until_ready(actors, spec.patch_options())
        return Pool.of(actors)


def compute(job: Job, pool: Pool) -> str:
    """Patch the job's unfinished shards on `pool`'s actors; "done", "interrupted" on Ctrl-C, or
    "failed" when every node with an actor is lost."""
    spec, phases = job.spec, job.phases
    try:
        options = spec.patch_options()
        if spec.circuits:
            options = replace(options, circuits_at=job.store.part_writer().root)
        if options.donor in MEAN_DONORS:
            with phases.timed("donor_means"):
                options = donor_means(job, pool, options)
        with phases.timed("patch"):
            dispatch(job, pool, options)
    except KeyboardInterrupt:
        return "interrupted"
    except NodesLost as error:
        print(f"error: {error}", file=sys.stderr)
        return "failed"
    return "done"


def finish(job: Job, status: str) -> int:
    """Write the pairs table, the final manifest and the report; the process exit code."""
    if job.log.failed:
        status = "failed"
    for directory in (job.store.results, PAIR_PARTS_DIR):  # the driver let go of its actors: their half-writes
        job.store.remove_temporaries(directory)
    # a shard an actor finished after the driver stopped listening (Ctrl-C) is finished all the same
    job.log.finished |= job.store.finished_shards() & {shard.name for shard in job.shards}
    with job.phases.timed("pairs_table"):
        n_pairs = job.store.write_pairs_table(job.log.finished)
    job.store.write_manifest(job.manifest(status))
    if n_pairs:
        print(build_report(job.store), file=sys.stderr)
    print(
        f"{status}: {n_pairs} of {job.pair_count} pairs in "
        f"{len(job.log.finished)} of {len(job.shards)} shards ({job.n_resumed} already done, "
        f"{len(job.log.failed)} failed, {job.n_invalid} invalid lines skipped), "
        f"{time.time() - job.started:.1f} s -> {job.store.uri}",
        file=sys.stderr,
    )
    return {"done": EXIT_OK, "failed": EXIT_FAILED_SHARDS}.get(status, EXIT_INTERRUPTED)


def finished_before(spec: JobSpec) -> dict | None:
    """The manifest of a finished run of this very configuration whose every shard is in place.

    Checked before Ray starts or the pair file is validated: a re-run with nothing to do
    should say so at once (`driver.py report` rebuilds the report).
    """
    store = Store(spec.out, results_kind(spec.method))
    manifest = store.read_manifest()
    if spec.overwrite or manifest is None or manifest.get("status") != "done":
        return None
    try:
        same = manifest.get("config_hash") == config_hash(spec.config())
    except OSError:  # an unreadable pair file: validation reports it
        return None
    shards = {shard["name"] for shard in manifest.get("shards", [])}
    return manifest if same and shards <= store.finished_shards() else None


def run_job(spec: JobSpec) -> int:
    """Run (or resume) `spec`; returns the process exit code."""
    done = finished_before(spec)
    if done is not None:
        print(
            f"done: nothing to do, all {done['pair_count']} pairs are already in {spec.out} "
            f"(rebuild the report with: python driver.py report {spec.out})",
            file=sys.stderr,
        )
        return EXIT_OK
    started, phases = time.time(), Phases()
    with ThreadPoolExecutor(max_workers=1) as pool:
        validation = pool.submit(validated_file, spec, phases)
        with ray_running(spec, phases):
            pool = ready_actors(spec, phases)  # they load the model while the file is validated
            job = prepare_job(spec, validation.result(), started, phases)
            status = compute(job, pool) if job.todo else "done"
    return finish(job, status)
