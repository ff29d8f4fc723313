"""AtP* (Kramar, Lieberum, Shah, Nanda 2024, arXiv 2403.00745): attribution patching with the
two fixes its paper gives for AtP's false negatives, on AtP's one read (worker/engines/atp.py).

Equation numbers below are the paper's, as the unofficial koayon/atp_star cites them (the
paper's body was not at hand; docs/DESIGN.md says what was chosen where it is silent).

QK fix (the paper's section 3.1.1, equations 7 to 10). A query or key moves the attention probabilities through a
softmax that may be saturated, where its gradient says little about a large move. So for `q` and
`k` cells the probabilities are recomputed exactly, and only what follows them is linearised:
estimate = sum over the changed rows of (patched - own probabilities) . gradient at the
probabilities. A query at t changes row t alone. A key at s changes every row t >= s that sees it,
each renormalised: with scores l, the row with key s's score replaced by l' is
p'_s' = exp(l_s') / Z' (s' != s), p'_s = exp(l') / Z', Z' = sum_{s' != s} exp(l_s') + exp(l');
computed for every (t, s) at once from the receiving run's scores and those with every key
patched (a score depends on its own key only), in log space with leave-one-out sums built from
prefix and suffix sums, so a saturated row keeps its precision. On grouped-query models a key
head's estimate sums over the query heads that read it. The scores come from three runs of
the layer's attention on the receiving rows: own, donor queries, donor keys (worker/model/attention.py's
`scores` site). `head`, `attn` and the
other cells keep AtP's estimate: the paper applies the fix to queries and keys themselves only.

GradDrop (section 3.1.2, equation 11). A node's direct and indirect effects can cancel in the gradient. For
each layer l, AtP is repeated with layer l's residual contribution cut from the backward pass
(its block output = input + (output - input).detach()), and the paper's score is
c(n) = 1/(L-1) sum_l |I_l(n)|. For a node inside block l the cut gives 0, and for a node above
l it changes nothing, so only the cuts above a node need a backward, and each is a partial one:
from block l's input down, the gradient at its output passed straight through. Here the sum
runs over the L-1 blocks other than the node's own (for nodes inside a block this is the paper's
formula; a `resid` cell, block l's output, is not a node of the paper and takes the same rule).
The signed `estimate` stays the QK-fixed AtP estimate; GradDrop's unsigned score is the `size`
that ranks cells for `--verify-top` (and the `graddrop` column). With one layer, no cut is left:
the size is |estimate's change|.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from nnsight import TransformersModel

from worker.batch.donors import Donors
from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair
from worker.kernels.attribution import GraphRead, Key, donor_difference, estimate_cells, read_graph, summed
from worker.kernels.suffix import suffix_arguments, writing
from worker.model.attention import reading_patterns
from worker.model.families import part
from worker.model.sites import blocks, family, kv_groups, n_layers, site_values

QK = ("q", "k")


def attention_scores(
    model: TransformersModel, layer: int, normed: torch.Tensor, component: str | None = None, donated=None
) -> torch.Tensor:
    """[rows, heads, T, T], float32: layer `layer`'s attention scores (mask added) on the normed
    stream `normed`, every head's `component` (q or k) taking `donated` [rows, T, heads, dim]."""
    attention = part(blocks(model)[layer], family(model).attention)
    seen = {}
    with ExitStack() as stack:
        stack.enter_context(attention.scores.register_forward_hook(lambda m, a, out: seen.setdefault("scores", out)))
        if component is not None:
            stack.enter_context(writing(model, blocks(model)[layer], component, donated))
        attention(hidden_states=normed, **suffix_arguments(model, 0, normed)[layer])
    return seen["scores"].float()


def exclusive_logcumsumexp(scores: torch.Tensor) -> torch.Tensor:
    """Along the last axis, the log of the sum of exp(scores) strictly before each entry (-inf at 0)."""
    shifted = F.pad(scores[..., :-1], (1, 0), value=float("-inf"))
    return torch.logcumsumexp(shifted, dim=-1)


def exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    """Along the last axis, the sum of the entries strictly before each (no subtraction, so a
    dominant entry does not swamp the others)."""
    return F.pad(values[..., :-1], (1, 0)).cumsum(-1)


def single_key_weights(scores: torch.Tensor, patched: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row t and key s, the probabilities of row t with key s's score `scores[t, s]`
    replaced by `patched[t, s]`, as two weights [..., T, T(key s)]: every other key's probability
    is keep[t, s] x its own, key s's is new[t, s]. In log space, the normalizer's leave-one-out
    sum from prefix and suffix sums, so a key holding nearly all of a row loses no precision."""
    before = exclusive_logcumsumexp(scores)
    after = exclusive_logcumsumexp(scores.flip(-1)).flip(-1)
    normalizer = torch.logaddexp(torch.logaddexp(before, after), patched)
    return (scores.logsumexp(-1, keepdim=True) - normalizer).exp(), (patched - normalizer).exp()


def single_key_effects(own: torch.Tensor, keep: torch.Tensor, new: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per row t and key s: (probabilities of row t with key s patched - `own`) . `grad`, summed
    over the sources; the other keys' part from prefix and suffix sums, not total minus own."""
    weighted = own * grad
    others = exclusive_cumsum(weighted) + exclusive_cumsum(weighted.flip(-1)).flip(-1)
    return keep * others + new * grad - weighted.sum(-1, keepdim=True)


@dataclass(frozen=True)
class QKFix:
    """One layer's exact attention changes for the receiving rows, gradient-free: the own
    probabilities, per query the change of its row, every key patched at once, and per (row t,
    key s) the weights of the row with key s alone patched: p' = keep * p off s, new at s."""

    own: torch.Tensor  # [P, heads, T, T]
    query_rows: torch.Tensor | None  # softmax(scores with the donor's queries) - own
    all_keys: torch.Tensor | None  # softmax(scores with every key the donor's) - own
    keep: torch.Tensor | None  # [P, heads, T, T(key s)]: exp(logsumexp_t - log Z'_ts)
    new: torch.Tensor | None  # exp(l'_ts - log Z'_ts)
    groups: int

    @classmethod
    def of(cls, model: TransformersModel, layer: int, read: GraphRead, donors: Donors, wanted: Collection[str]):
        rows = donors.rows
        normed = rows.receiving_side(read.attention_inputs[layer].detach()).contiguous()
        pairs = torch.arange(normed.shape[0], device=normed.device)

        def donated(component: str) -> torch.Tensor:
            values = site_values(model, component, read.acts[(component, layer)].detach())
            return donors.take((component, layer), values, donors.source_rows(pairs), slice(None))

        with torch.no_grad():
            scores = attention_scores(model, layer, normed)
            own = scores.softmax(-1)
            query_rows = all_keys = keep = new = None
            if "q" in wanted:
                query_rows = attention_scores(model, layer, normed, "q", donated("q")).softmax(-1) - own
            if "k" in wanted:
                patched = attention_scores(model, layer, normed, "k", donated("k"))
                all_keys = patched.softmax(-1) - own
                keep, new = single_key_weights(scores, patched)
        return cls(own, query_rows, all_keys, keep, new, kv_groups(model))

    def effect(self, component: str, whole: bool, grad: torch.Tensor) -> torch.Tensor:
        """The change of the metric, [P, T or 1, heads (key/value heads for k)], of patching
        `component` (q or k) of each head at each position (or at every one, `whole`), given the
        gradient at the probabilities."""
        grad = grad.float()
        if component == "q":
            return summed((self.query_rows * grad).sum(-1).transpose(1, 2), whole)
        if whole:
            per_head = (self.all_keys * grad).sum((-1, -2))[:, None]  # [P, 1, heads]
        else:
            rows = single_key_effects(self.own, self.keep, self.new, grad)
            per_head = rows.sum(2).transpose(1, 2)  # over the rows t: [P, T(key s), heads]
        return per_head.unflatten(-1, (-1, self.groups)).sum(-1)  # per key/value head


def atpstar_changes(
    model: TransformersModel, pairs: Sequence[Pair], donors: Donors, options: PatchOptions, keys: Collection[Key]
) -> tuple[torch.Tensor, dict[Key, tuple[torch.Tensor, torch.Tensor]]]:
    """Per key, the QK-fixed AtP change and GradDrop's size (see the module's docstring)."""
    layers = n_layers(model)
    sites = {(component, layer) for component, layer, _ in keys}
    qk_layers: dict[int, set[str]] = {}
    for component, layer in sites:
        if component in QK:
            qk_layers.setdefault(layer, set()).add(component)
    order = sorted(sites | {("pattern", layer) for layer in qk_layers}, key=lambda site: site[1])
    with reading_patterns(model, bool(qk_layers)):
        read = read_graph(model, pairs, options, order, stream=True, attention_layers=qk_layers)
        fixes = {layer: QKFix.of(model, layer, read, donors, wanted) for layer, wanted in qk_layers.items()}

    differences = {  # donor minus receiving values: the same under every cut, taken once
        site: donor_difference(site, site_values(model, site[0], read.acts[site].detach()), donors)
        for site in sites
        if site[0] not in QK
    }

    def change(key: Key, grads: dict[tuple[str, int], torch.Tensor]) -> torch.Tensor:
        component, layer, whole = key
        if component in QK:
            return fixes[layer].effect(component, whole, donors.rows.receiving_side(grads[("pattern", layer)]))
        grad = donors.rows.receiving_side(site_values(model, component, grads[key[:2]])).float()
        return summed((differences[key[:2]] * grad).sum(-1), whole)

    graded = [site for site in order if site[0] not in QK]  # the QK fix reads the pattern's gradient only
    grads = read.gradients([read.acts[site] for site in graded] + read.stream)
    at_outputs = grads[len(graded) :]  # at each block's output: what a cut passes straight through
    changes = {key: change(key, dict(zip(graded, grads))) for key in keys}
    if layers == 1:  # no cut: the size is |change|
        return read.metric.detach(), {key: (value, value.abs()) for key, value in changes.items()}
    sizes = {key: key[1] * value.abs() for key, value in changes.items()}  # the cuts below a node change nothing
    for cut in range(1, layers):  # block `cut`'s residual contribution left out of the backward
        below = [site for site in graded if site[1] < cut]
        if not below:
            continue
        cut_grads = read.gradients([read.acts[site] for site in below], of=read.stream[cut - 1], given=at_outputs[cut])
        for key in keys:
            if key[1] < cut:
                sizes[key] = sizes[key] + change(key, dict(zip(below, cut_grads))).abs()
    return read.metric.detach(), {key: (changes[key], sizes[key] / (layers - 1)) for key in keys}


atpstar_estimates = partial(estimate_cells, changes=atpstar_changes)
