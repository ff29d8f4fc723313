"""Where a patch's values come from: the donor, a value every method is handed.

- `pair` (the default): the pair's other prompt, read in the same batch (the donor side of the
  `PairRows` layout): activation patching as the rest of patchsweep defines it.
- `resample`: the donor-side prompt of another pair of the same length (`Pair.donor_ids`, chosen
  by the driver), read as a third row of the pair (resample ablation).
- `zero`: zeros in place of the activation: zero ablation.
- `mean`, `mean-all`: the mean donor-side activation over the run's pairs, per position key or
  over every position (worker/batch/mean_donors.py; computed by a first pass, stored in OUT).

Every method writes `Donors.take(...)` where it used to copy the donor row: the exact paths
(trace and reuse), path patching's senders, and the (donor - receiving) differences of AtP, EAP,
edge patching and edge sets (`Donors.difference`). Scores keep each pair's own baselines,
`(value - receiving) / (pair's donor side - receiving)`, so for an ablation 1 still means "as
far as the pair's other prompt moves it". Before a pair's first differing token its own other
prompt changes nothing, so those cells need no forward (`Donors.start`); zeros and means change
every position, a resampled prompt every position from the first token where it differs from the
receiving one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from worker.batch.mean_donors import DonorMeans, load_means
from worker.batch.rows import PairRows, resampled_from
from worker.contract.options import MEAN_DONORS, PatchOptions
from worker.contract.pairs import Pair, first_difference


@dataclass(frozen=True)
class Donors:
    kind: str  # one of worker/contract/options.py DONORS
    rows: PairRows  # the read's layout, whose donor side `pair` takes
    means: DonorMeans | None = None  # mean donors: the stored means
    keys: torch.Tensor | None = None  # and, for the pairs of one read, each position's row of them

    @classmethod
    def of(cls, options: PatchOptions) -> Donors:
        rows = PairRows.of(options)
        if options.donor not in MEAN_DONORS:
            return cls(options.donor, rows)
        if options.means is None:
            raise ValueError(
                f"--donor {options.donor} needs its means: the first pass computes them (worker/batch/mean_donors.py)"
            )
        return cls(options.donor, rows, load_means(options.means))

    def for_pairs(self, pairs: Sequence[Pair]) -> Donors:
        """These donors for a read of `pairs` (in the `rows` layout): mean donors look up each
        position's mean row; the others need nothing more."""
        return self if self.means is None else replace(self, keys=self.means.key_index(pairs, self.kind))

    def start(self, pair: Pair) -> int:
        """The first position where a patch can change the receiving run: where the donor prompt
        first differs from the receiving one (the pair's first differing token for its own other
        prompt), the first token for zeros and means."""
        if self.kind == "pair":
            return pair.first_difference
        if self.kind == "resample":
            receiving = self.rows.receiving_of(pair.clean_ids, pair.corrupted_ids)
            return first_difference(receiving, resampled_from(pair))
        return 0

    def source_rows(self, pairs: torch.Tensor | int) -> torch.Tensor | int:
        """The rows of the read that patches of pairs `pairs` take their values from."""
        return self.rows.resampled_rows(pairs) if self.kind == "resample" else self.rows.donor_rows(pairs)

    def take(
        self,
        site: tuple[str, int],
        acts: torch.Tensor,
        rows: torch.Tensor,
        positions,
        heads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What a patch writes at `positions` (an index into the second axis) for each donor row
        `rows` of `site` (component, layer), whose values in the read (rows in the `PairRows`
        layout; worker/model/sites.py::site_values) are `acts`; with `heads`, only head `heads[i]`'s for
        the i-th row ([rows, positions, values per head])."""
        if self.means is not None:
            table = self.means.on(acts.device, acts.dtype)[site]
            keys = self.keys.to(acts.device)[rows // self.rows.per_pair, positions]
            values = table[keys].view(*keys.shape, *acts.shape[2:])
        else:
            values = acts[rows, positions]
            values = torch.zeros_like(values) if self.kind == "zero" else values
        return one_head_each(values, heads)

    def difference(
        self,
        site: tuple[str, int],
        acts: torch.Tensor,
        pairs: torch.Tensor,
        positions,
        heads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What a patch of `site` at `positions` changes in the receiving run of each of `pairs`
        (pair indices in the read, whose values of `site` are `acts`): what `take` writes there
        minus the receiving run's own values; with `heads`, head `heads[i]`'s for the i-th pair."""
        receiving = one_head_each(acts[self.rows.receiving_rows(pairs), positions], heads)
        return self.take(site, acts, self.source_rows(pairs), positions, heads) - receiving


def one_head_each(values: torch.Tensor, heads: torch.Tensor | None) -> torch.Tensor:
    """Of per-row values [rows, positions, heads, values per head], head `heads[i]`'s of the i-th
    row ([rows, positions, values per head]); without `heads`, all of them."""
    return values if heads is None else values[torch.arange(len(heads), device=values.device), :, heads]
