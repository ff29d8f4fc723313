"""What a sweep costs: pairs/s and time per patched cell of several (components, positions)
sweeps over the 48 benchmark pairs, in one process, relative to the first sweep.

    python -m bench.sweeps attn:each head:each head:END head:all

Each argument is COMPONENTS:POSITIONS (components comma-separated, positions as `--positions`).
Model: GPT-2-small-shaped random (bench/gpt2_small.py); pairs: examples/pairs.jsonl four times
over (14, 17 and 19 tokens, labelled). "cells run" counts the patched runs computed per pair
(cells before the first differing token cost nothing and are not counted).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.driver_throughput import repeated_pairs
from bench.gpt2_small import build_gpt2_small
from jobs.pairfile import read_pairs
from worker.model import load_model, load_tokenizer
from worker.options import position_labels
from worker.patching import cells_to_run, patch_batch, patch_cells, selected_cells
from worker.sites import n_heads

REPO = Path(__file__).resolve().parent.parent


def cells_run(model, pairs, components: list[str], positions: str) -> int:
    total = 0
    for n_tokens in {p.n_tokens for p in pairs}:
        group = [p for p in pairs if p.n_tokens == n_tokens]
        cells = patch_cells(components, len(model.transformer.h), n_tokens, n_heads(model), positions)
        total += len(cells_to_run(group, cells, selected_cells(group, cells, position_labels(positions))))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", help="COMPONENTS:POSITIONS, e.g. attn:each head:END")
    parser.add_argument("--pairs", default=str(REPO / "examples" / "pairs.jsonl"))
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--method", default="auto", choices=["auto", "trace", "reuse"])
    args = parser.parse_args()

    model_dir = str(build_gpt2_small(f"{tempfile.gettempdir()}/patchsweep-gpt2-12x768"))
    pairs_file = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    repeated_pairs(Path(args.pairs), args.repeat, pairs_file)
    pairs = read_pairs(pairs_file, *load_tokenizer(model_dir)).pairs
    model = load_model(model_dir, args.device, args.dtype)
    print(f"device={model.device} dtype={args.dtype} threads={torch.get_num_threads()} method={args.method} "
          f"pairs={len(pairs)} tokens={sorted({p.n_tokens for p in pairs})}")
    print(f"{'sweep':24s} {'rows':>8s} {'cells run/pair':>14s} {'pairs/s':>8s} {'s/pair':>7s} "
          f"{'ms/cell':>8s} {'cell cost vs first':>18s}")
    first_cost = None
    for sweep in args.sweeps:
        components, _, positions = sweep.partition(":")
        components = components.split(",")
        positions = positions or "each"
        patch_batch(model, pairs[:1], components, positions=positions, method=args.method)   # warm-up
        start = time.perf_counter()
        rows = patch_batch(model, pairs, components, positions=positions, method=args.method).effects.num_rows
        seconds = time.perf_counter() - start
        run = cells_run(model, pairs, components, positions)
        cost = seconds / run
        first_cost = first_cost or cost
        print(f"{sweep:24s} {rows:8d} {run / len(pairs):14.1f} {len(pairs) / seconds:8.2f} "
              f"{seconds / len(pairs):7.3f} {1000 * cost:8.2f} {cost / first_cost:18.2f}")


if __name__ == "__main__":
    main()
