"""The driver at scale: peak memory, wall time per phase and pairs/s for a large pair file.

    python -m bench.scale --pairs 100000 --workers 2                 # the whole driver, tiny model
    python -m bench.scale --pairs 100000 --workers 2 --repo ../old   # the same, another checkout's driver
    python -m bench.scale --pairs 10000000 --read-only               # validation and sharding alone

The pair file is examples/pairs.jsonl over and over with fresh ids (zstd-compressed with
`--zstd`), written to `--scratch`. The whole driver runs as a subprocess whose peak resident
memory (VmHWM) is read from /proc while it runs, per phase: the run (validation, Ray, patching,
pairs.parquet) ends when the driver writes its final manifest (status no longer `running`), and
the report phase (aggregate, stability, report.html) follows in the same process. At that
moment the bench reads the driver's VmHWM (the run's peak) and resets it (`5` to
/proc/PID/clear_refs), so the VmHWM at exit is the report phase's own peak; the manifest is
watched every 0.01 s, so up to 0.01 s of the report may count in the run's peak.
`--read-only` runs the driver's two reads of the file in this process (scan: validate and count;
stream: tokenize again and fill every shard, each dropped once full) and reports this process's
peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parent.parent


def write_pairs(source: Path, n_pairs: int, target: Path, compress: bool) -> None:
    """`n_pairs` lines: the source file's lines again and again, each with a fresh id."""
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    with open(target, "wb") as raw:
        sink = zstandard.ZstdCompressor().stream_writer(raw) if compress else raw
        for start in range(0, n_pairs, 10_000):
            lines = [
                json.dumps({**records[i % len(records)], "id": f"p{i}"}) + "\n"
                for i in range(start, min(n_pairs, start + 10_000))
            ]
            sink.write("".join(lines).encode())
        if compress:
            sink.flush(zstandard.FLUSH_FRAME)


def status_mib(pid: int, field: str) -> float | None:
    """A memory line of /proc/PID/status (VmHWM, VmRSS) in MiB; None once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:"))) / 1024
    except (OSError, StopIteration):
        return None


def peak_rss_of(process: subprocess.Popen) -> float:
    """Wait for `process`, polling its peak resident memory (MiB) from /proc while it lives."""
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, status_mib(process.pid, "VmHWM") or 0.0)
        time.sleep(0.5)
    return peak


def run_finished(manifest: Path) -> bool:
    """Whether the driver has written its final manifest (its first key is the status)."""
    try:
        with open(manifest, "rb") as stream:
            head = stream.read(200)
    except OSError:
        return False
    return b'"status"' in head and b'"status": "running"' not in head


@dataclass
class PhasePeaks:
    """A driver's peak resident memory (MiB) in the run phases and in the report phase after them
    (None: the report never began), its resident memory as the report began, and the seconds
    from then to exit."""

    run: float = 0.0
    report: float | None = None
    report_start: float | None = None
    report_seconds: float = 0.0


def phase_peaks_of(process: subprocess.Popen, manifest: Path) -> PhasePeaks:
    """Wait for a driver `process` writing `manifest`; its `PhasePeaks`. At the final manifest
    the run's peak is read and the high-water mark reset, so the peak at exit is the report's own."""
    peaks, seen, report_began = PhasePeaks(), None, time.perf_counter()
    while process.poll() is None:
        hwm = status_mib(process.pid, "VmHWM")
        if hwm is not None:
            if peaks.report is None:
                peaks.run = max(peaks.run, hwm)
                changed = manifest.stat().st_mtime_ns if manifest.exists() else None
                if changed != seen and run_finished(manifest):
                    try:
                        Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS now
                        peaks.report = peaks.report_start = status_mib(process.pid, "VmHWM") or 0.0
                        report_began = time.perf_counter()
                    except OSError:
                        pass
                seen = changed
            else:
                peaks.report = max(peaks.report, hwm)
        time.sleep(0.01)
    peaks.report_seconds = time.perf_counter() - report_began
    return peaks


def whole_driver(pairs_file: Path, n_pairs: int, args) -> None:
    out = Path(args.scratch) / f"run-{n_pairs}"
    (out / "manifest.json").unlink(missing_ok=True)  # an earlier run's final manifest would end the run phases
    command = [
        sys.executable,
        str(Path(args.repo) / "driver.py"),
        "--pairs",
        str(pairs_file),
        "--model",
        str(REPO / args.model),
        "--out",
        str(out),
        "--workers",
        str(args.workers),
        "--device",
        "cpu",
        "--components",
        args.components,
        "--batch-pairs",
        str(args.batch_pairs),
        "--overwrite",
    ]
    start = time.perf_counter()
    said = Path(args.scratch) / f"run-{n_pairs}.stderr"  # a file: a pipe nobody reads fills up and blocks
    with open(said, "wb") as stderr:
        process = subprocess.Popen(command, cwd=args.repo, stdout=subprocess.DEVNULL, stderr=stderr)
        peaks = phase_peaks_of(process, out / "manifest.json")
    wall = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(said.read_text()[-2000:])
    phases = json.loads((out / "manifest.json").read_text())["timings"]["phase_seconds"]
    print(
        f"driver ({args.repo}): pairs={n_pairs} workers={args.workers} wall={wall:.1f}s "
        f"pairs/s={n_pairs / wall:.0f} patch phase pairs/s={n_pairs / phases['patch']:.0f} "
        f"driver peak RSS={max(peaks.run, peaks.report or 0):.0f} MiB: run phases {peaks.run:.0f} MiB, "
        f"report phase {peaks.report or 0:.0f} MiB (from {peaks.report_start or 0:.0f} MiB as it began)"
    )
    print(
        "  phases: "
        + " ".join(f"{name}={seconds:.1f}s" for name, seconds in phases.items())
        + f" report+exit={peaks.report_seconds:.1f}s"
    )


def read_only(pairs_file: Path, n_pairs: int, args) -> None:
    from jobs.pairfile import scan_pairs, stream_pairs
    from jobs.shards import filled_shards, plan_shards
    from worker.contract.options import PatchOptions
    from worker.model.checkpoint import load_tokenizer

    tokenizer, n_ctx = load_tokenizer(str(REPO / args.model))
    start = time.perf_counter()
    scan = scan_pairs(pairs_file, tokenizer, n_ctx)
    scanned = time.perf_counter()
    shards = plan_shards(scan.lengths, args.batch_pairs)
    pairs = stream_pairs(pairs_file, tokenizer, n_ctx, PatchOptions(), scan.skipped)
    filled = sum(1 for _ in filled_shards(pairs, shards, args.batch_pairs, {s.name for s in shards}))
    streamed = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"read only: pairs={n_pairs} shards={filled} scan {scanned - start:.1f}s = "
        f"{n_pairs / (scanned - start):.0f} pairs/s; stream and fill {streamed - scanned:.1f}s = "
        f"{n_pairs / (streamed - scanned):.0f} pairs/s; peak RSS={peak:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[100_000])
    parser.add_argument("--model", default="examples/tiny-gpt2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--components", default="resid")
    parser.add_argument("--batch-pairs", type=int, default=32)
    parser.add_argument("--repo", default=str(REPO), help="The checkout whose driver.py runs.")
    parser.add_argument("--read-only", action="store_true", help="Validation and sharding only, in process.")
    parser.add_argument("--zstd", action="store_true", help="Write the pair file zstd-compressed.")
    parser.add_argument("--scratch", default=tempfile.gettempdir())
    args = parser.parse_args()
    for n_pairs in args.pairs:
        pairs_file = Path(args.scratch) / f"scale-{n_pairs}.jsonl{'.zst' if args.zstd else ''}"
        if not pairs_file.exists():
            write_pairs(REPO / "examples" / "pairs.jsonl", n_pairs, pairs_file, args.zstd)
        (read_only if args.read_only else whole_driver)(pairs_file, n_pairs, args)


if __name__ == "__main__":
    main()
