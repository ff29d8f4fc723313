"""A tiny random GPT-2 with its own byte-level BPE tokenizer, built offline.

Weights cannot be downloaded here, so the tests and the quick start build (or ship) a
GPT-2-architecture checkpoint of their own; it loads through the same path as a hub id.
Run as a script to (re)write the bundled checkpoints: `python examples/tiny_gpt2.py examples/tiny-gpt2`,
and with `--years` the same model with the century and two-digit years as tokens (examples/tiny-years-gpt2).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
NAMES = ["John", "Mary", "Tom", "Anna", "James", "Lisa", "David", "Sarah", "Paul", "Kate"]
PLACES = ["store", "garden", "school", "office", "station"]
OBJECTS = ["drink", "ring", "book", "snack", "bone"]
YEAR_TOKENS = ["17", *(f"{year:02d}" for year in range(100))]  # the century and every two-digit year
TEMPLATES = [
    "When {a} and {b} went to the {place}, {c} gave a {obj} to",
    "Then, {a} and {b} had a lot of fun at the {place}. {c} gave the {obj} to",
    "After the lunch, {a} and {b} went to the {place}. {c} gave a {obj} to",
]


def corpus() -> list[str]:
    """Sentences whose words, names and places all become single tokens after BPE training."""
    texts = []
    for template, (a, b), place, obj in itertools.product(
        TEMPLATES, itertools.permutations(NAMES, 2), PLACES, OBJECTS[:2]
    ):
        texts.append(template.format(a=a, b=b, c=b, place=place, obj=obj) + " " + a)
    texts += [f"The {obj} is in the {place}." for obj in OBJECTS for place in PLACES]
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def build_tiny_gpt2(
    out_dir: str | Path,
    n_layer: int = 3,
    n_embd: int = 32,
    n_head: int = 4,
    initializer_range: float = 0.5,
    seed: int = 2,
    extra_tokens: Sequence[str] = (),
) -> Path:
    """Write a randomly initialised GPT2LMHeadModel and its tokenizer to `out_dir`.

    A wider initialisation than GPT-2's 0.02 makes clean and corrupted logit differences
    differ clearly, so normalised scores are well conditioned in tests and demos.
    `extra_tokens` become whole tokens wherever they occur (two-digit years, for greater-than).
    """
    tokenizer = build_tokenizer(corpus())
    tokenizer.add_tokens(list(extra_tokens))
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        initializer_range=initializer_range,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    model = GPT2LMHeadModel(config).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if sys.argv[1:2] == ["--years"]:  # examples/tiny-years-gpt2: make-greater-than's years are tokens
        print(
            build_tiny_gpt2(sys.argv[2] if len(sys.argv) > 2 else "examples/tiny-years-gpt2", extra_tokens=YEAR_TOKENS)
        )
    else:
        print(build_tiny_gpt2(sys.argv[1] if len(sys.argv) > 1 else "examples/tiny-gpt2"))
