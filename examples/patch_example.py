"""Patch the bundled example pairs with the bundled tiny model and print the mean score per layer."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from jobs import read_pairs
from worker import load_model, load_tokenizer, patch_batch

HERE = Path(__file__).parent


def main() -> None:
    source = str(HERE / "tiny-gpt2")
    tokenizer, n_ctx = load_tokenizer(source)
    pair_file = read_pairs(HERE / "pairs.jsonl", tokenizer, n_ctx)
    result = patch_batch(load_model(source), pair_file.pairs, components=["resid"])
    scores = defaultdict(list)
    for row in result.effects.to_pylist():
        scores[row["layer"]].append(row["score"])
    print(f"{result.pairs.num_rows} pairs, {result.effects.num_rows} effect rows")
    for layer, values in sorted(scores.items()):
        print(f"resid layer {layer}: mean score {sum(values) / len(values):+.3f}")


if __name__ == "__main__":
    main()
