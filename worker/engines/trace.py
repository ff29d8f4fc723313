"""One-pass activation patching with nnsight.

A trace's batch holds, for each pair it touches, a clean row and a corrupted row (the
baselines and the donors), then one row per patched cell. Walking the layers in forward
order, each (component, layer) gets one row-indexed write that copies the donor rows'
activations at each row's position into the receiving rows, so clean, corrupted and every
patched run come out of a single batched forward. Only the last position's logits are
computed, and read out by the run's metric (worker/batch/metrics.py). Cells before a pair's first differing
token are never run: their activations are identical in both prompts, so the score is 0; nor are
cells of the last block that only change a position before the last (`reaches_metric`).
`positions` picks the cells: every position (`each`), all positions in one patch (`all`,
cells with position None), or only the positions whose label is listed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from nnsight import TransformersModel

from worker.batch.donors import Donors
from worker.batch.metrics import Answers, DonorDistribution, vocabulary_metric
from worker.batch.rows import per_batch
from worker.contract.options import (
    PatchOptions,
)
from worker.contract.pairs import Pair
from worker.model.sites import FORWARD_ORDER, Cell, component_output, last_logits, n_layers, site_values


@dataclass(frozen=True)
class Write:
    """Copy `donors[i]`'s activations at `positions[i]` (one position, or all of them) into row
    `rows[i]`, only head `heads[i]`'s values when heads are given."""

    rows: torch.Tensor
    positions: torch.Tensor  # [n, 1] or [n, n_tokens]
    donors: torch.Tensor
    heads: torch.Tensor | None = None

    def to(self, device: torch.device) -> Write:
        heads = None if self.heads is None else self.heads.to(device)
        return Write(self.rows.to(device), self.positions.to(device), self.donors.to(device), heads)


@dataclass(frozen=True)
class TracePlan:
    pair_indices: list[int]
    input_ids: torch.Tensor
    answers: Answers  # per row, its pair's answers
    donor_rows: torch.Tensor  # per row, the row of its pair's donor run
    writes: dict[tuple[str, int], list[Write]]  # (component, layer): one Write per number of positions


OWN_POSITION = ("resid", "attn", "mlp", "head", "q", "pattern")  # what changes its own position's stream alone


def reaches_metric(cell: Cell, n_layers: int, n_tokens: int) -> bool:
    """Whether patching `cell` can change the metric, which reads the last position's logits.

    In the last block, a component of `OWN_POSITION` at position t changes only position t's
    stream (its query, its pattern row, its head and attention output, the MLP and the block
    output there), which no later layer reads: before the last position it cannot reach the
    logits. Keys and values can: the last position's attention reads every position's.
    """
    last_block = cell.layer == n_layers - 1 and cell.component in OWN_POSITION
    return cell.position is None or not last_block or cell.position == n_tokens - 1


def cells_to_run(
    pairs: Sequence[Pair], cells: Sequence[Cell], rows: Sequence[tuple[int, int]], donors: Donors, n_layers: int
) -> list[tuple[int, int]]:
    """The (pair, cell) rows that need a forward pass (or an estimate); the others are the
    receiving run exactly, score 0, in every method that estimates or patches cells.

    Before a pair's first differing token, clean and corrupted activations are identical at
    every layer (attention is causal), so patching there from the pair's other prompt changes
    nothing. An ablation changes every position (`Donors.start`). A cell that cannot reach the
    metric (`reaches_metric`) changes nothing whatever the donor: computed, it would be float
    noise around zero, which ranks like an effect (jobs/results/stability.py).
    """
    starts = [donors.start(pair) for pair in pairs]
    return [
        (p, c)
        for p, c in rows
        if (cells[c].position is None or cells[c].position >= starts[p])
        and reaches_metric(cells[c], n_layers, pairs[p].n_tokens)
    ]


def split_into_traces(work: Sequence[tuple[int, int]], max_rows: int, per_pair: int = 2) -> list[list[tuple[int, int]]]:
    """Cut the pair-major (pair, cell) work list into traces of at most `max_rows` rows.

    Each trace also carries the `per_pair` rows of each pair it touches (its baselines, and
    the prompt it resamples from), counted in the budget.
    """
    max_rows = max(max_rows, per_pair + 1)
    chunks, chunk, rows, last_pair = [], [], 0, None
    for pair, cell in work:
        cost = 1 + (per_pair if pair != last_pair else 0)
        if rows + cost > max_rows:
            chunks.append(chunk)
            chunk, rows, last_pair = [], 0, None
            cost = per_pair + 1
        chunk.append((pair, cell))
        rows += cost
        last_pair = pair
    if chunk:
        chunks.append(chunk)
    return chunks


def plan_trace(
    pairs: Sequence[Pair],
    cells: Sequence[Cell],
    work: Sequence[tuple[int, int]],
    donors: Donors,
    pair_indices: list[int],
) -> TracePlan:
    """Lay out one trace's rows: the pairs of `pair_indices` in the `PairRows` layout, then the patched rows."""
    layout, local = donors.rows, {p: i for i, p in enumerate(pair_indices)}
    ids = layout.input_ids([pairs[p] for p in pair_indices]).tolist()
    answer_rows = [p for p in pair_indices for _ in range(layout.per_pair)]
    donor_rows = layout.of_rows(layout.donor_rows(torch.arange(len(pair_indices)))).tolist()
    by_site: dict[tuple[str, int, bool], list[tuple]] = defaultdict(list)
    for pair, cell_index in work:
        cell = cells[cell_index]
        source, receiver = donors.source_rows(local[pair]), layout.receiving_rows(local[pair])
        positions = list(range(len(ids[receiver]))) if cell.position is None else [cell.position]
        entry = (len(ids), positions, source) + (() if cell.head is None else (cell.head,))
        by_site[(cell.component, cell.layer, cell.position is None)].append(entry)
        ids.append(ids[receiver])
        answer_rows.append(pair)
        donor_rows.append(layout.donor_rows(local[pair]))
    writes: dict[tuple[str, int], list[Write]] = defaultdict(list)
    for (component, layer, _), entries in by_site.items():
        writes[(component, layer)].append(Write(*(torch.tensor(column) for column in zip(*entries))))
    return TracePlan(
        pair_indices=pair_indices,
        input_ids=torch.tensor(ids),
        answers=Answers.of([pairs[p] for p in answer_rows]),
        donor_rows=torch.tensor(donor_rows),
        writes=dict(writes),
    )


def copy_from_donors(model: TransformersModel, site: tuple[str, int], act: torch.Tensor, write: Write, donors: Donors):
    """act[row, positions] = what `donors` give for the donor row at positions, for each row of
    `write` (at `site`); per head, one head's values (through `site_values`' view of `act`)."""
    values, rows, positions = site_values(model, site[0], act), write.rows[:, None], write.positions
    donated = donors.take(site, values, write.donors[:, None], positions, write.heads)
    if write.heads is None:
        values[rows, positions] = donated
    else:
        values[rows, positions, write.heads[:, None]] = donated


def run_trace(model: TransformersModel, plan: TracePlan, metric: str, donors: Donors) -> torch.Tensor:
    """The metric (at the last position) of every row of `plan`."""
    device = model.device
    input_ids = plan.input_ids.to(device)
    writes = {site: [write.to(device) for write in site_writes] for site, site_writes in plan.writes.items()}
    answers, donor_rows = plan.answers.to(device), plan.donor_rows.to(device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    with torch.inference_mode(), model.trace(inputs, logits_to_keep=1):
        for layer in range(n_layers(model)):
            for component in FORWARD_ORDER:
                if (component, layer) in writes:
                    act = component_output(model, component, layer)
                    for write in writes[(component, layer)]:
                        copy_from_donors(model, (component, layer), act, write, donors)
        logits = last_logits(model)
        donor = DonorDistribution.of(logits[donor_rows]) if metric == "kl" else None
        values = vocabulary_metric(metric, logits, answers, donor).save()
    return values.cpu()


def trace_values(
    model: TransformersModel,
    pairs: Sequence[Pair],
    cells: Sequence[Cell],
    work: Sequence[tuple[int, int]],
    options: PatchOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The metric of the clean and corrupted runs per pair, and of the patched run per `work` item,
    by nnsight traces.

    Pairs with no work (every selected cell before the first difference) still need their
    baselines: they get traces of baseline rows only.
    """
    clean = torch.full((len(pairs),), float("nan"))
    corrupted = torch.full((len(pairs),), float("nan"))
    max_rows = per_batch(options, pairs[0].n_tokens)
    donors = Donors.of(options)
    chunks = split_into_traces(work, max_rows, donors.rows.per_pair)
    traces = [(sorted({p for p, _ in chunk}), chunk) for chunk in chunks]
    idle = sorted(set(range(len(pairs))) - {p for p, _ in work})
    step = max(1, max_rows // donors.rows.per_pair)
    traces += [(idle[first : first + step], []) for first in range(0, len(idle), step)]
    values = [torch.empty(0)]
    for pair_indices, chunk in traces:
        plan = plan_trace(pairs, cells, chunk, donors, pair_indices)
        metric = run_trace(model, plan, options.metric, donors.for_pairs([pairs[p] for p in pair_indices]))
        n_base = donors.rows.per_pair * len(pair_indices)
        index = torch.tensor(pair_indices)
        clean[index], corrupted[index] = donors.rows.clean_and_corrupted(metric[:n_base])
        values.append(metric[n_base:])
    return clean, corrupted, torch.cat(values)


def row_values(
    rows: Sequence[tuple[int, int]], receiver: torch.Tensor, work: Sequence[tuple[int, int]], values: torch.Tensor
) -> torch.Tensor:
    """A value per row: the receiving run's own (`receiver`, one per row), except the `work` rows,
    which get `values`."""
    patched = receiver.clone()
    if work:
        row_of = {row: i for i, row in enumerate(rows)}
        patched[torch.tensor([row_of[item] for item in work])] = values
    return patched
