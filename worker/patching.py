"""One-pass activation patching with nnsight.

A trace's batch holds, for each pair it touches, a clean row and a corrupted row (the
baselines and the donors), then one row per patched cell. Walking the layers in forward
order, each (component, layer) gets one row-indexed write that copies the donor rows'
activations at each row's position into the receiving rows, so clean, corrupted and every
patched run come out of a single batched forward. Only the last position's logits are
computed, and read out by the run's metric (worker/metrics.py). Cells before a pair's first differing
token are never run: their activations are identical in both prompts, so the score is 0; nor are
cells of the last block that only change a position before the last (`reaches_metric`).
`positions` picks the cells: every position (`each`), all positions in one patch (`all`,
cells with position None), or only the positions whose label is listed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import torch
from nnsight import TransformersModel

from worker.attribution import Estimates, verified_rows
from worker.donors import Donors
from worker.metrics import Answers, DonorDistribution, vocabulary_metric
from worker.options import (
    DEFAULT_COMPONENTS,
    DEFAULT_DONOR,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_METRIC,
    PatchOptions,
    position_labels,
)
from worker.pairs import Pair
from worker.reuse import resolve_exact_path, reuse_values
from worker.sites import FORWARD_ORDER, Cell, component_output, last_logits, n_layers, site_heads, site_values
from worker.tables import effects_table, empty_effects, pairs_table


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


@dataclass(frozen=True)
class PatchResult:
    effects: pa.Table
    pairs: pa.Table


def patch_cells(
    components: Sequence[str], n_layers: int, n_tokens: int, heads: Mapping[str, int] | None = None, positions="each"
) -> list[Cell]:
    """Every (component, layer[, head], position) of a prompt, in the order results are reported;
    `heads`: how many heads each per-head component has (worker/sites.py::site_heads).

    With `positions="all"` a cell patches every position at once (position None).
    """
    spots = [None] if positions == "all" else range(n_tokens)
    heads = heads or {}
    return [
        Cell(c, layer, position, head)
        for c in components
        for layer in range(n_layers)
        for head in (range(heads[c]) if heads.get(c) else [None])
        for position in spots
    ]


def model_cells(model: TransformersModel, components: Sequence[str], n_tokens: int, positions: str) -> list[Cell]:
    """`patch_cells` of `model`: its layers, and each per-head component's heads."""
    heads = {component: site_heads(model, component) for component in components}
    return patch_cells(components, n_layers(model), n_tokens, heads, positions)


def selected_cells(pairs: Sequence[Pair], cells: Sequence[Cell], labels: Sequence[str] = ()) -> list[tuple[int, int]]:
    """The (pair, cell) rows a result reports, pair-major: every cell, or with `labels` only the
    cells at positions whose label is listed (each pair has its own labelled positions)."""
    if not labels:
        return [(p, c) for p in range(len(pairs)) for c in range(len(cells))]
    rows = []
    for p, pair in enumerate(pairs):
        wanted = {i for i, label in enumerate(pair.labels or ()) if label in labels}
        rows += [(p, c) for c, cell in enumerate(cells) if cell.position in wanted]
    return rows


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


def normalized_score(value: torch.Tensor, clean: torch.Tensor, corrupted: torch.Tensor, direction: str) -> torch.Tensor:
    """0 = the receiving run's own behaviour, 1 = fully moved to the donor's (for `kl`, the
    donor's own value is 0, so this is (KL(donor||receiver) - KL(donor||patched)) / KL(donor||receiver))."""
    if direction == "denoise":
        return (value - corrupted) / (clean - corrupted)
    return (value - clean) / (corrupted - clean)


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
    max_rows = options.max_batch_tokens // pairs[0].n_tokens
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


Estimator = Callable[..., Estimates]  # (model, pairs, cells, work, options): AtP's, AtP*'s


def patch_group(
    model: TransformersModel,
    pairs: Sequence[Pair],
    options: PatchOptions,
    exact_path: str,
    estimate: Estimator | None,
) -> tuple[pa.Table, torch.Tensor, torch.Tensor]:
    """Patch pairs that share one token length; returns their effects and both baselines.

    Without `estimate`: every row's patched metric. With one (AtP's): every row's estimate, and
    the patched metric of the rows `verify_top` picks (null elsewhere).
    """
    n_tokens = pairs[0].n_tokens
    assert all(p.n_tokens == n_tokens for p in pairs), "patch_group needs equal-length pairs"
    cells = model_cells(model, options.components, n_tokens, options.positions)
    rows = selected_cells(pairs, cells, position_labels(options.positions))
    work = cells_to_run(pairs, cells, rows, Donors.of(options), n_layers(model))
    exact_values = reuse_values if exact_path == "reuse" else trace_values
    row_pairs = torch.tensor([p for p, _ in rows], dtype=torch.long)
    estimate_scores, exact_rows, sizes = None, None, None
    if estimate is not None:
        estimates = estimate(model, pairs, cells, work, options)
        clean, corrupted = estimates.clean, estimates.corrupted
    else:
        clean, corrupted, values = exact_values(model, pairs, cells, work, options)
    receiver = (corrupted if options.direction == "denoise" else clean)[row_pairs]
    if estimate is not None:
        estimated = row_values(rows, receiver, work, estimates.patched)
        estimate_scores = normalized_score(estimated, clean[row_pairs], corrupted[row_pairs], options.direction)
        ranking = estimated - receiver
        if estimates.size is not None:
            ranking = row_values(rows, torch.zeros_like(receiver), work, estimates.size)
            sizes = ranking / (clean - corrupted)[row_pairs].abs()
        verified = verified_rows([p.pair_id for p in pairs], rows, ranking, options.verify_top)
        exact_rows = torch.tensor([row in verified for row in rows], dtype=torch.bool)
        work = [item for item in work if item in verified]
        values = exact_values(model, pairs, cells, work, options)[2] if work else torch.empty(0)
    patched = row_values(rows, receiver, work, values)
    scores = normalized_score(patched, clean[row_pairs], corrupted[row_pairs], options.direction)
    row_cells = [cells[c] for _, c in rows]
    unverified = None if exact_rows is None else ~exact_rows.numpy()
    columns = {
        "pair_id": [pairs[p].pair_id for p, _ in rows],
        "component": [c.component for c in row_cells],
        "layer": [c.layer for c in row_cells],
        "position": [c.position for c in row_cells],
        "head": [c.head for c in row_cells],
        options.metric: pa.array(patched.numpy(), pa.float32(), mask=unverified),
        "score": pa.array(scores.numpy(), pa.float32(), mask=unverified),
        "estimate": pa.array(
            estimate_scores.numpy() if estimate_scores is not None else [None] * len(rows), pa.float32()
        ),
        "graddrop": pa.array(sizes.numpy() if sizes is not None else [None] * len(rows), pa.float32()),
    }
    return effects_table(columns, options), clean, corrupted


def patch_batch(
    model: TransformersModel,
    pairs: Sequence[Pair],
    components: Sequence[str] = DEFAULT_COMPONENTS,
    direction: str = "denoise",
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    positions: str = "each",
    metric: str = DEFAULT_METRIC,
    method: str = "exact",
    verify_top: int = 0,
    donor: str = DEFAULT_DONOR,
    exact_path: str = "auto",
    means: str | None = None,
) -> PatchResult:
    """Patch every (component, layer[, head], position) of every pair; the `effects` and `pairs` tables.

    `positions`: `each` position, `all` positions in one patch, or only the positions whose
    label is listed (`"S2,END"`); a pair without a listed label gets no rows. `metric`: what
    is read at the last position (worker/metrics.py); it names the value column.
    `method="exact"` patches every cell; `"atp"` estimates every cell by attribution patching
    (worker/attribution.py) and exact-patches `verify_top` of them per pair (and as many at random).
    Pairs of different token lengths are patched in separate equal-length groups, so
    padding never shifts a position. `max_batch_tokens` bounds rows x tokens per forward,
    which bounds activation memory for long prompts and deep models. Exact patching runs on
    `exact_path="trace"`, every patch inside one nnsight trace per batch, or `"reuse"`, which
    reads the clean and corrupted activations with nnsight and recomputes only what a patch
    changes (worker/reuse.py); `"auto"` takes `reuse`.
    """
    from worker.methods import run_method  # the registry of methods imports this module

    options = PatchOptions(
        tuple(components), positions, direction, metric, max_batch_tokens, method, verify_top, donor=donor, means=means
    )
    return PatchResult(*run_method(model, pairs, options, exact_path=exact_path))


def effects_batch(
    model: TransformersModel,
    pairs: Sequence[Pair],
    options: PatchOptions,
    estimate: Estimator | None,
    exact_path: str = "auto",
) -> tuple[pa.Table, pa.Table]:
    """The effects and pairs tables of `pairs` (see `patch_batch`); `estimate`: how the method
    estimates before it patches exactly, or None to patch every cell (worker/methods.py)."""
    exact_path = resolve_exact_path(exact_path)
    run_group = partial(patch_group, model, options=options, exact_path=exact_path, estimate=estimate)
    parts, pairs_rows = per_length(pairs, options, run_group)
    return pa.concat_tables(parts) if parts else empty_effects(options), pairs_rows


def per_length(
    pairs: Sequence[Pair],
    options: PatchOptions,
    run_group: Callable[[list[Pair]], tuple[pa.Table, torch.Tensor, torch.Tensor]],
) -> tuple[list[pa.Table], pa.Table]:
    """`run_group` on each group of pairs of one token length (so padding never shifts a position):
    the groups' result tables, and the pairs table with each pair's clean and corrupted baselines."""
    groups: dict[int, list[int]] = defaultdict(list)
    for index, pair in enumerate(pairs):
        groups[pair.n_tokens].append(index)
    parts, clean_values, corrupted_values = [], [0.0] * len(pairs), [0.0] * len(pairs)
    for indices in groups.values():
        table, clean, corrupted = run_group([pairs[i] for i in indices])
        parts.append(table)
        for i, c, k in zip(indices, clean.tolist(), corrupted.tolist()):
            clean_values[i], corrupted_values[i] = c, k
    return parts, pairs_table(pairs, clean_values, corrupted_values, options)
