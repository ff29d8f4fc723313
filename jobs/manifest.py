"""One run's state, as OUT/manifest.json reports it: the job, what happened to each shard (its
receipt: rows, bytes, seconds, node), the phases' wall seconds, and the circuits it evaluates.

The manifest is rewritten as the run goes (`running`), and last with its status (`done`,
`failed`, `interrupted`); a re-run reads it to resume, and `finished_before` to do nothing at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from jobs.pairfile import FileScan, stream_pairs
from jobs.shards import Shard, filled_shards
from jobs.spec import JobSpec, config_hash, versions
from jobs.store import Store, results_kind
from worker.contract.layout import circuit_file
from worker.contract.pairs import Pair

RECEIPT_KEYS = ("rows", "bytes", "seconds", "node", "batch_tokens", "halvings")


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
            **({"scored_by": spec.scored_by} if spec.scored_by else {}),
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
            "file": circuit_file(c.name),
            "edges": len(c.edges),
            "budget": c.budget,
            "curve": c.curve,
            "fraction": c.fraction(),
        }
        for c in circuits
    ]


def shards_to_run(job: Job, shards: list[Shard]) -> Iterator[tuple[Shard, tuple[Pair, ...]]]:
    """`shards` with their pairs, as another read of the file fills them."""
    spec, reading = job.spec, job.reading
    scan = reading.scan
    pairs = stream_pairs(
        spec.pairs, reading.tokenizer, reading.n_ctx, spec.patch_options(), scan.skipped, scan.resampling
    )
    return filled_shards(pairs, job.shards, spec.batch_pairs, {shard.name for shard in shards})


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
