"""How good AtP's and AtP*'s estimates are: exact patching of every cell against both on the same pairs.

    python -m bench.atp_quality --pairs 200 --components resid,attn,mlp,head,q,k --top 10

Model: the bundled toy IOI model (examples/toy-ioi-gpt2); pairs: the first N of
examples/ioi_pairs.jsonl. Prints, per component and method, Pearson and Spearman correlation
of the estimate with the exact score over every cell, and the mean share of each pair's exact
top K cells (of that component) that the method ranks in its top K: AtP by |estimate|, AtP* by
GradDrop's size (as its --verify-top does) and, to separate the two fixes, by |estimate| (the
QK fix alone); and each method's time. Pairs with |clean - corrupted| < 0.1 are left out, as
in the report.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from jobs.pairfile import read_pairs
from worker.methods.registry import patch_batch
from worker.model.checkpoint import load_tokenizer
from worker.model.load import load_model

REPO = Path(__file__).resolve().parent.parent
RANKINGS = {
    "atp": ("atp", "estimate"),
    "atp* (graddrop)": ("atpstar", "graddrop"),
    "atp* (qk only)": ("atpstar", "estimate"),
}


def top_share(frame: pd.DataFrame, column: str, k: int) -> float:
    """The mean over pairs of the share of the pair's exact top `k` (by |score|) in its top `k` by |column|."""
    shares = []
    for _, cells in frame.groupby("pair_id"):
        exact_top = set(cells.score.abs().nlargest(k).index)
        shares.append(len(exact_top & set(cells[column].abs().nlargest(k).index)) / k)
    return sum(shares) / len(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "examples" / "toy-ioi-gpt2"))
    parser.add_argument("--pairs-file", default=str(REPO / "examples" / "ioi_pairs.jsonl"))
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--components", default="resid,attn,mlp,head,q,k")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--direction", default="denoise")
    args = parser.parse_args()

    pairs = read_pairs(args.pairs_file, *load_tokenizer(args.model)).pairs[: args.pairs]
    model = load_model(args.model, device="cpu")
    components = args.components.split(",")
    timings, tables = {}, {}
    for method in ("exact", "atp", "atpstar"):
        start = time.perf_counter()
        tables[method] = patch_batch(model, pairs, components, args.direction, method=method)
        timings[method] = time.perf_counter() - start
    frame = tables["exact"].effects.to_pandas()
    for name, (method, column) in RANKINGS.items():
        frame[name] = tables[method].effects.to_pandas()[column].values
    gaps = tables["exact"].pairs.to_pandas().set_index("pair_id")
    kept = (gaps.clean_logit_diff - gaps.corrupted_logit_diff).abs() >= 0.1
    frame = frame[frame.pair_id.map(kept)]
    print(
        f"model={args.model} pairs={len(pairs)} (kept {int(kept.sum())}) components={args.components} "
        f"direction={args.direction} threads={torch.get_num_threads()}"
    )
    print(
        ", ".join(
            f"{method} {seconds:.1f} s ({len(pairs) / seconds:.2f} pairs/s)" for method, seconds in timings.items()
        )
    )
    print(
        f"{'component':10s} {'cells':>7s} | {'atp: pearson':>12s} {'spearman':>8s} {f'top-{args.top}':>6s} | "
        f"{'atp*: pearson':>13s} {'spearman':>8s} {f'top-{args.top} (graddrop)':>17s} {'(qk only)':>9s}"
    )
    for component, rows in frame.groupby("component", sort=False):
        atp, star = rows["atp"], rows["atp* (qk only)"]
        print(
            f"{component:10s} {len(rows):7d} | {rows.score.corr(atp):12.3f} {rows.score.rank().corr(atp.rank()):8.3f} "
            f"{top_share(rows, 'atp', args.top):6.3f} | {rows.score.corr(star):13.3f} "
            f"{rows.score.rank().corr(star.rank()):8.3f} {top_share(rows, 'atp* (graddrop)', args.top):17.3f} "
            f"{top_share(rows, 'atp* (qk only)', args.top):9.3f}"
        )


if __name__ == "__main__":
    main()
