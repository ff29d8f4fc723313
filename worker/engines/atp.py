"""Attribution patching (AtP; Nanda 2023, Kramar et al. 2024): every cell's effect, estimated.

Patching activation a of the receiving run with the donor's changes the metric by about
(a_donor - a_receiver) . dmetric/da, the gradient taken at the receiving run. So one nnsight
trace runs a batch's clean and corrupted prompts together, keeping its autograd graph; the
receivers' metric is back-propagated once (plain `torch.autograd.grad` on the saved values), and
each cell's estimate is the receiver's metric plus that product summed over the cell's values
(all of d_model; one head's query, key, value or output, or its pattern row over the sources) at
its position (or at every position, for `positions="all"`). Two forwards and one backward per
batch score every cell, instead of one forward per cell. The model's parameters are frozen
(worker/model/load.py), so the backward computes activation gradients only, and `max_batch_tokens`
bounds the activations one backward keeps.

First order only: AtP is known to be poor for big activations (the residual stream, GPT-2's
first MLP) and where attention saturates; `--verify-top` measures how poor on the run's pairs,
and AtP* (worker/engines/atpstar.py) mends the two misses its paper names on the same read.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from functools import partial

import torch
from nnsight import TransformersModel

from worker.batch.donors import Donors
from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair
from worker.kernels.attribution import Key, estimate_cells, first_order_effects, read_graph, summed
from worker.model.sites import (
    site_values,
)

"""(model, pairs of one read, their donors, options, keys) -> every row's metric, and per key the
estimated change of the metric [P, T or 1(, heads)] and its size for ranking (or None)."""


def atp_changes(
    model: TransformersModel, pairs: Sequence[Pair], donors: Donors, options: PatchOptions, keys: Collection[Key]
) -> tuple[torch.Tensor, dict[Key, tuple[torch.Tensor, None]]]:
    """AtP: one backward, each site's first-order effect."""
    sites = sorted({(component, layer) for component, layer, _ in keys}, key=lambda s: s[1])
    read = read_graph(model, pairs, options, sites)
    grads = dict(zip(sites, read.gradients([read.acts[site] for site in sites])))
    changes = {}
    for component, layer, whole in keys:
        site = (component, layer)
        act, grad = (site_values(model, component, tensor.detach()) for tensor in (read.acts[site], grads[site]))
        changes[(component, layer, whole)] = (summed(first_order_effects(site, act, grad, donors), whole), None)
    return read.metric.detach(), changes


atp_estimates = partial(estimate_cells, changes=atp_changes)
