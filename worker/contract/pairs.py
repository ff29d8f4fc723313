"""A validated, tokenized clean/corrupted pair: what the driver hands to an actor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pair:
    pair_id: str
    clean: str
    corrupted: str
    correct: tuple[str, ...]  # the answer set: one answer or several, each one token
    incorrect: tuple[str, ...]  # empty where the metric needs none
    clean_ids: tuple[int, ...]
    corrupted_ids: tuple[int, ...]
    correct_ids: tuple[int, ...]
    incorrect_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    labels: tuple[str, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    donor_pair_id: str | None = None  # --donor resample: the pair whose donor-side prompt this one patches from
    donor_ids: tuple[int, ...] | None = None  # and that prompt's token ids

    @property
    def n_tokens(self) -> int:
        return len(self.clean_ids)

    @property
    def first_difference(self) -> int:
        """The first position where clean and corrupted differ (the last one if they never do)."""
        return first_difference(self.clean_ids, self.corrupted_ids)


def first_difference(ids: Sequence[int], other: Sequence[int]) -> int:
    """The first position where two prompts of one length differ (the last one if they never do)."""
    return next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), len(ids) - 1)
