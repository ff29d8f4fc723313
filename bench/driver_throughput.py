"""Pairs per second of the whole driver (Ray start and model load included) for 1..N CPU actors,
and of its patch phase alone (first shard sent to last shard written; the part actors scale).

    python -m bench.driver_throughput --model examples/tiny-gpt2 --pairs examples/pairs.jsonl --repeat 8
    python -m bench.driver_throughput --model gpt2-small --pairs examples/pairs.jsonl --repeat 2
`--model gpt2-small` builds the GPT-2-small-shaped random checkpoint of bench/gpt2_small.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gpt2_small import build_gpt2_small

REPO = Path(__file__).resolve().parent.parent


def repeated_pairs(source: Path, repeat: int, target: Path) -> int:
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    copies = [{**r, "id": f"{r.get('id', i)}-{k}"} for k in range(repeat) for i, r in enumerate(records)]
    target.write_text("".join(json.dumps(r) + "\n" for r in copies))
    return len(copies)


def run_driver(
    pairs_file: Path,
    model: str,
    workers: int,
    out: Path,
    components: str = "resid",
    batch_pairs: int = 32,
    device: str = "cpu",
) -> float:
    """Run the driver end to end (`workers` CPU actors, or GPU actors with device cuda); its wall seconds."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(REPO / "driver.py"),
            "--pairs",
            str(pairs_file),
            "--model",
            model,
            "--out",
            str(out),
            "--components",
            components,
            "--workers",
            str(workers),
            "--device",
            device,
            "--batch-pairs",
            str(batch_pairs),
        ],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="examples/tiny-gpt2")
    parser.add_argument("--pairs", default="examples/pairs.jsonl")
    parser.add_argument("--repeat", type=int, default=1, help="Copies of the pair file, with fresh ids.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--components", default="resid")
    parser.add_argument("--batch-pairs", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model == "gpt2-small":
            model = str(build_gpt2_small(Path(tempfile.gettempdir()) / "patchsweep-gpt2-12x768"))
        pairs_file = Path(scratch) / "pairs.jsonl"
        n_pairs = repeated_pairs(Path(args.pairs), args.repeat, pairs_file)
        print(f"model={args.model} pairs={n_pairs} components={args.components} batch_pairs={args.batch_pairs}")
        for workers in args.workers:
            out = Path(scratch) / f"run-{workers}"
            wall = run_driver(pairs_file, model, workers, out, args.components, args.batch_pairs)
            phases = json.loads((out / "manifest.json").read_text())["timings"]["phase_seconds"]
            print(
                f"workers={workers} wall={wall:.1f}s pairs/s={n_pairs / wall:.2f} "
                f"patch phase {phases['patch']:.1f}s = {n_pairs / phases['patch']:.2f} pairs/s; "
                + " ".join(f"{name}={seconds:.1f}s" for name, seconds in phases.items())
            )


if __name__ == "__main__":
    main()
