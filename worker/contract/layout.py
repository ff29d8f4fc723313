"""A run's directory (OUT, a local path or a URI): the one place that names what is in it.

    manifest.json            the configuration, its hash, each shard's receipt, the phases' seconds
    <results>/part-NNNNN.parquet   one shard's results rows: effects/, paths/, edges/ or faithfulness/
                             (the method's `results` in worker/contract/options.py); after `compact`,
                             also parts-A-B.parquet, which holds shards part-A .. part-B
    _pairs/part-NNNNN.parquet      one shard's pairs rows, written before its results part
    pairs.parquet            every finished shard's pairs rows, gathered at the end of each run
    invalid.jsonl            the pair file's bad lines (with --skip-invalid)
    donor_means.parquet      --donor mean, mean-all: the first pass's means
    circuits/NAME.json       a circuit run's circuits, in EAP-IG's graph JSON
    aggregate.parquet, aggregate_groups.parquet, stability.parquet, report.html: the report's

Torch-free: the driver, the report and the actors all read it.
"""

from __future__ import annotations

import re

MANIFEST = "manifest.json"
PAIRS_FILE = "pairs.parquet"
INVALID_FILE = "invalid.jsonl"
PAIR_PARTS_DIR = "_pairs"
MEANS_FILE = "donor_means.parquet"
CIRCUITS_DIR = "circuits"
AGGREGATE_FILE = "aggregate.parquet"
GROUPS_FILE = "aggregate_groups.parquet"  # `report --group-by`: per group, beside the overall aggregate
STABILITY_FILE = "stability.parquet"  # the split halves (jobs/results/stability.py)
CURVES_FILE = "curves.parquet"  # a circuit run's faithfulness curves and their areas (jobs/results/curves.py)
REPORT_FILE = "report.html"
PART = "part-"
COMPACTED = "parts-"  # a compacted results file: parts-00000-00999 holds shards part-00000 .. part-00999
RESULTS_NAME = re.compile(r"part-\d+|parts-\d+-\d+")  # a results file's name, without `.parquet`


def part_name(index: int) -> str:
    """The name of shard `index` (and of its results and pairs parts)."""
    return f"{PART}{index:05d}"


def part_index(name: str) -> int:
    return int(name.removeprefix(PART))


def covered(name: str) -> list[str]:
    """The shards a results file (its name without `.parquet`) holds: itself, or for a compacted
    file every shard its name spans."""
    if not name.startswith(COMPACTED):
        return [name]
    first, last = name.removeprefix(COMPACTED).split("-")
    return [part_name(index) for index in range(int(first), int(last) + 1)]


def merged_name(first: str, last: str) -> str:
    """The name of the compacted file holding shards `first` .. `last`."""
    return f"{COMPACTED}{first.removeprefix(PART)}-{last.removeprefix(PART)}"


def circuit_file(name: str) -> str:
    """Where circuit `name` is, under OUT."""
    return f"{CIRCUITS_DIR}/{name}.json"
