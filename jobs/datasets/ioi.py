"""IOI pair generator (Wang et al. 2022, "Interpretability in the Wild").

The 15 BABA templates and their ABBA twins, filled with places, objects and names that are
single tokens (with a leading space) for the given tokenizer. Every pair carries role labels
(S1, IO, S1+1, S2, END and a segment label for the other tokens) so pairs from different
templates line up by role in an aggregated heatmap, and its task (`ioi`, as MIB names it:
`driver.py mib-export` and `mib-scores` read it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jobs.tokens import decoded_pieces

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BABA_TEMPLATES = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
]
PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"]
OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"]
NAMES = [
    "Michael",
    "Christopher",
    "Jessica",
    "Matthew",
    "Ashley",
    "Jennifer",
    "Joshua",
    "Amanda",
    "Daniel",
    "David",
    "James",
    "Robert",
    "John",
    "Joseph",
    "Andrew",
    "Ryan",
    "Brandon",
    "Jason",
    "Justin",
    "Sarah",
    "William",
    "Mary",
    "Lisa",
    "Katie",
    "Paul",
    "Mark",
    "George",
    "Kevin",
    "Emily",
    "Rachel",
    "Laura",
    "Anna",
    "Thomas",
    "Steven",
    "Eric",
    "Adam",
    "Alice",
    "Alex",
    "Charles",
    "Peter",
    "Kate",
    "Tom",
    "Sam",
    "Amy",
    "Jack",
    "Ben",
    "Emma",
    "Lucy",
]
CORRUPTIONS = ("swap", "abc")


@dataclass(frozen=True)
class Template:
    index: int
    order: str  # "BABA" (subject first) or "ABBA" (indirect object first)
    text: str


def templates() -> list[Template]:
    """Each BABA template and its ABBA twin (first-clause names swapped)."""
    found = []
    for index, baba in enumerate(BABA_TEMPLATES):
        abba = baba.replace("[B] and [A]", "[A] and [B]", 1)
        found += [Template(index, "BABA", baba), Template(index, "ABBA", abba)]
    return found


def single_token_names(tokenizer: PreTrainedTokenizerBase, names: list[str] = NAMES) -> list[str]:
    """Names that are exactly one token with a leading space; the others cannot be answers."""
    return [name for name in names if len(tokenizer(" " + name, add_special_tokens=False).input_ids) == 1]


def fill(template: str, a: str, b: str, s2: str, place: str, obj: str) -> str:
    """Fill a template; [B] appears twice, and its second occurrence (S2) takes `s2`."""
    first_b = template.index("[B]")
    second_b = template.index("[B]", first_b + 3)
    text = template[:second_b] + s2 + template[second_b + 3 :]
    return text.replace("[A]", a).replace("[B]", b).replace("[PLACE]", place).replace("[OBJECT]", obj)


def role_labels(tokens: list[str], io: str, s: str) -> list[str]:
    """S1, IO, S1+1, S2, END by position; every other token by the segment it sits in."""
    names = [i for i, token in enumerate(tokens) if token in (io, s)]
    first, second, s2 = names
    s1 = first if tokens[first] == s else second
    segment = ["start"] * first + ["IO" if tokens[first] == io else "S1"]
    segment += ["and"] * (second - first - 1) + ["IO" if tokens[second] == io else "S1"]
    segment += ["middle"] * (s2 - second - 1) + ["S2"] + ["action"] * (len(tokens) - s2 - 2) + ["END"]
    segment[s1 + 1] = "S1+1"
    return segment


def make_pair(
    rng: random.Random,
    template: Template,
    names: list[str],
    corruption: str,
    tokenizer: PreTrainedTokenizerBase,
    pair_id: str,
) -> dict:
    io, s, *others = rng.sample(names, 5)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    clean = fill(template.text, a=io, b=s, s2=s, place=place, obj=obj)
    if corruption == "swap":
        corrupted = fill(template.text, a=io, b=s, s2=io, place=place, obj=obj)
    else:
        x, y, z = others[:3]
        corrupted = fill(template.text, a=x, b=y, s2=z, place=place, obj=obj)
    decoded = decoded_pieces(tokenizer, tokenizer(clean).input_ids)
    return {
        "id": pair_id,
        "clean": clean,
        "corrupted": corrupted,
        "correct": " " + io,
        "incorrect": " " + s,
        "labels": role_labels(decoded, " " + io, " " + s),
        "template": template.index,
        "order": template.order,
        "corruption": corruption,
        "task": "ioi",
    }


def generate_ioi(
    n: int,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    corruption: str = "swap",
    template_indices: list[int] | None = None,
) -> list[dict]:
    """`n` pairs, deterministic for a seed, cycling through the chosen templates in both orders."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    names = single_token_names(tokenizer)
    if len(names) < 5:
        raise ValueError(f"only {len(names)} of the IOI names are single tokens for this tokenizer; need 5")
    chosen = [t for t in templates() if template_indices is None or t.index in template_indices]
    rng = random.Random(seed)
    return [make_pair(rng, chosen[i % len(chosen)], names, corruption, tokenizer, f"ioi-{i}") for i in range(n)]
