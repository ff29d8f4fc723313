"""One-pass activation patching with nnsight.

A trace's batch holds, for each pair it touches, a clean row and a corrupted row (the
baselines and the donors), then one row per patched cell. Walking the layers in forward
order, each (component, layer) gets one row-indexed write that copies the donor rows'
activations at each row's position into the receiving rows, so clean, corrupted and every
patched run come out of a single batched forward. Only the last position's logits are
computed, and only the two answer columns are read. Cells before a pair's first differing
token are never run: their activations are identical in both prompts, so the score is 0.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch
from nnsight import TransformersModel

from worker.options import DEFAULT_COMPONENTS, DEFAULT_MAX_BATCH_TOKENS, check_options
from worker.pairs import Pair
from worker.reuse import resolve_method, reuse_logit_diffs
from worker.sites import FORWARD_ORDER, Cell, component_output, head_channels, head_dim, n_heads, traced_logit_diff
from worker.tables import effects_table, empty_effects, pairs_table


@dataclass(frozen=True)
class Write:
    """Copy `donors[i]`'s activation at `positions[i]` into row `rows[i]` (only head `heads[i]`'s channels)."""
    rows: torch.Tensor
    positions: torch.Tensor
    donors: torch.Tensor
    heads: torch.Tensor | None = None

    def to(self, device: torch.device) -> Write:
        heads = None if self.heads is None else self.heads.to(device)
        return Write(self.rows.to(device), self.positions.to(device), self.donors.to(device), heads)


@dataclass(frozen=True)
class TracePlan:
    pair_indices: list[int]
    input_ids: torch.Tensor
    correct_ids: torch.Tensor
    incorrect_ids: torch.Tensor
    writes: dict[tuple[str, int], Write]


@dataclass(frozen=True)
class PatchResult:
    effects: pa.Table
    pairs: pa.Table


def patch_cells(components: Sequence[str], n_layers: int, n_tokens: int, heads: int = 0) -> list[Cell]:
    """Every (component, layer[, head], position) of a prompt, in the order results are reported."""
    return [
        Cell(c, layer, position, head)
        for c in components for layer in range(n_layers)
        for head in (range(heads) if c == "head" else [None]) for position in range(n_tokens)
    ]


def first_difference(pair: Pair) -> int:
    """The first position where clean and corrupted differ (the last one if they never do)."""
    differing = (i for i, (a, b) in enumerate(zip(pair.clean_ids, pair.corrupted_ids)) if a != b)
    return next(differing, pair.n_tokens - 1)


def cells_to_run(pairs: Sequence[Pair], cells: Sequence[Cell]) -> list[tuple[int, int]]:
    """The (pair, cell) work that needs a forward pass, pair-major.

    Before a pair's first differing token, clean and corrupted activations are identical at
    every layer (attention is causal), so patching there changes nothing: the patched run is
    the receiving run and the score is exactly 0, with no forward pass needed.
    """
    work = []
    for pair_index, pair in enumerate(pairs):
        start = first_difference(pair)
        work += [(pair_index, c) for c, cell in enumerate(cells) if cell.position >= start]
    return work


def split_into_traces(work: Sequence[tuple[int, int]], max_rows: int) -> list[list[tuple[int, int]]]:
    """Cut the pair-major (pair, cell) work list into traces of at most `max_rows` rows.

    Each trace also carries two baseline rows per pair it touches, counted in the budget.
    """
    max_rows = max(max_rows, 3)
    chunks, chunk, rows, last_pair = [], [], 0, None
    for pair, cell in work:
        cost = 1 + (2 if pair != last_pair else 0)
        if rows + cost > max_rows:
            chunks.append(chunk)
            chunk, rows, last_pair = [], 0, None
            cost = 3
        chunk.append((pair, cell))
        rows += cost
        last_pair = pair
    if chunk:
        chunks.append(chunk)
    return chunks


def plan_trace(
    pairs: Sequence[Pair], cells: Sequence[Cell], work: Sequence[tuple[int, int]], direction: str
) -> TracePlan:
    """Lay out one trace's rows: [clean, corrupted] per touched pair, then the patched rows."""
    pair_indices = sorted({pair for pair, _ in work})
    clean_row = {p: 2 * i for i, p in enumerate(pair_indices)}
    ids, answer_rows = [], []
    for p in pair_indices:
        ids += [pairs[p].clean_ids, pairs[p].corrupted_ids]
        answer_rows += [p, p]
    by_site: dict[tuple[str, int], list[tuple[int, ...]]] = defaultdict(list)
    for pair, cell_index in work:
        cell = cells[cell_index]
        donor = clean_row[pair] + (0 if direction == "denoise" else 1)
        receiver = pairs[pair].corrupted_ids if direction == "denoise" else pairs[pair].clean_ids
        entry = (len(ids), cell.position, donor) + (() if cell.head is None else (cell.head,))
        by_site[(cell.component, cell.layer)].append(entry)
        ids.append(receiver)
        answer_rows.append(pair)
    writes = {
        site: Write(*(torch.tensor(column) for column in zip(*entries)))
        for site, entries in by_site.items()
    }
    return TracePlan(
        pair_indices=pair_indices,
        input_ids=torch.tensor(ids),
        correct_ids=torch.tensor([pairs[p].correct_id for p in answer_rows]),
        incorrect_ids=torch.tensor([pairs[p].incorrect_id for p in answer_rows]),
        writes=writes,
    )


def run_trace(model: TransformersModel, plan: TracePlan) -> torch.Tensor:
    """Logit difference (correct minus incorrect, last position) of every row of `plan`."""
    device = model.device
    input_ids = plan.input_ids.to(device)
    writes = {site: write.to(device) for site, write in plan.writes.items()}
    dim = head_dim(model)
    answers = torch.stack([plan.correct_ids, plan.incorrect_ids], dim=1).to(device)
    n_layers = len(model.transformer.h)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    with torch.inference_mode(), model.trace(inputs, logits_to_keep=1):
        for layer in range(n_layers):
            for component in FORWARD_ORDER:
                write = writes.get((component, layer))
                if write is None:
                    continue
                act = component_output(model, component, layer)
                if write.heads is None:
                    act[write.rows, write.positions] = act[write.donors, write.positions]
                else:
                    channels, positions = head_channels(write.heads, dim), write.positions[:, None]
                    act[write.rows[:, None], positions, channels] = act[write.donors[:, None], positions, channels]
        logit_diff = traced_logit_diff(model, answers).save()
    return logit_diff.cpu()


def normalized_score(logit_diff: torch.Tensor, clean: torch.Tensor, corrupted: torch.Tensor,
                     direction: str) -> torch.Tensor:
    """0 = the receiving run's own behaviour, 1 = fully moved to the donor's."""
    if direction == "denoise":
        return (logit_diff - corrupted) / (clean - corrupted)
    return (logit_diff - clean) / (corrupted - clean)


def trace_logit_diffs(
    model: TransformersModel,
    pairs: Sequence[Pair],
    cells: Sequence[Cell],
    work: Sequence[tuple[int, int]],
    direction: str,
    max_batch_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and corrupted logit diffs per pair, and the patched one per `work` item, by nnsight traces."""
    clean = torch.full((len(pairs),), float("nan"))
    corrupted = torch.full((len(pairs),), float("nan"))
    values = []
    for chunk in split_into_traces(work, max_batch_tokens // pairs[0].n_tokens):
        plan = plan_trace(pairs, cells, chunk, direction)
        logit_diff = run_trace(model, plan)
        n_base = 2 * len(plan.pair_indices)
        index = torch.tensor(plan.pair_indices)
        clean[index] = logit_diff[0:n_base:2]
        corrupted[index] = logit_diff[1:n_base:2]
        values.append(logit_diff[n_base:])
    return clean, corrupted, torch.cat(values)


def patch_group(
    model: TransformersModel,
    pairs: Sequence[Pair],
    components: Sequence[str],
    direction: str,
    max_batch_tokens: int,
    method: str,
) -> tuple[dict[str, list], torch.Tensor, torch.Tensor]:
    """Patch pairs that share one token length; returns effect columns and both baselines."""
    n_tokens = pairs[0].n_tokens
    assert all(p.n_tokens == n_tokens for p in pairs), "patch_group needs equal-length pairs"
    cells = patch_cells(components, len(model.transformer.h), n_tokens, n_heads(model))
    work = cells_to_run(pairs, cells)
    compute = reuse_logit_diffs if method == "reuse" else trace_logit_diffs
    clean, corrupted, values = compute(model, pairs, cells, work, direction, max_batch_tokens)
    receiver = corrupted if direction == "denoise" else clean
    patched = receiver[:, None].repeat(1, len(cells))
    pair_idx, cell_idx = (torch.tensor(column) for column in zip(*work))
    patched[pair_idx, cell_idx] = values
    scores = normalized_score(patched, clean[:, None], corrupted[:, None], direction)
    columns = {
        "pair_id": [p.pair_id for p in pairs for _ in cells],
        "component": [c.component for _ in pairs for c in cells],
        "layer": [c.layer for _ in pairs for c in cells],
        "position": [c.position for _ in pairs for c in cells],
        "head": [c.head for _ in pairs for c in cells],
        "logit_diff": patched.flatten().numpy(),
        "score": scores.flatten().numpy(),
    }
    return columns, clean, corrupted


def patch_batch(
    model: TransformersModel,
    pairs: Sequence[Pair],
    components: Sequence[str] = DEFAULT_COMPONENTS,
    direction: str = "denoise",
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    method: str = "auto",
) -> PatchResult:
    """Patch every (component, layer[, head], position) of every pair; the `effects` and `pairs` tables.

    Pairs of different token lengths are patched in separate equal-length groups, so
    padding never shifts a position. `max_batch_tokens` bounds rows x tokens per forward,
    which bounds activation memory for long prompts and deep models. `method="trace"` runs
    every patch inside one nnsight trace per batch; `"reuse"` reads the clean and corrupted
    activations with nnsight and recomputes only what a patch changes (worker/reuse.py);
    `"auto"` takes `reuse` where the model supports it.
    """
    check_options(components, direction)
    method = resolve_method(model, method)
    groups: dict[int, list[int]] = defaultdict(list)
    for index, pair in enumerate(pairs):
        groups[pair.n_tokens].append(index)
    effect_parts, clean_ld, corrupted_ld = [], [0.0] * len(pairs), [0.0] * len(pairs)
    for indices in groups.values():
        group = [pairs[i] for i in indices]
        columns, clean, corrupted = patch_group(model, group, components, direction, max_batch_tokens, method)
        effect_parts.append(effects_table(columns, direction))
        for i, c, k in zip(indices, clean.tolist(), corrupted.tolist()):
            clean_ld[i], corrupted_ld[i] = c, k
    effects = pa.concat_tables(effect_parts) if effect_parts else empty_effects(direction)
    return PatchResult(effects, pairs_table(pairs, clean_ld, corrupted_ld, direction))
