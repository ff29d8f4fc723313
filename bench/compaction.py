"""What compaction buys a big run: `driver.py query` before and after `driver.py compact`.

    python -m bench.compaction --pairs 1000000        # 31,250 parts, as the 1M-pair tiny-model run
    python -m bench.compaction --pairs 100000 --scratch /tmp/runs

The run is synthetic but shaped like the driver's: `--pairs-per-shard` pairs a shard (32, the
default `--batch-pairs`), `--rows` effect rows a pair (32: `resid` of the 2-layer tiny model at
16 positions), one results part and one `_pairs` part per shard, written as the actors write
them. Each query runs as its own `driver.py query` process, whose wall time and peak resident
memory (VmHWM, polled) are printed; so is `driver.py compact`'s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.scale import peak_rss_of
from jobs.store import Store
from worker.contract.layout import part_name
from worker.contract.tables import effects_schema, pair_columns

REPO = Path(__file__).resolve().parent.parent
QUERIES = (
    "SELECT count(*) FROM effects",
    "SELECT layer, position, avg(score) FROM effects GROUP BY ALL ORDER BY ALL",
)


def synthetic_run(out: Path, n_pairs: int, per_shard: int, rows: int) -> int:
    """Write the run; its number of shards."""
    store = Store(str(out))
    store.prepare("synthetic", overwrite=True)
    writer, generator = store.part_writer(), np.random.default_rng(0)
    pairs_schema, schema = pa.schema(pair_columns("logit_diff")), effects_schema("logit_diff")
    shards = -(-n_pairs // per_shard)
    for shard in range(shards):
        ids = [f"p{i}" for i in range(shard * per_shard, min(n_pairs, (shard + 1) * per_shard))]
        pairs = {name: [None] * len(ids) for name in pairs_schema.names} | {"pair_id": ids, "n_tokens": [16] * len(ids)}
        writer.write_pairs(part_name(shard), pa.table(pairs, schema=pairs_schema))
        n = len(ids) * rows
        effects = {
            "pair_id": np.repeat(ids, rows),
            "component": ["resid"] * n,
            "layer": np.tile(np.repeat([0, 1], rows // 2), len(ids)).astype(np.int16),
            "position": np.tile(np.arange(rows) % (rows // 2), len(ids)).astype(np.int16),
            "head": [None] * n,
            "logit_diff": generator.normal(size=n).astype(np.float32),
            "score": generator.normal(size=n).astype(np.float32),
            "estimate": [None] * n,
            "graddrop": [None] * n,
        }
        writer.write_results(part_name(shard), pa.table(effects, schema=schema))
    store.write_manifest({"status": "done", "method": "exact"})
    return shards


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout+stderr) of a driver subprocess."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "driver.py"), *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = peak_rss_of(process)
    return time.perf_counter() - start, peak, process.stdout.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--pairs-per-shard", type=int, default=32)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--scratch", default=tempfile.gettempdir())
    args = parser.parse_args()

    out = Path(args.scratch) / f"compaction-{args.pairs}"
    start = time.perf_counter()
    shards = synthetic_run(out, args.pairs, args.pairs_per_shard, args.rows)
    print(
        f"{args.pairs:,} pairs, {shards:,} parts, {args.pairs * args.rows:,} rows: "
        f"written in {time.perf_counter() - start:.0f} s"
    )
    for when in ("before", "after"):
        if when == "after":
            seconds, peak, said = timed(["compact", str(out)])
            print(f"compact: {seconds:.1f} s, peak {peak:.0f} MiB: {said.strip()}")
        for sql in QUERIES:
            seconds, peak, said = timed(["query", str(out), sql])
            print(f"{when:6s} {sql[:60]:60s} {seconds:6.1f} s  peak {peak:6.0f} MiB  ({said.splitlines()[-1]})")


if __name__ == "__main__":
    main()
