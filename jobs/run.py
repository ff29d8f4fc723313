"""Running one job: validate, plan the shards, stream them to actors, record their receipts.

The pair file is validated in a thread while Ray starts and the actors load their model
(loading torch, transformers and the tokenizer is most of the driver's start-up, Ray's start
is mostly waiting, and an actor's start is its own process loading the model); that pass keeps
only the bad lines and the number of pairs of each length, enough to plan every shard. The
file is then read again as a stream, each shard handed out as soon as it is full, so the
driver's memory does not grow with the file. Actors write their shards themselves, so an
interrupted or failed run keeps every finished shard.

Here are the phases in order; jobs/dispatch.py hands shards to actors and survives lost nodes,
jobs/manifest.py keeps the run's state as its manifest says it, jobs/means_pass.py runs the
mean-donor pass.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, replace

import ray
from tqdm import tqdm

from jobs.cluster import connect, pool_shape, start_actors, start_in_process
from jobs.dispatch import TASK_ERRORS, JobError, NodesLost, Pool, in_turn, outcome, short_error, wait_until_ready
from jobs.manifest import Job, Phases, Reading, ShardLog, finished_before, shards_to_run
from jobs.means_pass import donor_means
from jobs.pairfile import scan_pairs
from jobs.results.report import build_report
from jobs.shards import Shard, plan_shards
from jobs.spec import JobSpec, config_hash
from jobs.store import Store, results_kind
from worker.contract.layout import CIRCUITS_DIR, PAIR_PARTS_DIR, circuit_file
from worker.contract.options import MEAN_DONORS, METHODS, PatchOptions
from worker.contract.pairs import Pair
from worker.graph.mib import Graph

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_INTERRUPTED = 0, 1, 130


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


def dispatch(job: Job, pool: Pool, options: PatchOptions) -> None:
    """Patch the unfinished shards; each actor writes its shard's parts itself and returns a
    receipt, which is recorded; failures are recorded by shard."""
    log, writer = job.log, job.store.part_writer()

    def send(actor, shard: Shard, pairs: tuple[Pair, ...]) -> ray.ObjectRef:
        return actor.run_shard.remote(shard.name, pairs, options, writer)

    todo = job.todo
    for shard, ref in in_turn(pool, shards_to_run(job, todo), send, "patching", sum(s.size for s in todo)):
        try:
            log.receipts[shard.name] = asdict(outcome(ref))
            log.finished.add(shard.name)
        except TASK_ERRORS as error:
            log.failed[shard.name] = short_error(error)
            tqdm.write(f"shard {shard.name} failed: {log.failed[shard.name]}", file=sys.stderr)


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
        store.write_bytes(circuit.to_json().encode(), circuit_file(circuit.name))
    log = ShardLog.resumed(store.finished_shards() & {s.name for s in shards}, previous)
    job = Job(spec, config, reading, shards, store, log, len(log.finished), started, phases)
    store.write_manifest(job.manifest("running"))
    return job


@contextmanager
def ray_running(spec: JobSpec, phases: Phases) -> Iterator[None]:
    """Ray for the run: joined or started, and shut down after; none with `--workers 0`."""
    if spec.workers == 0:
        yield
        return
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
        if spec.workers == 0:
            actors = [start_in_process(spec.model, spec.device, spec.dtype)]
        else:
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


def run_job(spec: JobSpec) -> int:
    """Run (or resume) `spec`; returns the process exit code."""
    if spec.workers == 0 and spec.address:
        raise JobError(
            f"--workers 0 runs the shards in this process, without Ray: it cannot join --address {spec.address}"
        )
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
