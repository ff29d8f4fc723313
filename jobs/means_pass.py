"""The first pass of a mean-donor run (`--donor mean`, `mean-all`) and its stored means: the actors' per-shard
sums (worker/batch/mean_donors.py `donor_sums`) added up and divided, one row per (component, layer, key).

The driver runs this first pass over every shard (`donor_means`), writes the result as
`OUT/donor_means.parquet` and hands actors the run's location; each reads the file once. A
re-run of the same configuration finds the file and reuses it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import replace

import numpy as np
import pyarrow as pa
import ray

from jobs.dispatch import TASK_ERRORS, JobError, Pool, in_turn, outcome, short_error
from jobs.manifest import Job, shards_to_run
from jobs.shards import Shard
from worker.contract.layout import MEANS_FILE
from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair


def means_table(parts: Iterable[pa.Table]) -> pa.Table:
    """The shards' sums added up, and divided: per site and key, `count` and `mean` (float32).
    `parts` is taken one at a time (a generator of the actors' results keeps one in memory)."""
    counts: dict[tuple, int] = defaultdict(int)
    sums: dict[tuple, np.ndarray] = {}
    for part in parts:
        for row in part.to_pylist():
            site = (row["component"], row["layer"], row["key"])
            counts[site] += row["count"]
            vector = np.asarray(row["sum"])
            sums[site] = vector if site not in sums else sums[site] + vector
    sites = sorted(sums)
    return pa.table(
        {
            "component": pa.array([s[0] for s in sites], pa.string()),
            "layer": pa.array([s[1] for s in sites], pa.int16()),
            "key": pa.array([s[2] for s in sites], pa.string()),
            "count": pa.array([counts[s] for s in sites], pa.int64()),
            "mean": pa.array([(sums[s] / counts[s]).astype(np.float32) for s in sites], pa.list_(pa.float32())),
        }
    )


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
                    yield outcome(ref)
                except TASK_ERRORS as error:
                    raise JobError(f"the donor means pass failed on shard {shard.name}: {short_error(error)}") from None

        store.write_table(means_table(sums()), MEANS_FILE)
        job.means = {"file": MEANS_FILE, "reused": False}
    store.write_manifest(job.manifest("running"))
    return replace(options, means=store.part_writer().root)
