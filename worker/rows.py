"""The row layout every method's batch starts with: each pair's clean prompt, then its corrupted
prompt (rows 2p and 2p + 1 of a batch of pairs).

The direction decides which of a pair's two rows is the pair's donor side and which the
receiving run (denoise: clean into corrupted; noise: corrupted into clean). Methods ask this
layout for rows and sides, never the arithmetic, so "the pair's other row" is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.pairs import Pair


@dataclass(frozen=True)
class PairRows:
    direction: str

    @property
    def donor_offset(self) -> int:
        """Which of a pair's two rows is its donor side: 0 (clean) when denoising, 1 (corrupted) when noising."""
        return 0 if self.direction == "denoise" else 1

    @property
    def receiving_offset(self) -> int:
        return 1 - self.donor_offset

    @staticmethod
    def input_ids(pairs: Sequence[Pair]) -> torch.Tensor:
        """[2 * pairs, tokens]: each pair's clean then corrupted token ids (pairs of one length)."""
        return torch.tensor([ids for pair in pairs for ids in (pair.clean_ids, pair.corrupted_ids)])

    def donor_rows(self, pairs: torch.Tensor | int) -> torch.Tensor | int:
        """The row of each pair's donor side, for pair indices `pairs` (a tensor, or one index)."""
        return 2 * pairs + self.donor_offset

    def receiving_rows(self, pairs: torch.Tensor | int) -> torch.Tensor | int:
        """The row of each pair's receiving run, for pair indices `pairs` (a tensor, or one index)."""
        return 2 * pairs + self.receiving_offset

    def donor_side(self, values: torch.Tensor) -> torch.Tensor:
        """Of per-row `values` (rows first), those of each pair's donor side, in pair order."""
        return values[self.donor_offset :: 2]

    def receiving_side(self, values: torch.Tensor) -> torch.Tensor:
        """Of per-row `values` (rows first), those of each pair's receiving run, in pair order."""
        return values[self.receiving_offset :: 2]

    @staticmethod
    def clean_and_corrupted(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row `values` split into each pair's clean and corrupted value."""
        return values[0::2], values[1::2]
