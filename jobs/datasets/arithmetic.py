"""Arithmetic pairs in the spirit of MIB's arithmetic tasks (`driver.py make-arithmetic`), offline.

"Q: How much is 12 plus 7? A:" answered "19". As MIB's `random_counterfactual`, the corrupted
prompt is another problem of the same operation (a new first operand), whose result is the
incorrect answer; both results are one token, as MIB's filter keeps them, and both prompts of one
token length. Operands and results are the numbers that are one token for the tokenizer (MIB's
template is not public in its code; this one is stated here, not copied). The tokenizer's BOS
goes first where it does not add one itself, as in `make-mib`. Each pair says its task as MIB
names it (`arithmetic-addition`, `arithmetic-subtraction`).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from jobs.datasets.mib import bos_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATE = "Q: How much is {a} {word} {b}? A:"
OPERATIONS = {"add": ("plus", lambda a, b: a + b), "sub": ("minus", lambda a, b: a - b)}
TASKS = {"add": "arithmetic-addition", "sub": "arithmetic-subtraction"}  # MIB's names, each pair's `task`
MIN_NUMBERS = 5


def one_token_numbers(tokenizer: PreTrainedTokenizerBase, limit: int = 1000) -> list[int]:
    return [k for k in range(limit) if len(tokenizer(str(k), add_special_tokens=False).input_ids) == 1]


def problems(numbers: list[int], op: str) -> list[tuple[int, int, int]]:
    """Every (a, b, result) of one-token numbers whose result is one too (and not negative)."""
    known, apply = set(numbers), OPERATIONS[op][1]
    return [(a, b, apply(a, b)) for a in numbers for b in numbers if apply(a, b) in known]


def generate_arithmetic(n: int, seed: int, tokenizer: PreTrainedTokenizerBase, op: str) -> list[dict]:
    """`n` pairs, deterministic for a seed; a ValueError (one line) where too few numbers are one token."""
    numbers = one_token_numbers(tokenizer)
    if len(numbers) < MIN_NUMBERS:
        raise ValueError(
            f"only {len(numbers)} numbers below 1000 are one token for this tokenizer; arithmetic needs {MIN_NUMBERS}"
        )
    rng, word, bos = random.Random(seed), OPERATIONS[op][0], bos_text(tokenizer)
    found = problems(numbers, op)
    by_b: dict[int, list[tuple[int, int, int]]] = {}
    for problem in found:
        by_b.setdefault(problem[1], []).append(problem)
    records = []
    for _ in range(100 * n):  # draws; some are not kept
        if len(records) == n:
            break
        a, b, result = rng.choice(found)
        others = [p for p in by_b[b] if p[2] != result]
        if not others:
            continue
        other_a, _, other_result = rng.choice(others)
        clean, corrupted = (bos + TEMPLATE.format(a=x, word=word, b=b) for x in (a, other_a))
        if len(tokenizer(clean).input_ids) != len(tokenizer(corrupted).input_ids):
            continue
        records.append(
            {"id": f"{op}-{len(records)}", "clean": clean, "corrupted": corrupted,
             "correct": str(result), "incorrect": str(other_result), "a": a, "b": b, "task": TASKS[op]}
        )  # fmt: skip
    if len(records) < n:
        raise ValueError(
            f"only {len(records)} of {n} pairs drawn in {100 * n} tries: too few prompts fit this tokenizer"
        )
    return records
