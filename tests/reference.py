"""An independent activation-patching reference: plain PyTorch forward hooks, one forward per cell.

Deliberately naive and free of nnsight, so that it can check the worker's numbers.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from transformers import PreTrainedModel

PARTS = {  # family: blocks, attention, its output projection, MLP -- written here, not taken from the worker
    "gpt2": ("transformer.h", "attn", "attn.c_proj", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "attention.dense", "mlp"),
    "llama": ("model.layers", "self_attn", "self_attn.o_proj", "mlp"),
    "mistral": ("model.layers", "self_attn", "self_attn.o_proj", "mlp"),
    "qwen2": ("model.layers", "self_attn", "self_attn.o_proj", "mlp"),
}


def dig(root, path: str):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def hooked_module(model, component: str, layer: int) -> torch.nn.Module:
    """Whose output is patched; for `head`, whose input (the heads' outputs side by side)."""
    blocks, attention, out_proj, mlp = PARTS[model.config.model_type]
    block = dig(model, blocks)[layer]
    return {"resid": block, "attn": dig(block, attention), "mlp": dig(block, mlp), "head": dig(block, out_proj)}[
        component
    ]


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


def capture(model: PreTrainedModel, ids: list[int], component: str, layer: int) -> torch.Tensor:
    stored = {}

    def keep(act):
        stored["act"] = act.clone()

    handle = hook(model, component, layer, keep)
    try:
        model(torch.tensor([ids]))
    finally:
        handle.remove()
    return stored["act"]


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


def patched_logits(model, receiver_ids, donor_act, component, layer, position, channels=slice(None)):
    """`position` None patches every position."""
    positions = slice(None) if position is None else position

    def replace(act):
        act[:, positions, channels] = donor_act[:, positions, channels]

    handle = hook(model, component, layer, replace)
    try:
        return next_token_logits(model, receiver_ids)
    finally:
        handle.remove()


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
    donor, receiver = (
        (pair.clean_ids, pair.corrupted_ids) if direction == "denoise" else (pair.corrupted_ids, pair.clean_ids)
    )
    donor_logits = next_token_logits(model, list(donor))
    result = {
        "clean": measure(metric, next_token_logits(model, list(pair.clean_ids)), pair, donor_logits),
        "corrupted": measure(metric, next_token_logits(model, list(pair.corrupted_ids)), pair, donor_logits),
    }
    config = model.config
    width = config.hidden_size // config.num_attention_heads
    for component in components:
        heads = range(config.num_attention_heads) if component == "head" else [None]
        for layer in range(config.num_hidden_layers):
            act = donor_activation(model, pair, list(donor), component, layer, donor_kind, means)
            for head in heads:
                channels = slice(None) if head is None else slice(head * width, (head + 1) * width)
                for position in [None] if all_positions else range(len(receiver)):
                    logits = patched_logits(model, list(receiver), act, component, layer, position, channels)
                    result[(component, layer, position, head)] = measure(metric, logits, pair, donor_logits)
    return result


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
    at the receiving run, summed over the cell's channels (and positions for all_positions);
    plain autograd with retained gradients, one backward."""
    donor, receiver = (
        (pair.clean_ids, pair.corrupted_ids) if direction == "denoise" else (pair.corrupted_ids, pair.clean_ids)
    )
    config = model.config
    width = config.hidden_size // config.num_attention_heads
    sites = [(component, layer) for component in components for layer in range(config.num_hidden_layers)]
    with torch.no_grad():
        donor_logits = next_token_logits(model, list(donor))
        donor_acts = {site: donor_activation(model, pair, list(donor), *site, donor_kind, means) for site in sites}
    kept = {}

    def keeper(site):
        def keep(act):
            act.retain_grad()
            kept[site] = act

        return keep

    handles = [hook(model, *site, keeper(site)) for site in sites]
    try:
        with torch.enable_grad():
            value = metric_of(metric, model(torch.tensor([list(receiver)])).logits[0, -1].double(), pair, donor_logits)
            value.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    result = {}
    for component, layer in sites:
        act = kept[(component, layer)]
        product = ((donor_acts[(component, layer)] - act.detach()) * act.grad)[0].double()  # [T, width]
        heads = range(config.num_attention_heads) if component == "head" else [None]
        for head in heads:
            channels = slice(None) if head is None else slice(head * width, (head + 1) * width)
            per_position = product[:, channels].sum(-1)
            spots = {None: per_position.sum()} if all_positions else dict(enumerate(per_position))
            for position, change in spots.items():
                result[(component, layer, position, head)] = float(value.detach()) + float(change)
    return result


QKV = {  # family: where head h's query, key and value are computed -- written here, not taken from the worker
    "gpt2": ("attn.c_attn", "stacked"),  # [all queries | all keys | all values]
    "gpt_neox": ("attention.query_key_value", "per_head"),  # [q k v] of head 0, then head 1, ...
    "llama": ("self_attn.{}_proj", "separate"),
    "mistral": ("self_attn.{}_proj", "separate"),
    "qwen2": ("self_attn.{}_proj", "separate"),
}


def input_site(model: PreTrainedModel, layer: int, head: int, input: str) -> tuple[torch.nn.Module, slice]:
    """The module computing head `head`'s q, k or v in `layer`, and that head's channels of its output
    (query heads only for separate projections: the tests use k and v only without grouped-query attention)."""
    path, layout = QKV[model.config.model_type]
    config = model.config
    width, heads = config.hidden_size // config.num_attention_heads, config.num_attention_heads
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
    width, n_heads, n_layers = (
        config.hidden_size // config.num_attention_heads,
        config.num_attention_heads,
        config.num_hidden_layers,
    )
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
