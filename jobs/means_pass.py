"""The stored means of a mean-donor run (`--donor mean`, `mean-all`): the actors' per-shard
sums (worker/batch/mean_donors.py `donor_sums`) added up and divided, one row per (component, layer, key).

The driver runs this first pass over every shard (jobs/run.py), writes the result as
`OUT/donor_means.parquet` and hands actors the run's location; each reads the file once. A
re-run of the same configuration finds the file and reuses it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import pyarrow as pa


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
