"""An independent activation-patching reference: plain PyTorch forward hooks, one forward per cell.

Deliberately naive and free of nnsight, so that it can check the worker's numbers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch
from transformers import PreTrainedModel

PARTS = {  # family: blocks, attention, its output projection, MLP -- written here, not taken from the worker
    "gpt2": ("transformer.h", "attn", "attn.c_proj", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "attention.dense", "mlp"),
    "llama": ("model.layers", "self_attn", "self_attn.o_proj", "mlp"),
    "mistral": ("model.layers", "self_attn", "self_attn.o_proj", "mlp"),
    "qwen2": ("model.layers", "self_attn", "self_attn.o_proj", "mlp"),
    "gemma2": ("model.layers", "self_attn", "self_attn.o_proj", "mlp"),
    "gemma3_text": ("model.layers", "self_attn", "self_attn.o_proj", "mlp"),
}
POST_NORMS = {  # family: the norms attention's and the MLP's outputs pass through before the stream
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
}


def dig(root, path: str):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def hooked_module(model, component: str, layer: int) -> torch.nn.Module:
    """Whose output is patched (`attn`, `mlp`: what the sublayer adds to the stream, after its
    post-norm where the family has one); for `head`, whose input (the heads' outputs side by side)."""
    blocks, attention, out_proj, mlp = PARTS[model.config.model_type]
    attention, mlp = POST_NORMS.get(model.config.model_type, (attention, mlp))
    block = dig(model, blocks)[layer]
    return {"resid": block, "attn": dig(block, attention), "mlp": dig(block, mlp), "head": dig(block, out_proj)}[
        component
    ]


def width_of(config) -> int:
    """Channels per head: the config's head_dim where it sets one (Gemma's heads x head_dim is not the width)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def hidden(output):
    return output[0] if isinstance(output, tuple) else output


def next_token_logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].double()


def metric_of(metric: str, logits: torch.Tensor, pair, donor_logits: torch.Tensor) -> torch.Tensor:
    """The metric of one run's last-position logits, written out term by term (differentiable)."""
    probs = torch.softmax(logits, dim=0)
    if metric == "logit_diff":
        correct = sum(logits[i] for i in pair.correct_ids) / len(pair.correct_ids)
        return correct - sum(logits[i] for i in pair.incorrect_ids) / len(pair.incorrect_ids)
    if metric == "logprob":
        return torch.log(sum(probs[i] for i in pair.correct_ids))
    if metric == "prob_diff":
        return sum(probs[i] for i in pair.correct_ids) - sum(probs[i] for i in pair.incorrect_ids)
    donor = torch.softmax(donor_logits, dim=0)
    return (donor * (donor.log() - probs.log())).sum()  # kl: KL(donor || run)


def measure(metric: str, logits: torch.Tensor, pair, donor_logits: torch.Tensor) -> float:
    return float(metric_of(metric, logits, pair, donor_logits))


def hook(model: PreTrainedModel, component: str, layer: int, function):
    """`function(activation)` on the patched activation, in place: an input hook for heads, else an output hook."""
    module = hooked_module(model, component, layer)
    if component == "head":
        return module.register_forward_pre_hook(lambda module, args: function(args[0]))
    return module.register_forward_hook(lambda module, args, output: function(hidden(output)))


INPUTS = ("q", "k", "v")


def input_heads(model: PreTrainedModel, component: str) -> int:
    """Heads of a query (every head) or of a key or value (the key/value heads)."""
    config = model.config
    if component == "q":
        return config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


@contextmanager
def eager(model: PreTrainedModel):
    """Transformers' own eager attention while open, which can return the attention probabilities."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def pattern_of(model: PreTrainedModel, ids: list[int], layer: int) -> torch.Tensor:
    """[1, heads, T, T]: the attention probabilities of `layer` (eager attention's own)."""
    with eager(model):
        return model(torch.tensor([ids]), output_attentions=True).attentions[layer]


def capture(model: PreTrainedModel, ids: list[int], component: str, layer: int) -> torch.Tensor:
    """[1, T, width]: the activation a patch of `component` replaces; per head (q, k, v, pattern)
    each head's values one after the other, [1, T, heads * values per head]."""
    if component == "pattern":
        return head_ordered(model, component, layer, pattern_of(model, ids, layer))
    if component in INPUTS:
        module = input_site(model, layer, 0, component)[0]
        return head_ordered(model, component, layer, capture_output(model, ids, module))
    stored = {}

    def keep(act):
        stored["act"] = act.clone()

    handle = hook(model, component, layer, keep)
    try:
        model(torch.tensor([ids]))
    finally:
        handle.remove()
    return stored["act"]


def head_ordered(model: PreTrainedModel, component: str, layer: int, act: torch.Tensor) -> torch.Tensor:
    """[1, T, width] of a module's activation: a projection's output as its heads' q, k or v one
    after the other, attention probabilities [1, heads, T, T] as each destination's rows head after head."""
    if component == "pattern":
        return act.transpose(1, 2).flatten(2)
    if component in INPUTS:
        heads = [input_site(model, layer, h, component)[1] for h in range(input_heads(model, component))]
        return torch.cat([act[..., channels] for channels in heads], dim=-1)
    return act


def capture_input(model: PreTrainedModel, ids: list[int], module: torch.nn.Module) -> torch.Tensor:
    """[T, d]: what `module` reads (its first argument) in a forward of `ids`."""
    stored = {}
    handle = module.register_forward_pre_hook(lambda module, args: stored.setdefault("x", args[0].clone()))
    try:
        model(torch.tensor([ids]))
    finally:
        handle.remove()
    return stored["x"][0]


def capture_output(model: PreTrainedModel, ids: list[int], module: torch.nn.Module) -> torch.Tensor:
    stored = {}
    handle = module.register_forward_hook(lambda module, args, output: stored.setdefault("act", output.clone()))
    try:
        model(torch.tensor([ids]))
    finally:
        handle.remove()
    return stored["act"]


def heads_of(model: PreTrainedModel, component: str) -> list:
    """The heads a component is patched per ([None] for whole components)."""
    if component in INPUTS:
        return list(range(input_heads(model, component)))
    return list(range(model.config.num_attention_heads)) if component in ("head", "pattern") else [None]


def position_key(pair, position: int, donor: str) -> str:
    """Which mean a mean donor writes at `position`: one for every position (`mean-all`), or the
    position's label, or for unlabelled pairs its index among pairs of the same length."""
    if donor == "mean-all":
        return "all"
    return pair.labels[position] if pair.labels is not None else f"{pair.n_tokens}:{position}"


def donor_activation(
    model: PreTrainedModel, pair, donor_ids: list[int], component: str, layer: int, donor: str, means=None
):
    """What a patch writes: the pair's donor-side activation (`pair`), that of the prompt it
    resamples from (`resample`: `pair.donor_ids`), zeros of its shape (`zero`), or at each
    position the mean of its key (`mean`, `mean-all`: `means[(component, layer, key)]`)."""
    act = capture(model, list(pair.donor_ids) if donor == "resample" else donor_ids, component, layer)
    if donor in ("mean", "mean-all"):
        rows = [means[(component, layer, position_key(pair, t, donor))] for t in range(act.shape[1])]
        return torch.tensor(np.stack(rows), dtype=act.dtype)[None]
    return torch.zeros_like(act) if donor == "zero" else act


def head_width(model: PreTrainedModel, component: str, n_tokens: int) -> int:
    """Values per head of `component`: the head dimension, or a pattern row's sources."""
    return n_tokens if component == "pattern" else width_of(model.config)


def patched_logits(model, receiver_ids, donor_act, component, layer, position, head=None):
    """`position` None patches every position; `head` (per-head components): only that head's values."""
    positions = slice(None) if position is None else position
    width = head_width(model, component, len(receiver_ids))
    own = slice(None) if head is None else slice(head * width, (head + 1) * width)
    if component == "pattern":
        return pattern_patched_logits(model, receiver_ids, donor_act[:, :, own], layer, position, head)
    if component in INPUTS:
        module, channels = input_site(model, layer, head, component)

        def write(module, args, output):
            output[:, positions, channels] = donor_act[:, positions, own]

        handle = module.register_forward_hook(write)
        try:
            return next_token_logits(model, receiver_ids)
        finally:
            handle.remove()
    channels = own

    def replace(act):
        act[:, positions, channels] = donor_act[:, positions, channels]

    handle = hook(model, component, layer, replace)
    try:
        return next_token_logits(model, receiver_ids)
    finally:
        handle.remove()


def pattern_patched_logits(model, receiver_ids, donor_rows, layer, position, head):
    """Head `head`'s attention probabilities at destination `position` (every one for None)
    replaced by `donor_rows` ([1, T, T]): its output there changes by (donor - own probabilities)
    x the head's values, added at the output projection's input (nothing else in the layer moves)."""
    config = model.config
    width = width_of(config)
    kv = head // (config.num_attention_heads // input_heads(model, "v"))
    own = pattern_of(model, receiver_ids, layer)[:, head]
    values = capture(model, receiver_ids, "v", layer)[0, :, kv * width : (kv + 1) * width]
    rows = slice(None) if position is None else [position]
    change = (donor_rows[0, rows] - own[0, rows]) @ values

    def add(module, args):
        z = args[0].clone()
        z[0, rows, head * width : (head + 1) * width] += change
        return (z,)

    handle = hooked_module(model, "head", layer).register_forward_pre_hook(add)
    try:
        return next_token_logits(model, receiver_ids)
    finally:
        handle.remove()


def receiving_run(pair, direction: str) -> tuple[list[int], list[int]]:
    """(donor ids, receiving ids) of a pair's own two prompts."""
    if direction == "denoise":
        return list(pair.clean_ids), list(pair.corrupted_ids)
    return list(pair.corrupted_ids), list(pair.clean_ids)


@torch.no_grad()
def reference_patching(
    model: PreTrainedModel,
    pair,
    components,
    direction: str,
    all_positions: bool = False,
    metric: str = "logit_diff",
    donor_kind: str = "pair",
    means=None,
) -> dict:
    """{(component, layer, position, head or None): the patched run's metric} plus "clean" and "corrupted".

    Every position one at a time, or with `all_positions` one patch of all of them (position None).
    """
    donor, receiver = receiving_run(pair, direction)
    donor_logits = next_token_logits(model, donor)
    result = {
        "clean": measure(metric, next_token_logits(model, list(pair.clean_ids)), pair, donor_logits),
        "corrupted": measure(metric, next_token_logits(model, list(pair.corrupted_ids)), pair, donor_logits),
    }
    for component in components:
        for layer in range(model.config.num_hidden_layers):
            act = donor_activation(model, pair, donor, component, layer, donor_kind, means)
            for head in heads_of(model, component):
                for position in [None] if all_positions else range(len(receiver)):
                    logits = patched_logits(model, receiver, act, component, layer, position, head)
                    result[(component, layer, position, head)] = measure(metric, logits, pair, donor_logits)
    return result


def cut_block(model: PreTrainedModel, layer: int):
    """A hook leaving block `layer`'s residual contribution out of the backward pass: its output
    becomes input + (output - input).detach() (the same value)."""

    def cut(module, args, kwargs, output):
        block_input = args[0] if args else kwargs["hidden_states"]
        new = block_input + (hidden(output) - block_input).detach()
        return (new, *output[1:]) if isinstance(output, tuple) else new

    block = dig(model, PARTS[model.config.model_type][0])[layer]
    return block.register_forward_hook(cut, with_kwargs=True)


def site_gradients(
    model: PreTrainedModel, receiver: list[int], sites, metric: str, pair, donor_logits, cut: int | None = None
) -> tuple[float, dict]:
    """The receiving run's metric and, per site, (its activation, the metric's gradient there),
    both [1, T, width] (`head_ordered`); with `cut`, block `cut`'s contribution is left out of the
    backward. Plain autograd with retained gradients, one backward."""
    kept = {}

    def keeper(site):
        def keep(act):
            act.retain_grad()
            kept[site] = act

        return keep

    handles = [] if cut is None else [cut_block(model, cut)]
    for site in sites:
        if site[0] in INPUTS:
            module = input_site(model, site[1], 0, site[0])[0]
            keep = keeper(site)
            handles.append(module.register_forward_hook(lambda module, args, output, keep=keep: keep(output)))
        elif site[0] != "pattern":
            handles.append(hook(model, *site, keeper(site)))
    try:
        with torch.enable_grad(), eager(model):
            output = model(torch.tensor([receiver]), output_attentions=True)
            for component, layer in sites:
                if component == "pattern":
                    keeper((component, layer))(output.attentions[layer])
            value = metric_of(metric, output.logits[0, -1].double(), pair, donor_logits)
            value.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    gradients = {}
    for component, layer in sites:
        act = kept[(component, layer)]
        grad = torch.zeros_like(act) if act.grad is None else act.grad  # a site inside the cut block
        gradients[(component, layer)] = tuple(head_ordered(model, component, layer, t) for t in (act.detach(), grad))
    return float(value.detach()), gradients


def cell_changes(model: PreTrainedModel, site, donor_act, own, grad, n_tokens: int, all_positions: bool) -> dict:
    """{(component, layer, position, head): (donor - own) . grad over the cell's channels}."""
    product = ((donor_act - own) * grad)[0].double()  # [T, width]
    width = head_width(model, site[0], n_tokens)
    changes = {}
    for head in heads_of(model, site[0]):
        channels = slice(None) if head is None else slice(head * width, (head + 1) * width)
        per_position = product[:, channels].sum(-1)
        spots = {None: per_position.sum()} if all_positions else dict(enumerate(per_position))
        for position, change in spots.items():
            changes[(*site, position, head)] = float(change)
    return changes


def reference_atp(
    model: PreTrainedModel,
    pair,
    components,
    direction: str,
    all_positions: bool = False,
    metric: str = "logit_diff",
    donor_kind: str = "pair",
    means=None,
) -> dict:
    """{(component, layer, position, head or None): AtP's estimate of the patched metric}: the
    receiving run's metric plus (donor activation - receiving activation) . gradient of the metric
    at the receiving run, summed over the cell's channels (and positions for all_positions)."""
    donor, receiver = receiving_run(pair, direction)
    sites = [(component, layer) for component in components for layer in range(model.config.num_hidden_layers)]
    with torch.no_grad():
        donor_logits = next_token_logits(model, donor)
        donor_acts = {site: donor_activation(model, pair, donor, *site, donor_kind, means) for site in sites}
    value, gradients = site_gradients(model, receiver, sites, metric, pair, donor_logits)
    result = {}
    for site in sites:
        changes = cell_changes(model, site, donor_acts[site], *gradients[site], len(receiver), all_positions)
        result.update({cell: value + change for cell, change in changes.items()})
    return result


@torch.no_grad()
def patched_pattern(model: PreTrainedModel, receiver: list[int], donor_act, component: str, layer: int, position, head):
    """[1, T, heads * T] (`head_ordered`): layer `layer`'s attention probabilities with head `head`'s
    query or key (`component`) at `position` (every position: None) the donor's, by a whole eager forward."""
    module, channels = input_site(model, layer, head, component)
    own = slice(head * (channels.stop - channels.start), (head + 1) * (channels.stop - channels.start))
    positions = slice(None) if position is None else position

    def write(module, args, output):
        output[:, positions, channels] = donor_act[:, positions, own]

    handle = module.register_forward_hook(write)
    try:
        with eager(model):
            pattern = model(torch.tensor([receiver]), output_attentions=True).attentions[layer]
    finally:
        handle.remove()
    return head_ordered(model, "pattern", layer, pattern)


def reference_atpstar(
    model: PreTrainedModel,
    pair,
    components,
    direction: str,
    all_positions: bool = False,
    metric: str = "logit_diff",
    donor_kind: str = "pair",
    means=None,
) -> dict:
    """{(component, layer, position, head or None): (AtP*'s estimate of the patched metric, its
    GradDrop size)}. The estimate: AtP's, except at a query or key, where the layer's attention
    probabilities of a forward with the cell patched, minus the receiving run's, times the gradient
    at the probabilities (summed over every head, row and source). The size: 1/(L-1) x the sum over
    blocks l other than the cell's of |the same change with block l cut from the backward|, each
    cut its own forward and backward (`cut_block`)."""
    donor, receiver = receiving_run(pair, direction)
    layers = model.config.num_hidden_layers
    sites = [(component, layer) for component in components for layer in range(layers)]
    qk = [(component, layer) for component, layer in sites if component in ("q", "k")]
    sites += [("pattern", layer) for layer in {layer for _, layer in qk} if ("pattern", layer) not in sites]
    with torch.no_grad():
        donor_logits = next_token_logits(model, donor)
        donor_acts = {
            site: donor_activation(model, pair, donor, *site, donor_kind, means)
            for site in sites
            if site[0] in components
        }
        patterns = {
            (*site, position, head): patched_pattern(model, receiver, donor_acts[site], *site, position, head)
            for site in qk
            for head in heads_of(model, site[0])
            for position in ([None] if all_positions else range(len(receiver)))
        }

    def changes(gradients) -> dict:
        found = {}
        for site in sites:
            if site in qk:
                own, grad = gradients[("pattern", site[1])]
                found.update(
                    {cell: float(((p - own) * grad).sum()) for cell, p in patterns.items() if cell[:2] == site}
                )
            elif site[0] in components:
                found.update(
                    cell_changes(model, site, donor_acts[site], *gradients[site], len(receiver), all_positions)
                )
        return found

    value, gradients = site_gradients(model, receiver, sites, metric, pair, donor_logits)
    full = changes(gradients)
    sizes = dict.fromkeys(full, 0.0)
    for cut in range(layers):
        for cell, change in changes(site_gradients(model, receiver, sites, metric, pair, donor_logits, cut)[1]).items():
            if cell[1] != cut:
                sizes[cell] += abs(change) / max(layers - 1, 1)
    if layers == 1:
        sizes = {cell: abs(change) for cell, change in full.items()}
    return {cell: (value + change, sizes[cell]) for cell, change in full.items()}


QKV = {  # family: where head h's query, key and value are computed -- written here, not taken from the worker
    "gpt2": ("attn.c_attn", "stacked"),  # [all queries | all keys | all values]
    "gpt_neox": ("attention.query_key_value", "per_head"),  # [q k v] of head 0, then head 1, ...
    "llama": ("self_attn.{}_proj", "separate"),
    "mistral": ("self_attn.{}_proj", "separate"),
    "qwen2": ("self_attn.{}_proj", "separate"),
    "gemma2": ("self_attn.{}_proj", "separate"),
    "gemma3_text": ("self_attn.{}_proj", "separate"),
}


def input_site(model: PreTrainedModel, layer: int, head: int, input: str) -> tuple[torch.nn.Module, slice]:
    """The module computing head `head`'s q, k or v in `layer`, and that head's channels of its output
    (for k and v of separate projections, `head` is a key/value head)."""
    path, layout = QKV[model.config.model_type]
    config = model.config
    width, heads = width_of(config), config.num_attention_heads
    block = dig(model, PARTS[model.config.model_type][0])[layer]
    which = "qkv".index(input)
    if layout == "separate":
        return dig(block, path.format(input)), slice(head * width, (head + 1) * width)
    first = (3 * head + which) * width if layout == "per_head" else (which * heads + head) * width
    return dig(block, path), slice(first, first + width)


def logits_with_input_hooks(model: PreTrainedModel, ids: list[int], heads: list, make_hook, handles=()) -> torch.Tensor:
    """The next-token logits of `ids` with `make_hook((layer, head, input), channels)` on the module
    computing each listed head input (and `handles` already placed), all removed afterwards."""
    handles = list(handles)
    for layer, head, input in heads:
        module, wanted = input_site(model, layer, head, input)
        handles.append(module.register_forward_hook(make_hook((layer, head, input), wanted)))
    try:
        return next_token_logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def reference_paths(
    model: PreTrainedModel,
    pair,
    receiver: str,
    direction: str,
    all_positions: bool = False,
    metric: str = "logit_diff",
    donor_kind: str = "pair",
    means=None,
) -> dict:
    """{(sender layer, sender head, sender position or None): the path-patched run's metric} for one
    receiver spec, by the IOI paper's recipe, literally: (1) read every head's output in both runs;
    (2) the receiving run with the sender's output from the donor and every other head's output
    pinned to the receiving run's (hooks on every output projection's input; MLPs and norms run
    as usual): its logits for `logits`, else record the receiver heads' q/k/v there; (3) for heads,
    the receiving run with those inputs written in, and its logits."""
    donor, receiving = (
        (list(pair.clean_ids), list(pair.corrupted_ids))
        if direction == "denoise"
        else (list(pair.corrupted_ids), list(pair.clean_ids))
    )
    config = model.config
    width, n_heads, n_layers = width_of(config), config.num_attention_heads, config.num_hidden_layers
    donor_logits = next_token_logits(model, donor)
    donor_z = [donor_activation(model, pair, donor, "head", layer, donor_kind, means) for layer in range(n_layers)]
    receiving_z = [capture(model, receiving, "head", layer) for layer in range(n_layers)]
    spec, _, label = receiver.partition("@")
    heads = [(int(layer), int(head), input) for layer, head, input in re.findall(r"(\d+)\.(\d+):([qkv])", spec)]
    read_at = [i for i, name in enumerate(pair.labels) if name == label] if label else list(range(len(receiving)))
    result = {}
    for s_layer in range(n_layers):
        for s_head in range(n_heads):
            for position in [None] if all_positions else range(len(receiving)):
                spots = slice(None) if position is None else [position]
                channels = slice(s_head * width, (s_head + 1) * width)

                def pin(layer):
                    def hook(module, args):
                        z = receiving_z[layer].clone()
                        if layer == s_layer:
                            z[:, spots, channels] = donor_z[layer][:, spots, channels]
                        return (z,)

                    return hook

                def record(key, wanted):
                    def hook(module, args, output):
                        recorded[key] = output[:, read_at, wanted].clone()

                    return hook

                def write(key, wanted):
                    def hook(module, args, output):
                        output = output.clone()
                        output[:, read_at, wanted] = recorded[key]
                        return output

                    return hook

                recorded = {}
                pins = [
                    hooked_module(model, "head", layer).register_forward_pre_hook(pin(layer))
                    for layer in range(n_layers)
                ]
                logits = logits_with_input_hooks(model, receiving, heads, record, pins)
                if heads:
                    logits = logits_with_input_hooks(model, receiving, heads, write)
                result[(s_layer, s_head, position)] = measure(metric, logits, pair, donor_logits)
    return result


NORMS = {  # family: each block's norms before attention and before the MLP, and the final norm
    "gpt2": ("ln_1", "ln_2", "transformer.ln_f"),
    "gpt_neox": ("input_layernorm", "post_attention_layernorm", "gpt_neox.final_layer_norm"),
    "llama": ("input_layernorm", "post_attention_layernorm", "model.norm"),
    "mistral": ("input_layernorm", "post_attention_layernorm", "model.norm"),
    "qwen2": ("input_layernorm", "post_attention_layernorm", "model.norm"),
    "gemma2": ("input_layernorm", "pre_feedforward_layernorm", "model.norm"),
    "gemma3_text": ("input_layernorm", "pre_feedforward_layernorm", "model.norm"),
}


def ungrouped_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A grouped-query model as plain multi-head attention with the same outputs: each query head's
    key and value projection rows are its key/value head's (edge receivers are per query head)."""
    config = model.config
    heads = config.num_attention_heads
    shared = getattr(config, "num_key_value_heads", None) or heads
    if shared == heads:
        return model
    width = width_of(config)
    wide = type(model)(type(config).from_dict({**config.to_dict(), "num_key_value_heads": heads})).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if re.search(r"\.(k|v)_proj\.(weight|bias)$", name):
            tensor = tensor.reshape(shared, width, -1).repeat_interleave(heads // shared, 0).reshape(heads * width, -1)
            tensor = tensor.squeeze(-1) if name.endswith("bias") else tensor
        state[name] = tensor
    wide.load_state_dict(state)
    return wide


def receiver_gradient(
    model: PreTrainedModel, ids: list[int], receiver: tuple, metric, pair, donor_logits, embedded=None
):
    """[T, d]: the gradient of the metric at one receiver's own copy of its input, by autograd: the
    receiver reads a leaf copy of the stream (same values) and everything else runs as usual.
    `receiver`: ("head", layer, head, input), ("mlp", layer) or ("logits",); `embedded` ([T, d]):
    what the first block reads instead of the prompt's embeddings."""
    before_attention, before_mlp, final = NORMS[model.config.model_type]
    blocks = dig(model, PARTS[model.config.model_type][0])
    copies, handles = {}, []
    if embedded is not None:
        handles.append(blocks[0].register_forward_pre_hook(lambda module, args: (embedded[None], *args[1:])))

    def leaf(module, args):
        copies["x"] = args[0].detach().clone().requires_grad_(True)

    if receiver[0] == "head":
        _, layer, head, input = receiver
        norm = dig(blocks[layer], before_attention)
        module, channels = input_site(model, layer, head, input)

        def own(module, args, output):
            output = output.clone()
            output[..., channels] = module.forward(norm.forward(copies["x"]))[..., channels]  # no hooks again
            return output

        handles += [norm.register_forward_pre_hook(leaf), module.register_forward_hook(own)]
    elif receiver[0] == "mlp":
        norm = dig(blocks[receiver[1]], before_mlp)
        handles.append(norm.register_forward_pre_hook(leaf))
        mlp = dig(blocks[receiver[1]], PARTS[model.config.model_type][3])
        handles.append(mlp.register_forward_pre_hook(lambda module, args: (norm.forward(copies["x"]),)))
    else:

        def swap(module, args):
            leaf(module, args)
            return (copies["x"],)

        handles.append(dig(model, final).register_forward_pre_hook(swap))
    try:
        with torch.enable_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            metric_of(metric, logits, pair, donor_logits).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return copies["x"].grad[0].double()


def sender_outputs(model: PreTrainedModel, ids: list[int]) -> dict[str, torch.Tensor]:
    """{sender name: [T, d]}: the token embeddings alone (`input`, EAP-IG's `hook_embed`: the
    output of the model's input embedding module), each head's output through its columns of the
    output projection, each MLP's output."""
    config = model.config
    blocks_path, _, out_proj, _ = PARTS[config.model_type]
    width = width_of(config)
    found = {"input": capture_output(model, ids, model.get_input_embeddings())[0]}
    for layer in range(config.num_hidden_layers):
        z = capture(model, ids, "head", layer)[0]
        projection = dig(dig(model, blocks_path)[layer], out_proj)
        weight = projection.weight if isinstance(projection, torch.nn.Linear) else projection.weight.T  # [out, in]
        for head in range(config.num_attention_heads):
            channels = slice(head * width, (head + 1) * width)
            found[f"a{layer}.h{head}"] = z[:, channels] @ weight[:, channels].T
        found[f"m{layer}"] = capture(model, ids, "mlp", layer)[0]
    return found


def reference_eap(
    model: PreTrainedModel, pair, direction: str, metric: str = "logit_diff", steps: int = 0
) -> dict[str, float]:
    """{edge name: EAP's estimate of the patched metric}: the receiving run's metric plus (sender's
    donor output - its receiving output) . the gradient at the receiver's own input copy, summed
    over positions and channels; every edge of the EAP-IG graph, written out here by its rule.
    With `steps` (EAP-IG), the gradient is the mean over runs whose first block reads
    donor + k/steps (receiving - donor) of the two prompts' embeddings, k = 0..steps-1.
    Grouped-query models are read ungrouped (k and v receivers per query head)."""
    model = ungrouped_copy(model)
    donor, receiving = (
        (list(pair.clean_ids), list(pair.corrupted_ids))
        if direction == "denoise"
        else (list(pair.corrupted_ids), list(pair.clean_ids))
    )
    with torch.no_grad():
        donor_logits = next_token_logits(model, donor)
        base = measure(metric, next_token_logits(model, receiving), pair, donor_logits)
        ours, theirs = sender_outputs(model, receiving), sender_outputs(model, donor)
        first_block = dig(model, PARTS[model.config.model_type][0])[0]
        stream, donor_stream = capture_input(model, receiving, first_block), capture_input(model, donor, first_block)
    edges = defaultdict(list)  # receiver: its senders
    for edge in reference_eap_names(model):
        sender, receiver = edge.split("->")
        edges[receiver].append(sender)
    result = {}
    for name, senders in edges.items():
        found = re.fullmatch(r"a(\d+)\.h(\d+)<([qkv])>", name)
        if found:
            receiver = ("head", int(found[1]), int(found[2]), found[3])
        else:
            receiver = ("logits",) if name == "logits" else ("mlp", int(name[1:]))
        mixes = [donor_stream + k / steps * (stream - donor_stream) for k in range(steps)] or [None]
        gradient = sum(
            receiver_gradient(model, receiving, receiver, metric, pair, donor_logits, mix) for mix in mixes
        ) / len(mixes)
        for sender in senders:
            result[f"{sender}->{name}"] = base + float(((theirs[sender] - ours[sender]).double() * gradient).sum())
    return result


@torch.no_grad()
def reference_edge_patching(
    model: PreTrainedModel, pair, direction: str, metric: str = "logit_diff"
) -> dict[str, float]:
    """{edge name: the receiving run's metric with that edge alone patched}: whole forwards with
    hooks, the receiver (a head's q/k/v projection output on its channels, recomputed from the
    norm of the stream plus the sender's donor-minus-receiving output; the MLP's input; the final
    norm's input) reading the stream plus that difference (`stream_change`), every other module as usual."""
    model = ungrouped_copy(model)
    donor, receiving = (
        (list(pair.clean_ids), list(pair.corrupted_ids))
        if direction == "denoise"
        else (list(pair.corrupted_ids), list(pair.clean_ids))
    )
    donor_logits = next_token_logits(model, donor)
    ours, theirs = sender_outputs(model, receiving), sender_outputs(model, donor)
    before_attention, before_mlp, final = NORMS[model.config.model_type]
    blocks = dig(model, PARTS[model.config.model_type][0])
    mlp_path = PARTS[model.config.model_type][3]
    projections = [dig(block, PARTS[model.config.model_type][2]) for block in blocks]
    attention = [capture_output(model, receiving, projection)[0] for projection in projections]
    result = {}
    for edge in reference_eap_names(model):
        sender, receiver = edge.split("->")
        change = stream_change(model, {sender: theirs[sender] - ours[sender]}, attention)[None]
        stream, handles = {}, []

        def keep(module, args, stream=stream):
            stream["x"] = args[0]

        if receiver == "logits":
            handles.append(dig(model, final).register_forward_pre_hook(lambda m, args, c=change: (args[0] + c,)))
        elif receiver.startswith("m"):
            block = blocks[int(receiver[1:])]
            norm = dig(block, before_mlp)
            handles.append(norm.register_forward_pre_hook(keep))
            handles.append(
                dig(block, mlp_path).register_forward_pre_hook(
                    lambda m, args, n=norm, c=change, s=stream: (n.forward(s["x"] + c),)
                )
            )
        else:
            layer, head, input = re.fullmatch(r"a(\d+)\.h(\d+)<([qkv])>", receiver).groups()
            norm = dig(blocks[int(layer)], before_attention)
            module, channels = input_site(model, int(layer), int(head), input)

            def own(module, args, output, n=norm, c=change, s=stream, ch=channels):
                output = output.clone()
                output[..., ch] = module.forward(n.forward(s["x"] + c))[..., ch]
                return output

            handles += [norm.register_forward_pre_hook(keep), module.register_forward_hook(own)]
        try:
            result[edge] = measure(metric, next_token_logits(model, receiving), pair, donor_logits)
        finally:
            for handle in handles:
                handle.remove()
    return result


def stream_change(model: PreTrainedModel, differences: dict, attention: list) -> torch.Tensor:
    """[T, d]: what a receiver reads beyond the stream when the edges from the senders of
    `differences` ({sender: donor minus run output, [T, d]}) are patched: their sum; but on a
    family with a post-attention norm, a layer's heads reach the stream through it, so their part
    is post(o + their differences) - post(o), `attention[layer]` (o) the layer's attention output
    projection's output in the run: EAP-IG's `evaluate_graph`, written out here."""
    norms = POST_NORMS.get(model.config.model_type)
    blocks = dig(model, PARTS[model.config.model_type][0])
    total = torch.zeros_like(next(iter(differences.values())))
    by_layer = defaultdict(list)
    for sender, difference in differences.items():
        head = re.fullmatch(r"a(\d+)\.h\d+", sender)
        if norms and head:
            by_layer[int(head[1])].append(difference)
        else:
            total = total + difference
    for layer, heads in by_layer.items():
        norm, o = dig(blocks[layer], norms[0]), attention[layer]
        total = total + norm(o + sum(heads)) - norm(o)
    return total


def reference_eap_names(model: PreTrainedModel) -> list[str]:
    """Every edge of the EAP-IG graph, by its rule: a receiver reads every sender of an earlier
    layer; an MLP also its own layer's heads, unless the block is parallel; `logits` everything."""
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    parallel = bool(getattr(config, "use_parallel_residual", False))
    senders = ["input"] + [f"a{at}.h{h}" for at in range(layers) for h in range(heads)]
    senders += [f"m{at}" for at in range(layers)]
    receivers = [(f"a{at}.h{h}<{i}>", at) for at in range(layers) for h in range(heads) for i in INPUTS]
    receivers += [(f"m{at}", at) for at in range(layers)] + [("logits", layers)]
    names = []
    for name, layer in receivers:
        for sender in senders:
            sender_layer = -1 if sender == "input" else int(re.match(r"[am](\d+)", sender).group(1))
            own_heads = name.startswith("m") and sender.startswith("a") and not parallel
            if sender_layer < layer or (sender_layer == layer and own_heads):
                names.append(f"{sender}->{name}")
    return names


@torch.no_grad()
def reference_edge_set(
    model: PreTrainedModel, pair, direction: str, patched: set[str], metric: str = "logit_diff", donor=None
):
    """The receiving run's metric with every edge named in `patched` patched at once: one whole
    forward with hooks, each receiver reading the stream plus, for each of its patched edges, the
    sender's donor output minus that sender's output in this same forward (caught as the forward
    reaches it, so a sender after a patched edge sends its patched value; on Gemma, a layer's heads
    through its post-attention norm: `stream_change`). `donor`: {sender: [T, d]},
    the senders' ablated outputs; by default the pair's donor-side prompt's."""
    model, ablated = ungrouped_copy(model), donor
    donor_ids, receiving = (
        (list(pair.clean_ids), list(pair.corrupted_ids))
        if direction == "denoise"
        else (list(pair.corrupted_ids), list(pair.clean_ids))
    )
    donor_logits, theirs = next_token_logits(model, donor_ids), ablated or sender_outputs(model, donor_ids)
    into, ours, streams = defaultdict(list), {}, {}
    for edge in patched:
        sender, receiver = edge.split("->")
        into[receiver].append(sender)

    attention = {}  # per layer, this forward's attention output projection output

    def change(receiver: str) -> torch.Tensor:
        differences = {s: theirs[s] - ours[s] for s in into[receiver]} or {"input": torch.zeros_like(theirs["input"])}
        return stream_change(model, differences, attention)[None]

    config = model.config
    blocks_path, _, out_proj, _ = PARTS[config.model_type]
    before_attention, before_mlp, final = NORMS[config.model_type]
    heads, width = config.num_attention_heads, width_of(config)
    blocks = dig(model, blocks_path)
    embedding = model.get_input_embeddings()
    handles = [embedding.register_forward_hook(lambda m, args, output: ours.update(input=output[0]))]
    for layer, block in enumerate(blocks):
        norm, mlp_norm = dig(block, before_attention), dig(block, before_mlp)
        handles.append(norm.register_forward_pre_hook(lambda m, args, at=layer: streams.update({at: args[0]})))
        for head in range(heads):
            for input in INPUTS:
                module, channels = input_site(model, layer, head, input)

                def own(module, args, output, n=norm, at=layer, ch=channels, r=f"a{layer}.h{head}<{input}>"):
                    output = output.clone()
                    output[..., ch] = module.forward(n.forward(streams[at] + change(r)))[..., ch]
                    return output

                handles.append(module.register_forward_hook(own))
        projection = dig(block, out_proj)
        weight = projection.weight if isinstance(projection, torch.nn.Linear) else projection.weight.T

        def heads_out(module, args, at=layer, w=weight):
            for head in range(heads):
                channels = slice(head * width, (head + 1) * width)
                ours[f"a{at}.h{head}"] = args[0][0, :, channels] @ w[:, channels].T

        handles.append(projection.register_forward_pre_hook(heads_out))
        handles.append(
            projection.register_forward_hook(lambda m, args, output, at=layer: attention.update({at: output[0]}))
        )
        handles.append(mlp_norm.register_forward_pre_hook(lambda m, args, at=layer: (args[0] + change(f"m{at}"),)))
        handles.append(
            hooked_module(model, "mlp", layer).register_forward_hook(
                lambda m, args, output, at=layer: ours.__setitem__(f"m{at}", hidden(output)[0])
            )
        )
    handles.append(dig(model, final).register_forward_pre_hook(lambda m, args: (args[0] + change("logits"),)))
    try:
        return measure(metric, next_token_logits(model, receiving), pair, donor_logits)
    finally:
        for handle in handles:
            handle.remove()
