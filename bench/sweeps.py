"""What a sweep costs: pairs/s and time per patched cell of several (components, positions,
metric) sweeps over the 48 benchmark pairs, in one process, relative to the first sweep.

    python -m bench.sweeps attn:each head:each head:END head:all
    python -m bench.sweeps resid:each:logit_diff resid:each:logprob resid:each:prob_diff resid:each:kl
    python -m bench.sweeps resid,attn,mlp,head resid,attn,mlp,head:each:logit_diff:atp
    python -m bench.sweeps head:all head:all:logit_diff:exact:zero resid:each resid:each:logit_diff:exact:zero
    python -m bench.sweeps head:END head:END:logit_diff:exact:resample head:END:logit_diff:exact:mean

Each argument is COMPONENTS[:POSITIONS[:METRIC[:METHOD[:DONOR]]]] (components comma-separated,
positions as `--positions`, default each; metric as `--metric`, default logit_diff; method
exact, atp or atpstar, default exact; donor as `--donor`, default pair: every pair resamples from
another of its length as the driver pairs them, and a mean donor's first pass is timed on its
own line, once per components and donor). For atp and atpstar, "cells run" still counts the cells estimated.
Model: GPT-2-small-sized random, of `--family` (bench/gpt2_small.py); pairs: examples/pairs.jsonl four times
over (14, 17 and 19 tokens, labelled). "cells run" counts the patched runs computed per pair
(cells before the first differing token cost nothing from the pair's other prompt and are not
counted; an ablation runs them all).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from bench.driver_throughput import repeated_pairs
from bench.gpt2_small import build_small
from jobs.means_pass import means_table
from jobs.pairfile import read_pairs
from worker.batch.cells import model_cells, selected_cells
from worker.batch.donors import Donors
from worker.batch.mean_donors import donor_sums
from worker.contract.layout import MEANS_FILE
from worker.contract.options import MEAN_DONORS, PatchOptions, position_labels
from worker.engines.trace import cells_to_run
from worker.methods.registry import patch_batch
from worker.model.checkpoint import load_tokenizer
from worker.model.load import load_model
from worker.model.sites import n_layers

REPO = Path(__file__).resolve().parent.parent


def grouped(model, pairs, components: list[str], positions: str):
    """Per token length: the pairs, and the cells patch_batch lays out for them."""
    for n_tokens in sorted({p.n_tokens for p in pairs}):
        group = [p for p in pairs if p.n_tokens == n_tokens]
        yield group, model_cells(model, components, n_tokens, positions)


def pairs_rows(model, pairs, components: list[str], positions: str) -> list:
    return [
        row
        for group, cells in grouped(model, pairs, components, positions)
        for row in selected_cells(group, cells, position_labels(positions))
    ]


def cells_run(model, pairs, components: list[str], positions: str, donor: str, means: str | None) -> int:
    donors = Donors.of(PatchOptions(donor=donor, means=means))
    return sum(
        len(
            cells_to_run(
                group, cells, selected_cells(group, cells, position_labels(positions)), donors, n_layers(model)
            )
        )
        for group, cells in grouped(model, pairs, components, positions)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", help="COMPONENTS[:POSITIONS[:METRIC[:METHOD[:DONOR]]]], e.g. head:END")
    parser.add_argument("--pairs", default=str(REPO / "examples" / "pairs.jsonl"))
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--exact-path", default="auto", choices=["auto", "trace", "reuse"])
    parser.add_argument(
        "--family",
        default="gpt2",
        choices=["gpt2", "gpt_neox", "llama"],
        help="The random GPT-2-small-sized model's family.",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Time every sweep this many times, in turns, and keep each one's fastest (machine noise).",
    )
    args = parser.parse_args()

    model_dir = str(build_small(args.family, f"{tempfile.gettempdir()}/patchsweep-{args.family}-12x768"))
    pairs_file = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    repeated_pairs(Path(args.pairs), args.repeat, pairs_file)
    pairs = read_pairs(pairs_file, *load_tokenizer(model_dir), PatchOptions(donor="resample")).pairs
    model = load_model(model_dir, args.device, args.dtype)
    print(
        f"family={args.family} device={model.device} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"exact_path={args.exact_path} "
        f"pairs={len(pairs)} tokens={sorted({p.n_tokens for p in pairs})}"
    )
    print(
        f"{'sweep':30s} {'rows':>8s} {'cells run/pair':>14s} {'pairs/s':>8s} {'s/pair':>7s} "
        f"{'ms/cell':>8s} {'cell cost vs first':>18s}"
    )
    sweeps = [parse_sweep(sweep) for sweep in args.sweeps]
    for components, options in sweeps:
        if options["donor"] in MEAN_DONORS:
            options["means"] = mean_pass(model, pairs, components, options["donor"])
    for components, options in sweeps:
        patch_batch(model, pairs[:1], components, exact_path=args.exact_path, **options)  # warm-up
    best: dict[int, float] = {}
    for _ in range(args.rounds):
        for index, (components, options) in enumerate(sweeps):
            start = time.perf_counter()
            patch_batch(model, pairs, components, exact_path=args.exact_path, **options)
            best[index] = min(best.get(index, float("inf")), time.perf_counter() - start)
    first_cost = None
    for index, (sweep, (components, options)) in enumerate(zip(args.sweeps, sweeps)):
        seconds = best[index]
        rows = len(pairs_rows(model, pairs, components, options["positions"]))
        run = cells_run(model, pairs, components, options["positions"], options["donor"], options.get("means"))
        cost = seconds / run
        first_cost = first_cost or cost
        print(
            f"{sweep:30s} {rows:8d} {run / len(pairs):14.1f} {len(pairs) / seconds:8.2f} "
            f"{seconds / len(pairs):7.3f} {1000 * cost:8.2f} {cost / first_cost:18.2f}"
        )


def mean_pass(model, pairs, components: list[str], donor: str) -> str:
    """Time the first pass of a mean donor (the actors' sums and their adding) and store its means."""
    options = PatchOptions(tuple(components), donor=donor)
    donor_sums(model, pairs[:1], options)  # warm-up
    start = time.perf_counter()
    table = means_table([donor_sums(model, pairs, options)])
    seconds = time.perf_counter() - start
    print(f"{'first pass, ' + donor + ' of ' + ','.join(components):42s} {len(pairs) / seconds:8.2f} pairs/s")
    run = tempfile.mkdtemp()
    pq.write_table(table, f"{run}/{MEANS_FILE}")
    return run


def parse_sweep(sweep: str) -> tuple[list[str], dict]:
    defaults = ["each", "logit_diff", "exact", "pair"][sweep.count(":") :]
    components, positions, metric, method, donor = (sweep.split(":") + defaults)[:5]
    return components.split(","), {"positions": positions, "metric": metric, "method": method, "donor": donor}


if __name__ == "__main__":
    main()
