"""Attribution patching (AtP; Nanda 2023, Kramar et al. 2024): every cell's effect, estimated.

Patching activation a of the receiving run with the donor's changes the metric by about
(a_donor - a_receiver) . dmetric/da, the gradient taken at the receiving run. So one nnsight
trace runs a batch's clean and corrupted prompts together, the receivers' metric is
back-propagated once (`with metric.backward()`), and each cell's estimate is the receiver's
metric plus that product summed over the cell's values (all of d_model; one head's query, key,
value or output, or its pattern row over the sources) at its position (or at every position,
for `positions="all"`). Two forwards and one backward per batch score every cell, instead of
one forward per cell. The model's parameters are frozen (worker/model.py), so the backward
computes activation gradients only, and `max_batch_tokens` bounds the activations one backward keeps.

First order only: AtP is known to be poor for big activations (the residual stream, GPT-2's
first MLP) and where attention saturates; `--verify-top` measures how poor on the run's pairs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import nnsight
import torch
from nnsight import TransformersModel

from worker.donors import Donors
from worker.metrics import Answers, DonorDistribution, vocabulary_metric
from worker.options import HEAD_COMPONENTS, PatchOptions
from worker.pairs import Pair
from worker.rows import PairRows
from worker.sites import FORWARD_ORDER, Cell, component_output, last_logits, n_layers, site_values


def read_gradients(
    model: TransformersModel, pairs: Sequence[Pair], options: PatchOptions, components: set[str]
) -> tuple[torch.Tensor, dict, dict]:
    """One trace over the clean and corrupted prompts (rows 2p, 2p+1) with a backward of the
    receivers' metric: the metric of every row, and per (component, layer) the values
    (`site_values`) and their gradients."""
    device = model.device
    layout, indices = PairRows.of(options), torch.arange(len(pairs), device=device)
    input_ids = layout.input_ids(pairs).to(device)
    answers = Answers.of([p for p in pairs for _ in range(layout.per_pair)]).to(device)
    donor_rows = layout.of_rows(layout.donor_rows(indices))
    receiver_rows = layout.receiving_rows(indices)
    sites = [
        (component, layer) for layer in range(n_layers(model)) for component in FORWARD_ORDER if component in components
    ]
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    with torch.enable_grad(), model.trace(inputs, logits_to_keep=1):
        acts = nnsight.save({})
        for site in sites:
            acts[site] = component_output(model, *site)
            acts[site].requires_grad_(True)
        logits = last_logits(model)
        donor = DonorDistribution.of(logits[donor_rows].detach()) if options.metric == "kl" else None
        metric = vocabulary_metric(options.metric, logits, answers, donor)
        values = metric.detach().save()
        grads = nnsight.save({})
        if sites:
            with metric[receiver_rows].sum().backward():
                for site in reversed(sites):
                    grads[site] = acts[site].grad
    acts = {site: site_values(model, site[0], act.detach()) for site, act in acts.items()}
    return values.cpu(), acts, {site: site_values(model, site[0], grad) for site, grad in grads.items()}


def first_order_effects(site: tuple[str, int], act: torch.Tensor, grad: torch.Tensor, donors: Donors) -> torch.Tensor:
    """Per pair, (donor - receiver) x the receiver's gradient at `site`, summed over the last axis:
    [P, T], or per head [P, T, heads]; the donor's values are what `donors` give."""
    rows = donors.rows
    pairs = torch.arange(act.shape[0] // rows.per_pair, device=act.device)
    donor = donors.take(site, act, donors.source_rows(pairs), slice(None))
    return ((donor - rows.receiving_side(act)).float() * rows.receiving_side(grad).float()).sum(-1)


def atp_estimates(
    model: TransformersModel,
    pairs: Sequence[Pair],
    cells: Sequence[Cell],
    work: Sequence[tuple[int, int]],
    options: PatchOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and corrupted metric per pair, and the estimated patched metric per `work` item."""
    n_tokens = pairs[0].n_tokens
    donors = Donors.of(options)
    layout = donors.rows
    pairs_per_group = max(1, options.max_batch_tokens // (layout.per_pair * n_tokens))
    components = {cells[c].component for _, c in work}
    baselines, estimates = [], torch.empty(len(work))
    for first in range(0, len(pairs), pairs_per_group):
        group = pairs[first : first + pairs_per_group]
        values, acts, grads = read_gradients(model, group, options, components)
        group_donors = donors.for_pairs(group)
        baselines.append(values)
        receiver = layout.receiving_side(values)
        by_site: dict[tuple[str, int, bool], list[int]] = {}
        for i, (pair, c) in enumerate(work):
            if first <= pair < first + len(group):
                cell = cells[c]
                by_site.setdefault((cell.component, cell.layer, cell.position is None), []).append(i)
        for (component, layer, whole), indices in by_site.items():
            site = (component, layer)
            effect = first_order_effects(site, acts[site], grads[site], group_donors).cpu()
            if whole:
                effect = effect.sum(1, keepdim=True)
            pair_index = torch.tensor([work[i][0] - first for i in indices])
            position = torch.tensor([0 if whole else cells[work[i][1]].position for i in indices])
            picked = effect[pair_index, position]
            if component in HEAD_COMPONENTS:
                picked = picked[torch.arange(len(indices)), torch.tensor([cells[work[i][1]].head for i in indices])]
            estimates[torch.tensor(indices)] = receiver[pair_index] + picked
    metric = torch.cat(baselines)
    return *layout.clean_and_corrupted(metric), estimates


def verified_rows(
    pair_ids: Sequence[str], rows: Sequence[tuple[int, int]], change: torch.Tensor, k: int
) -> set[tuple[int, int]]:
    """Per pair: the `k` rows whose estimated change is largest in size, and `k` more drawn at
    random from the rest (seeded by the pair's id, so a re-run draws the same), so that what
    AtP misses is measured too."""
    by_pair: dict[int, list[int]] = {}
    for i, (pair, _) in enumerate(rows):
        by_pair.setdefault(pair, []).append(i)
    chosen = set()
    for pair, indices in by_pair.items():
        ranked = sorted(indices, key=lambda i: -abs(float(change[i])))
        rest = sorted(ranked[k:])  # in row order, so float noise in the ranking cannot change the draw
        drawn = random.Random(f"verify:{pair_ids[pair]}").sample(rest, min(k, len(rest)))
        chosen.update(rows[i] for i in ranked[:k] + drawn)
    return chosen
