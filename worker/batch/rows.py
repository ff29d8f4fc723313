"""The row layout every method's batch starts with: each pair's clean prompt, then its corrupted
prompt, then (when resampling) the donor-side prompt of the pair it resamples from.

The direction decides which of a pair's own two rows is its donor side and which the receiving
run (denoise: clean into corrupted; noise: corrupted into clean). Methods ask this layout for
rows and sides, never the arithmetic, so "the pair's other row" is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair

Side = TypeVar("Side")  # what a pair has one of per prompt: its token ids, a baseline


def per_batch(options: PatchOptions, tokens: int, rows_per_item: int = 1, budget_scale: int = 1) -> int:
    """How many items (a pair's `rows_per_item` rows, or one row) of `tokens` positions one forward
    takes, so that its rows x positions stay within `max_batch_tokens` (times `budget_scale`, where
    a row costs other than one row): at least one, so a prompt longer than the budget still runs."""
    return max(1, options.max_batch_tokens * budget_scale // (rows_per_item * tokens))


def resampled_from(pair: Pair) -> tuple[int, ...]:
    """The token ids of the prompt `pair` resamples from (set by the driver, or by hand)."""
    if pair.donor_ids is None:
        raise ValueError(f"pair {pair.pair_id!r} has no donor prompt to resample from")
    return pair.donor_ids


@dataclass(frozen=True)
class PairRows:
    direction: str
    resampled: bool = False  # a third row per pair: the donor-side prompt of another pair (`Pair.donor_ids`)

    @classmethod
    def of(cls, options: PatchOptions) -> PairRows:
        """The layout a run with `options` reads its pairs in."""
        return cls(options.direction, resampled=options.donor == "resample")

    @property
    def per_pair(self) -> int:
        return 3 if self.resampled else 2

    @property
    def donor_offset(self) -> int:
        """Which of a pair's own two rows is its donor side: 0 (clean) when denoising, 1 (corrupted) when noising."""
        return 0 if self.direction == "denoise" else 1

    @property
    def receiving_offset(self) -> int:
        return 1 - self.donor_offset

    def donor_of(self, clean: Side, corrupted: Side) -> Side:
        """Of `clean` and `corrupted` (a pair's prompts, or the baselines of every pair), the donor side's."""
        return (clean, corrupted)[self.donor_offset]

    def receiving_of(self, clean: Side, corrupted: Side) -> Side:
        """Of `clean` and `corrupted` (a pair's prompts, or the baselines of every pair), the receiving run's."""
        return (clean, corrupted)[self.receiving_offset]

    def input_ids(self, pairs: Sequence[Pair]) -> torch.Tensor:
        """[per_pair * pairs, tokens]: each pair's rows (pairs of one length)."""
        rows = []
        for pair in pairs:
            rows += [pair.clean_ids, pair.corrupted_ids]
            if self.resampled:
                rows.append(resampled_from(pair))
        return torch.tensor(rows)

    def of_rows(self, pairs: torch.Tensor) -> torch.Tensor:
        """For the pair indices `pairs`, each repeated once per row of the pair: per row, its pair."""
        return pairs.repeat_interleave(self.per_pair)

    def donor_rows(self, pairs: torch.Tensor | int) -> torch.Tensor | int:
        """The row of each pair's own donor side, for pair indices `pairs` (a tensor, or one index)."""
        return self.per_pair * pairs + self.donor_offset

    def receiving_rows(self, pairs: torch.Tensor | int) -> torch.Tensor | int:
        """The row of each pair's receiving run, for pair indices `pairs` (a tensor, or one index)."""
        return self.per_pair * pairs + self.receiving_offset

    def resampled_rows(self, pairs: torch.Tensor | int) -> torch.Tensor | int:
        """The row of the prompt each pair resamples from (a resampled layout only)."""
        return self.per_pair * pairs + 2

    def receiving_side(self, values: torch.Tensor) -> torch.Tensor:
        """Of per-row `values` (rows first), those of each pair's receiving run, in pair order."""
        return values[self.receiving_offset :: self.per_pair]

    def clean_and_corrupted(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row `values` split into each pair's clean and corrupted value."""
        return values[0 :: self.per_pair], values[1 :: self.per_pair]
