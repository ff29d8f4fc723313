"""How good AtP's estimates are: exact patching of every cell against AtP on the same pairs.

    python -m bench.atp_quality --pairs 200 --components resid,attn,mlp,head --top 10

Model: the bundled toy IOI model (examples/toy-ioi-gpt2); pairs: the first N of
examples/ioi_pairs.jsonl. Prints, per component, Pearson and Spearman correlation of AtP's
estimate with the exact score over every cell, and per component the mean share of each
pair's exact top K cells that AtP also ranks in its top K; and both methods' time.
Pairs with |clean - corrupted| < 0.1 are left out, as in the report.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from jobs.pairfile import read_pairs
from worker.model import load_model, load_tokenizer
from worker.patching import patch_batch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "examples" / "toy-ioi-gpt2"))
    parser.add_argument("--pairs-file", default=str(REPO / "examples" / "ioi_pairs.jsonl"))
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--components", default="resid,attn,mlp,head")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--direction", default="denoise")
    args = parser.parse_args()

    pairs = read_pairs(args.pairs_file, *load_tokenizer(args.model)).pairs[: args.pairs]
    model = load_model(args.model, device="cpu")
    components = args.components.split(",")
    timings, tables = {}, {}
    for method in ("exact", "atp"):
        start = time.perf_counter()
        result = patch_batch(model, pairs, components, args.direction, method=method)
        timings[method] = time.perf_counter() - start
        tables[method] = result
    exact = tables["exact"].effects.to_pandas()
    estimate = tables["atp"].effects.to_pandas()["estimate"]
    gaps = tables["exact"].pairs.to_pandas().set_index("pair_id")
    kept = (gaps.clean_logit_diff - gaps.corrupted_logit_diff).abs() >= 0.1
    frame = exact.assign(estimate=estimate.values)
    frame = frame[frame.pair_id.map(kept)]
    print(
        f"model={args.model} pairs={len(pairs)} (kept {int(kept.sum())}) components={args.components} "
        f"direction={args.direction} threads={torch.get_num_threads()}"
    )
    print(
        f"exact {timings['exact']:.1f} s ({len(pairs) / timings['exact']:.2f} pairs/s), "
        f"atp {timings['atp']:.1f} s ({len(pairs) / timings['atp']:.2f} pairs/s), "
        f"atp {timings['exact'] / timings['atp']:.1f}x faster"
    )
    print(f"{'component':10s} {'cells':>8s} {'pearson':>8s} {'spearman':>9s} {f'top-{args.top} share':>13s}")
    for component, rows in frame.groupby("component", sort=False):
        shares = []
        for _, cells in rows.groupby("pair_id"):
            exact_top = set(cells.score.abs().nlargest(args.top).index)
            atp_top = set(cells.estimate.abs().nlargest(args.top).index)
            shares.append(len(exact_top & atp_top) / args.top)
        print(
            f"{component:10s} {len(rows):8d} {rows.score.corr(rows.estimate):8.3f} "
            f"{rows.score.rank().corr(rows.estimate.rank()):9.3f} {sum(shares) / len(shares):13.3f}"
        )
    for (component, layer), rows in frame.groupby(["component", "layer"], sort=False):
        print(f"  {component} layer {layer}: pearson {rows.score.corr(rows.estimate):.3f}")


if __name__ == "__main__":
    main()
