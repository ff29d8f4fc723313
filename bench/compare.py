"""Pairs per second of four ways to patch the same pairs, in one process run, with identical numbers.

    python -m bench.compare --repeat 4 --skip-slow                          # 48 pairs, resid
    python -m bench.compare --repeat 4 --skip-slow --components resid,attn,mlp
1. seed shape: nnsight 0.8, one trace per pair, one invoke per (layer, position) with barriers;
2. TransformerLens-style: one full forward per (layer, position) with a plain PyTorch hook;
3. patchsweep's worker (`patch_batch`) in this process;
4. the driver end to end (Ray start and model load included) with 1 and 2 CPU actors.
Model: GPT-2-small-shaped random (bench/gpt2_small.py). The seed shape patches block outputs
only, so it is timed on `resid` whatever `--components` says; the ratio column divides by it.
Every method's logit differences are compared with the worker's.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from transformers import GPT2LMHeadModel

from bench.driver_throughput import repeated_pairs, run_driver
from bench.gpt2_small import build_gpt2_small
from bench.seed_shape import seed_shape_patching
from jobs.pairfile import read_pairs
from tests.reference import reference_patching
from worker.methods.registry import patch_batch
from worker.model.checkpoint import load_tokenizer
from worker.model.load import load_model

REPO = Path(__file__).resolve().parent.parent


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def by_key(rows: list[dict]) -> dict:
    return {(r["pair_id"], r["component"], r["layer"], r["position"]): r["logit_diff"] for r in rows}


def driver_run(
    pairs_file: Path, model_dir: str, workers: int, out: Path, components: str, device: str
) -> tuple[float, dict]:
    seconds = run_driver(pairs_file, model_dir, workers, out, components, device=device)
    return seconds, by_key(pq.read_table(out / "effects").to_pylist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default=str(REPO / "examples" / "pairs.jsonl"))
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--components", default="resid")
    parser.add_argument("--skip-slow", action="store_true", help="Time the seed shape and hooks on 4 pairs only.")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp())
    model_dir = str(build_gpt2_small(f"{tempfile.gettempdir()}/patchsweep-gpt2-12x768"))
    pairs_file = scratch / "pairs.jsonl"
    repeated_pairs(Path(args.pairs), args.repeat, pairs_file)
    pairs = read_pairs(pairs_file, *load_tokenizer(model_dir)).pairs
    slow_pairs = pairs[:4] if args.skip_slow else pairs
    model = load_model(model_dir, args.device)
    hf_model = GPT2LMHeadModel.from_pretrained(model_dir).eval().to(model.device)
    components = args.components.split(",")

    def seed(subset):
        return {
            (p.pair_id, "resid", *k): v
            for p in subset
            for k, v in seed_shape_patching(model, p).items()
            if isinstance(k, tuple)
        }

    def hooks(subset):
        return {
            (p.pair_id, *k): v
            for p in subset
            for k, v in reference_patching(hf_model, p, components, "denoise").items()
            if isinstance(k, tuple)
        }

    def worker(subset):
        return by_key(patch_batch(model, subset, components).effects.to_pylist())

    for method in (seed, hooks, worker):
        method(pairs[:1])  # warm-up
    rows = []
    for name, method, subset in [
        ("seed shape (nnsight invokes)", seed, slow_pairs),
        ("TL-style hooks", hooks, slow_pairs),
        ("patchsweep worker", worker, pairs),
    ]:
        start = time.perf_counter()
        values = method(subset)
        rows.append((name, len(subset) / (time.perf_counter() - start), values, peak_rss_gib()))
    on_gpu = model.device.type == "cuda"
    for workers in (1,) if on_gpu else (1, 2):
        seconds, values = driver_run(
            pairs_file, model_dir, workers, scratch / f"run-{workers}", args.components, "cuda" if on_gpu else "cpu"
        )
        rows.append((f"driver, {workers} {'GPU' if on_gpu else 'CPU'} actor(s)", len(pairs) / seconds, values, None))

    reference = rows[2][2]
    seed_rate = rows[0][1]
    print(
        f"device={model.device} threads={torch.get_num_threads()} pairs={len(pairs)} "
        f"tokens={sorted({p.n_tokens for p in pairs})} components={args.components} (seed shape: resid); "
        f"seed/hooks timed on {len(slow_pairs)} pairs"
    )
    print(f"{'method':30s} {'pairs/s':>8s} {'x seed':>7s} {'max |diff|':>11s} {'peak RSS (GiB)':>15s}")
    for name, rate, values, rss in rows:
        diff = max(abs(values[key] - reference[key]) for key in values)
        print(f"{name:30s} {rate:8.3f} {rate / seed_rate:7.2f} {diff:11.2e} {'' if rss is None else f'{rss:15.2f}'}")


if __name__ == "__main__":
    main()
