"""Greater-than pair generator (Hanna, Liu and Variengien 2023, "How does GPT-2 compute greater-than?").

"The war lasted from the year 1732 to the year 17": a model that has learned the task puts its
probability on two-digit years above 32. Each pair's answer sets are the years above YY
(`correct`) and the years at or below it (`incorrect`), every one a single token; the corrupted
prompt starts in 1701, as in the paper, so no year is ruled out. Read it with `--metric
prob_diff` (the paper's metric) or `logit_diff` (mean logits of the two sets). Only years that
are one token for the tokenizer, and that the tokenizer splits off the century inside "17YY",
are used; labels mark the century (`XX1`), the year (`YY`) and the last token (`END`).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NOUNS = [
    "war",
    "dynasty",
    "conflict",
    "expedition",
    "siege",
    "reign",
    "campaign",
    "voyage",
    "rebellion",
    "treaty",
    "drought",
    "plague",
    "journey",
    "occupation",
    "famine",
    "trial",
    "festival",
    "project",
]
TEMPLATE = "The {noun} lasted from the year {century}{year} to the year {century}"
CENTURY = "17"
CORRUPTED_YEAR = "01"
MIN_YEARS = 10
SEGMENTS = ("start", "noun", "lasted", "XX1", "YY", "middle", "END")


def segment_starts(noun: str, year: str) -> list[int]:
    """Where each of SEGMENTS begins in the prompt's text (character offsets)."""
    text = TEMPLATE.format(noun=noun, century=CENTURY, year=year)
    noun_at = text.index(noun)
    century_at = text.index(CENTURY + year)
    return [
        0,
        noun_at,
        noun_at + len(noun),
        century_at,
        century_at + len(CENTURY),
        century_at + len(CENTURY) + len(year),
        len(text) - len(CENTURY),
    ]


def labelled_tokens(tokenizer: PreTrainedTokenizerBase, noun: str, year: str) -> tuple[list[int], list[str]]:
    """The prompt's token ids, and each token's segment (by the segment its last character is in)."""
    text = TEMPLATE.format(noun=noun, century=CENTURY, year=year)
    encoded = tokenizer(text, return_offsets_mapping=True)
    starts = segment_starts(noun, year)
    labels = [SEGMENTS[sum(start <= end - 1 for start in starts) - 1] for _, end in encoded.offset_mapping]
    return encoded.input_ids, labels


def year_is_one_token(tokenizer: PreTrainedTokenizerBase, year: str) -> bool:
    """`year` is a single token on its own and inside the prompt, split off from the century."""
    if len(tokenizer(year, add_special_tokens=False).input_ids) != 1:
        return False
    ids, labels = labelled_tokens(tokenizer, NOUNS[0], year)
    at_year = [i for i, label in enumerate(labels) if label == "YY"]
    return len(at_year) == 1 and tokenizer.decode([ids[at_year[0]]]) == year and labels[-1] == "END"


def one_token_years(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    return [year for year in (f"{y:02d}" for y in range(100)) if year_is_one_token(tokenizer, year)]


def make_pair(rng: random.Random, tokenizer: PreTrainedTokenizerBase, years: list[str], pair_id: str) -> dict:
    """A pair with a start year YY drawn from the years that leave both answer sets non-empty."""
    year = rng.choice([y for y in years if years[0] < y < years[-1] and y != CORRUPTED_YEAR])
    noun = rng.choice(NOUNS)
    _, labels = labelled_tokens(tokenizer, noun, year)
    return {
        "id": pair_id,
        "clean": TEMPLATE.format(noun=noun, century=CENTURY, year=year),
        "corrupted": TEMPLATE.format(noun=noun, century=CENTURY, year=CORRUPTED_YEAR),
        "correct": [y for y in years if y > year],
        "incorrect": [y for y in years if y <= year],
        "labels": labels,
        "year": int(year),
        "noun": noun,
    }


def generate_greater_than(n: int, seed: int, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """`n` pairs, deterministic for a seed; a ValueError (one line) where the tokenizer has too
    few one-token years for the task."""
    years = one_token_years(tokenizer)
    if CORRUPTED_YEAR not in years or len(years) < MIN_YEARS:
        raise ValueError(
            f"only {len(years)} of the 100 two-digit years are one token for this tokenizer (and split off "
            f"from '{CENTURY}' in '{CENTURY}YY'){'' if CORRUPTED_YEAR in years else f', and not {CORRUPTED_YEAR!r}'}"
            f"; greater-than needs {CORRUPTED_YEAR!r} and at least {MIN_YEARS}"
        )
    rng = random.Random(seed)
    return [make_pair(rng, tokenizer, years, f"gt-{i}") for i in range(n)]
