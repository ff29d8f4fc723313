"""MIB's circuit-track datasets as pair files (`driver.py make-mib`).

MIB's rows (as the hub stores them: JSON lines or Parquet) become pairs as its `HFEAPDataset`
makes them (MIB-circuit-track's `dataset.py`): the clean prompt is the row's `prompt`, the
corrupted one its counterfactual's (`--counterfactual`; by default IOI's
`s2_io_flip_counterfactual`, MCQA's and ARC's `symbol_counterfactual`, arithmetic's
`random_counterfactual`), both as they are; the answers
- IOI: " " + the indirect object (correct) and " " + the subject, from the row's `metadata`;
- MCQA, ARC: the correct choice's label as it is (no space), and the counterfactual's own
  correct label;
- arithmetic: str(label) and str(counterfactual label), each one token; only rows of the
  task's operator (`+`, `-`).
MIB's filters drop rows first, in file order, then `--n` keeps the first (MIB takes the first N
that survive; no shuffle): IOI's three names (indirect object, subject, `random_c`) of one token
length, MCQA's and ARC's two labels of one token length, arithmetic's answers of one token.
patchsweep adds what it needs and MIB assumes: clean and corrupted of one token length, answers
of one token (MIB reads an answer's first token), and, as TransformerLens' `prepend_bos` does for
MIB, the tokenizer's BOS before each prompt where the tokenizer does not put one itself. Every
dropped row is counted by reason. Each pair says its task (MIB's name); an IOI pair carries
`make-ioi`'s role labels, found by the row's two names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from jobs.datasets.ioi import role_labels
from jobs.pairfile import BadPair, decoded_lines
from jobs.tokens import decoded_pieces

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

COUNTERFACTUALS = {  # MIB's default counterfactual per task
    "ioi": "s2_io_flip_counterfactual",
    "mcqa": "symbol_counterfactual",
    "arc-easy": "symbol_counterfactual",
    "arc-challenge": "symbol_counterfactual",
    "arithmetic-addition": "random_counterfactual",
    "arithmetic-subtraction": "random_counterfactual",
}
OPERATORS = {"arithmetic-addition": "+", "arithmetic-subtraction": "-"}


class Dropped(ValueError):
    """A row MIB (or patchsweep) leaves out; the message is the reason counted."""


def field(row: Any, *path: str) -> Any:
    """row[path[0]][path[1]]...; a missing one is the schema error MIB would meet."""
    value = row
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"not MIB's schema: no field {'.'.join(path)!r}")
        value = value[key]
    return value


def ioi_answers(row: dict, counterfactual: dict, tokens: Callable[[str], int]) -> tuple[str, str]:
    names = [" " + str(field(row, "metadata", key)) for key in ("indirect_object", "subject", "random_c")]
    if len({tokens(name) for name in names}) > 1:
        raise Dropped("IOI names of unequal token lengths (MIB's filter)")
    return names[0], names[1]


def choice_answers(row: dict, counterfactual: dict, tokens: Callable[[str], int]) -> tuple[str, str]:
    correct = str(field(row, "choices", "label")[field(row, "answerKey")])
    incorrect = str(field(counterfactual, "choices", "label")[field(counterfactual, "answerKey")])
    if tokens(correct) != tokens(incorrect):
        raise Dropped("answer labels of unequal token lengths (MIB's filter)")
    return correct, incorrect


def arithmetic_answers(row: dict, counterfactual: dict, tokens: Callable[[str], int]) -> tuple[str, str]:
    correct, incorrect = str(field(row, "label")), str(field(counterfactual, "label"))
    if tokens(correct) != 1 or tokens(incorrect) != 1:
        raise Dropped("an answer of more than one token (MIB's filter)")
    return correct, incorrect


def ioi_labels(row: dict, clean: str, tokenizer: PreTrainedTokenizerBase) -> list[str] | None:
    """`make-ioi`'s role labels (S1, IO, S1+1, S2, END, ...) of the clean prompt's tokens, each name
    found with or without its space (a prompt may start with one); None where the two names are
    not three of its tokens."""
    pieces = [piece.strip() for piece in decoded_pieces(tokenizer, tokenizer(clean).input_ids)]
    io, s = (str(field(row, "metadata", key)) for key in ("indirect_object", "subject"))
    if sum(piece in (io, s) for piece in pieces) != 3:
        return None
    return role_labels(pieces, io, s)


ANSWERS = {
    "ioi": ioi_answers,
    "mcqa": choice_answers,
    "arc-easy": choice_answers,
    "arc-challenge": choice_answers,
    "arithmetic-addition": arithmetic_answers,
    "arithmetic-subtraction": arithmetic_answers,
}


def mib_pair(
    row: Any, task: str, counterfactual: str, tokenizer: PreTrainedTokenizerBase, bos: str, index: int
) -> dict:
    """The pair file record of one MIB row; `Dropped` for a row MIB or patchsweep leaves out,
    KeyError for a row that is not MIB's schema."""

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    if task in OPERATORS and field(row, "operator") != OPERATORS[task]:
        raise Dropped(f"another operator than {OPERATORS[task]!r} (MIB's filter)")
    other = field(row, counterfactual)
    if other is None or other.get("prompt") is None:
        raise Dropped("no counterfactual prompt (MIB's filter)")
    correct, incorrect = ANSWERS[task](row, other, tokens)
    clean, corrupted = bos + str(field(row, "prompt")), bos + str(field(other, "prompt"))
    if tokens(correct) != 1 or tokens(incorrect) != 1:
        raise Dropped("an answer of more than one token (patchsweep patches one-token answers)")
    if tokens(clean) != tokens(corrupted):
        raise Dropped("clean and corrupted prompts of unequal token lengths")
    labels = ioi_labels(row, clean, tokenizer) if task == "ioi" else None
    return {
        "id": str(row.get("idx", index)),
        "clean": clean,
        "corrupted": corrupted,
        "correct": correct,
        "incorrect": incorrect,
        **({"labels": labels} if labels else {}),
        "task": task,
    }


def bos_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """What to put before each prompt so it starts with the BOS token, as TransformerLens'
    `prepend_bos` makes MIB's: nothing where the tokenizer adds one itself (or has none)."""
    bos = tokenizer.bos_token
    if bos is None or tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]:
        return ""
    return bos


def mib_pairs(
    path: str, task: str, tokenizer: PreTrainedTokenizerBase, counterfactual: str | None = None, n: int | None = None
) -> tuple[list[dict], Counter]:
    """The pair records of the MIB rows at `path` (the first `n` kept) and the dropped rows by reason.
    A row that is not MIB's schema is a ValueError naming its file and line."""
    counterfactual = counterfactual or COUNTERFACTUALS[task]
    bos, records, dropped = bos_text(tokenizer), [], Counter()
    rows: Iterator = decoded_lines(path)
    for line, _, row in rows:
        if n is not None and len(records) == n:
            break
        if isinstance(row, BadPair):
            raise ValueError(f"{path}:{line}: {row}")
        try:
            records.append(mib_pair(row, task, counterfactual, tokenizer, bos, line - 1))
        except Dropped as reason:
            dropped[str(reason)] += 1
        except (KeyError, IndexError, TypeError) as error:
            message = error.args[0] if isinstance(error, KeyError) else f"not MIB's schema ({error})"
            raise ValueError(f"{path}:{line}: {message}") from None
    return records, dropped
