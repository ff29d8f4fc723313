"""Multiple-choice colour questions in the spirit of MIB's MCQA task (copycolors), offline
(`driver.py make-mcqa`).

"Question: Bananas are yellow. What color are bananas?" with four lettered choices, then
"Answer:"; the answer is the right choice's letter, without a space, as MIB tokenizes it. As
MIB's `symbol_counterfactual`, the corrupted prompt is the same question with other symbols for
the choices (W, X, Y, Z), and its own right symbol is the incorrect answer: the model must read
the symbol from the list. The tokenizer's BOS goes first where it does not add one itself, as in
`make-mib`. Each pair says its task (`mcqa`).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from jobs.datasets.mib import bos_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

THINGS = [
    ("bananas", "yellow"), ("lemons", "yellow"), ("grass leaves", "green"), ("limes", "green"),
    ("snowflakes", "white"), ("clouds", "white"), ("crows", "black"), ("coals", "black"),
    ("tomatoes", "red"), ("cherries", "red"), ("blueberries", "blue"), ("oranges", "orange"),
    ("carrots", "orange"), ("plums", "purple"), ("grapes", "purple"), ("flamingos", "pink"),
]  # fmt: skip
COLORS = sorted({color for _, color in THINGS})
SYMBOLS = ("ABCD", "WXYZ")  # the clean prompt's choice labels, the counterfactual's


def prompt(thing: str, color: str, choices: list[str], symbols: str) -> str:
    lines = "\n".join(f"{symbol}. {choice}" for symbol, choice in zip(symbols, choices))
    return f"Question: {thing.capitalize()} are {color}. What color are {thing}?\n{lines}\nAnswer:"


def generate_mcqa(n: int, seed: int, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """`n` pairs, deterministic for a seed; a ValueError (one line) where a choice symbol is not one token."""
    for symbol in "".join(SYMBOLS):
        if len(tokenizer(symbol, add_special_tokens=False).input_ids) != 1:
            raise ValueError(f"the choice symbol {symbol!r} is not one token for this tokenizer; MCQA needs each to be")
    rng, bos, records = random.Random(seed), bos_text(tokenizer), []
    for _ in range(100 * n):  # draws; some are not kept
        if len(records) == n:
            break
        thing, color = rng.choice(THINGS)
        choices = [color, *rng.sample([c for c in COLORS if c != color], 3)]
        rng.shuffle(choices)
        answer = choices.index(color)
        clean, corrupted = (bos + prompt(thing, color, choices, symbols) for symbols in SYMBOLS)
        if len(tokenizer(clean).input_ids) != len(tokenizer(corrupted).input_ids):
            continue
        records.append(
            {"id": f"mcqa-{len(records)}", "clean": clean, "corrupted": corrupted,
             "correct": SYMBOLS[0][answer], "incorrect": SYMBOLS[1][answer], "thing": thing, "color": color,
             "task": "mcqa"}
        )  # fmt: skip
    if len(records) < n:
        raise ValueError(
            f"only {len(records)} of {n} pairs drawn in {100 * n} tries: too few prompts fit this tokenizer"
        )
    return records
