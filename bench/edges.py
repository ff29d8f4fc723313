"""What edge attribution costs: pairs/s of EAP and EAP-IG over every edge of the graph (32,491 on
GPT-2 small) on the 48 benchmark pairs, against the computation's floor measured in the same run,
the bytes of `edges/` per pair, and the aggregate of many pairs' edges.

The floor is what any implementation must compute, in plain transformers with no hooks: per
group of pairs of one length, a no-grad forward of the corrupted prompts, then a forward with
gradients to the input embeddings (of the clean prompts; for EAP-IG, `--ig-steps` rows per pair
on the line between the two prompts' embeddings) and one backward of the logit difference.

    python -m bench.edges                      # eap, eap-ig with 5 steps
    python -m bench.edges --family llama --rounds 2
    python -m bench.edges --aggregate-pairs 10000
    python -m bench.edges --verify-top 20        # also eap with each pair's 20 top and 20 random edges exact

Model: GPT-2-small-sized random, of `--family` (bench/gpt2_small.py); pairs: examples/pairs.jsonl
four times over (14, 17 and 19 tokens). The aggregate is timed over a run directory built from
the measured run's parts, copied to `--aggregate-pairs` pairs (shards of 32 pairs, as the driver
writes them), with the driver's own aggregate (jobs/results/aggregate.py); its peak memory is the
process's resident high-water mark.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from bench.circuits import best_of
from bench.gpt2_small import add_model_arguments, model_and_pairs
from jobs.results.aggregate import aggregate
from jobs.store import EDGES, Store
from worker.contract.layout import PAIR_PARTS_DIR, PAIRS_FILE
from worker.contract.options import PatchOptions
from worker.graph.mib import Graph
from worker.methods.edges import edge_tables

SHARD = 32


def timed_run(model, pairs, options: PatchOptions, rounds: int) -> tuple[float, pa.Table, pa.Table]:
    """The fastest of `rounds` runs, and the tables of the last."""
    edge_tables(model, pairs[:1], options)  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        edges, pairs_rows = edge_tables(model, pairs, options)
        best = min(best, time.perf_counter() - start)
    return best, edges, pairs_rows


def floor_seconds(model_dir: str, pairs, method: str, steps: int, device, dtype: str, rounds: int) -> float:
    """The fastest of `rounds` passes of the floor over `pairs`, after one warm-up pass (`best_of`)."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    plain.requires_grad_(False)
    groups: dict[int, list] = {}
    for pair in pairs:
        groups.setdefault(pair.n_tokens, []).append(pair)

    def one_pass() -> None:
        for group in groups.values():
            clean, corrupted = (
                torch.tensor([getattr(p, side) for p in group], device=device)
                for side in ("clean_ids", "corrupted_ids")
            )
            correct = torch.tensor([p.correct_ids[0] for p in group], device=device)
            incorrect = torch.tensor([p.incorrect_ids[0] for p in group], device=device)
            with torch.no_grad():
                plain(corrupted)
            embed = plain.get_input_embeddings()
            inputs = embed(clean)
            if method == "eap-ig":
                alphas = torch.arange(1, steps + 1, device=device, dtype=inputs.dtype) / steps
                base = embed(corrupted)
                inputs = (base[:, None] + alphas[None, :, None, None] * (inputs - base)[:, None]).flatten(0, 1)
                correct, incorrect = correct.repeat_interleave(steps), incorrect.repeat_interleave(steps)
            inputs.requires_grad_(True)
            logits = plain(inputs_embeds=inputs).logits[:, -1]
            rows = torch.arange(len(logits), device=device)
            (logits[rows, correct] - logits[rows, incorrect]).sum().backward()

    return best_of(rounds, one_pass)


def run_of(edges: pa.Table, pairs_rows: pa.Table, n_pairs: int) -> Store:
    """A finished edges run of `n_pairs` pairs: the measured pairs' parts copied under new ids."""
    root = Path(tempfile.mkdtemp())
    for directory in (PAIR_PARTS_DIR, "edges"):
        (root / directory).mkdir()
    store = Store(str(root), EDGES)
    ids = pairs_rows.column("pair_id").to_pylist()
    for shard, first in enumerate(range(0, n_pairs, SHARD)):
        wanted = [f"{first + i}" for i in range(min(SHARD, n_pairs - first))]
        source = [ids[(first + i) % len(ids)] for i in range(len(wanted))]
        rows = pairs_rows.take(pa.array([ids.index(pair) for pair in source]))
        rows = rows.set_column(0, "pair_id", pa.array(wanted))
        own = pc.is_in(edges.column("pair_id"), pa.array(source))
        part = edges.filter(own)
        renamed = dict(zip(source, wanted))
        part = part.set_column(0, "pair_id", pa.array([renamed[pair] for pair in part.column("pair_id").to_pylist()]))
        name = f"part-{shard:05d}"
        store.write_table(rows, f"{PAIR_PARTS_DIR}/{name}.parquet")
        store.write_table(part, f"edges/{name}.parquet")
    store.write_table(pairs_rows, PAIRS_FILE)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--verify-top", type=int, default=0, help="Also time eap with this --verify-top.")
    parser.add_argument("--aggregate-pairs", type=int, default=0, help="Also time the aggregate of this many pairs.")
    args = parser.parse_args()

    model, pairs = model_and_pairs(args)
    edges = len(Graph.of(model).edges)
    print(
        f"family={args.family} device={model.device} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"pairs={len(pairs)} tokens={sorted({p.n_tokens for p in pairs})} edges={edges}"
    )
    print(
        f"{'method':20s} {'pairs/s':>8s} {'s/pair':>7s} {'edges/s':>10s} {'bytes/pair':>11s} "
        f"{'floor pairs/s':>14s} {'x floor':>8s}"
    )
    measured = None
    runs = [("eap", 0), ("eap-ig", 0)] + ([("eap", args.verify_top)] if args.verify_top else [])
    for method, verify_top in runs:
        options = PatchOptions((), method=method, ig_steps=args.ig_steps, verify_top=verify_top)
        seconds, table, pairs_rows = timed_run(model, pairs, options, args.rounds)
        written = Path(tempfile.mkdtemp()) / "part.parquet"
        pq.write_table(table, written)
        name = method if method == "eap" else f"eap-ig ({args.ig_steps} steps)"
        name += f" verify {verify_top}" if verify_top else ""
        model_dir = model._module.config._name_or_path
        floor = floor_seconds(model_dir, pairs, method, args.ig_steps, model.device, args.dtype, args.rounds)
        print(
            f"{name:20s} {len(pairs) / seconds:8.2f} {seconds / len(pairs):7.3f} "
            f"{edges * len(pairs) / seconds:10.0f} {written.stat().st_size / len(pairs):11.0f} "
            f"{len(pairs) / floor:14.2f} {seconds / floor:8.2f}"
        )
        measured = measured or (table, pairs_rows)
    if args.aggregate_pairs:
        store = run_of(*measured, args.aggregate_pairs)
        start = time.perf_counter()
        rows = aggregate(store, "denoise").num_rows
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"aggregate of {args.aggregate_pairs} pairs ({rows} edges): {seconds:.1f} s, process peak {peak:.0f} MiB")


if __name__ == "__main__":
    main()
