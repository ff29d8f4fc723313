"""What AtP and AtP* share (a kernel, not an engine): the gradient read of a group of pairs
(`read_graph`), donor minus receiving, and `estimate_cells`, which turns an engine's per-group
changes into cell estimates."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import nnsight
import torch
from nnsight import TransformersModel

from worker.batch.donors import Donors
from worker.batch.group_read import group_share
from worker.batch.metrics import Answers, DonorDistribution, vocabulary_metric
from worker.batch.rows import PairRows, per_batch
from worker.contract.options import HEAD_COMPONENTS, PatchOptions
from worker.contract.pairs import Pair
from worker.model.families import part
from worker.model.sites import (
    FORWARD_ORDER,
    Cell,
    component_output,
    family,
    last_logits,
    n_layers,
    projection,
)

Key = tuple[str, int, bool]  # (component, layer, every position at once)


@dataclass(frozen=True)
class Estimates:
    """What an estimating method gives `patch_group`: each pair's clean and corrupted metric, and
    per work item the estimated patched metric and, where the method ranks by something else
    than |estimated change| (AtP*'s GradDrop), how big it judges the effect (`size`)."""

    clean: torch.Tensor
    corrupted: torch.Tensor
    patched: torch.Tensor
    size: torch.Tensor | None = None


@dataclass(frozen=True)
class GraphRead:
    """One forward of a group's rows (the `PairRows` layout) whose autograd graph is kept: every
    row's metric, the receivers' metric summed (what is back-propagated), and per (component,
    layer) the raw activation (`site_values` views it), each a point gradients can be taken at.
    On request, each block's output (`stream`) and the normed stream each listed layer's
    attention reads (`attention_inputs`)."""

    metric: torch.Tensor
    objective: torch.Tensor
    acts: dict[tuple[str, int], torch.Tensor]
    stream: list[torch.Tensor]
    attention_inputs: dict[int, torch.Tensor]

    def gradients(
        self, at: Sequence[torch.Tensor], of: torch.Tensor | None = None, given: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The gradient of the objective (or of `of`, whose own gradient is `given`) at each of `at`:
        zeros where it does not depend on one. The graph is kept for the next call."""
        wanted = [i for i, x in enumerate(at) if x.requires_grad]
        grads = [torch.zeros_like(x) for x in at]
        found = torch.autograd.grad(
            self.objective if of is None else of, [at[i] for i in wanted], given, retain_graph=True, allow_unused=True
        )
        for i, grad in zip(wanted, found):
            grads[i] = grads[i] if grad is None else grad
        return grads


def read_graph(
    model: TransformersModel,
    pairs: Sequence[Pair],
    options: PatchOptions,
    sites: Collection[tuple[str, int]],
    stream: bool = False,
    attention_layers: Collection[int] = (),
) -> GraphRead:
    """One trace over the clean and corrupted prompts (and resampled ones) of `pairs`, with
    gradients enabled from each of `sites` on (the parameters are frozen)."""
    device = model.device
    layout, indices = PairRows.of(options), torch.arange(len(pairs), device=device)
    input_ids = layout.input_ids(pairs).to(device)
    answers = Answers.of([p for p in pairs for _ in range(layout.per_pair)]).to(device)
    donor_rows = layout.of_rows(layout.donor_rows(indices))
    receiver_rows = layout.receiving_rows(indices)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    with torch.enable_grad(), model.trace(inputs, logits_to_keep=1):
        acts, outputs, normed = nnsight.save({}), nnsight.save([]), nnsight.save({})
        for layer in range(n_layers(model)):
            block = part(model, family(model).blocks)[layer]
            if layer in attention_layers:
                normed[layer] = projection(model, block, "q").input
            for component in FORWARD_ORDER:
                if (component, layer) in sites:
                    acts[(component, layer)] = component_output(model, component, layer)
                    acts[(component, layer)].requires_grad_(True)
            if stream:
                outputs.append(component_output(model, "resid", layer))
        logits = last_logits(model)
        donor = DonorDistribution.of(logits[donor_rows].detach()) if options.metric == "kl" else None
        metric = nnsight.save(vocabulary_metric(options.metric, logits, answers, donor))
    return GraphRead(metric, metric[receiver_rows].sum(), dict(acts), list(outputs), dict(normed))


def donor_difference(site: tuple[str, int], act: torch.Tensor, donors: Donors) -> torch.Tensor:
    """Per pair, what a patch of `site` changes in the receiving run's values `act` (all rows of
    the read, `site_values`): donor minus receiver, in float32; the donor's values are what
    `donors` give."""
    pairs = torch.arange(act.shape[0] // donors.rows.per_pair, device=act.device)
    return donors.difference(site, act, pairs, slice(None)).float()


def first_order_effects(site: tuple[str, int], act: torch.Tensor, grad: torch.Tensor, donors: Donors) -> torch.Tensor:
    """Per pair, (donor - receiver) x the receiver's gradient at `site`, summed over the last axis:
    [P, T], or per head [P, T, heads]."""
    return (donor_difference(site, act, donors) * donors.rows.receiving_side(grad).float()).sum(-1)


def summed(effect: torch.Tensor, whole: bool) -> torch.Tensor:
    """Per-position effects [P, T(, heads)], or for a patch of every position their sum [P, 1(, heads)]."""
    return effect.sum(1, keepdim=True) if whole else effect


GroupChanges = Callable[..., tuple[torch.Tensor, dict[Key, tuple[torch.Tensor, torch.Tensor | None]]]]


def estimate_cells(
    model: TransformersModel,
    pairs: Sequence[Pair],
    cells: Sequence[Cell],
    work: Sequence[tuple[int, int]],
    options: PatchOptions,
    changes: GroupChanges,
) -> Estimates:
    """Clean and corrupted metric per pair, and the estimated patched metric per `work` item (with
    its size where `changes` gives one), read in groups of pairs that fit `max_batch_tokens`."""
    n_tokens = pairs[0].n_tokens
    donors = Donors.of(options)
    layout = donors.rows
    pairs_per_group = per_batch(options, n_tokens, layout.per_pair)
    baselines, estimates, sizes = [], torch.empty(len(work)), torch.empty(len(work))
    ranked = False
    for first in range(0, len(pairs), pairs_per_group):
        group = pairs[first : first + pairs_per_group]
        by_key: dict[Key, list[int]] = {}
        for i in group_share(work, first, len(group)):
            cell = cells[work[i][1]]
            by_key.setdefault((cell.component, cell.layer, cell.position is None), []).append(i)
        values, group_changes = changes(model, group, donors.for_pairs(group), options, by_key.keys())
        values = values.cpu()
        baselines.append(values)
        receiver = layout.receiving_side(values)
        for key, indices in by_key.items():
            pair_index = torch.tensor([work[i][0] - first for i in indices])
            position = torch.tensor([0 if key[2] else cells[work[i][1]].position for i in indices])
            heads = torch.tensor([cells[work[i][1]].head or 0 for i in indices]) if key[0] in HEAD_COMPONENTS else None
            change, size = group_changes[key]
            estimates[torch.tensor(indices)] = receiver[pair_index] + at_cells(change, pair_index, position, heads)
            if size is not None:
                sizes[torch.tensor(indices)], ranked = at_cells(size, pair_index, position, heads), True
    metric = torch.cat(baselines)
    return Estimates(*layout.clean_and_corrupted(metric), estimates, sizes if ranked else None)


def at_cells(
    values: torch.Tensor, pairs: torch.Tensor, positions: torch.Tensor, heads: torch.Tensor | None
) -> torch.Tensor:
    """Of per-pair values [P, T(, heads)], those at each cell's (pair, position(, head))."""
    values = values.cpu()[pairs, positions]
    return values if heads is None else values[torch.arange(len(heads)), heads]
