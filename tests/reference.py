"""An independent activation-patching reference: plain PyTorch forward hooks, one forward per cell.

Deliberately naive and free of nnsight, so that it can check the worker's numbers.
"""
from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel


def hooked_module(model: GPT2LMHeadModel, component: str, layer: int) -> torch.nn.Module:
    block = model.transformer.h[layer]
    return {"resid": block, "attn": block.attn, "mlp": block.mlp}[component]


def hidden(output):
    return output[0] if isinstance(output, tuple) else output


def logit_diff(model: GPT2LMHeadModel, ids: list[int], correct: int, incorrect: int) -> float:
    logits = model(torch.tensor([ids])).logits[0, -1]
    return float(logits[correct] - logits[incorrect])


def capture(model: GPT2LMHeadModel, ids: list[int], component: str, layer: int) -> torch.Tensor:
    stored = {}

    def keep(module, args, output):
        stored["act"] = hidden(output).clone()

    handle = hooked_module(model, component, layer).register_forward_hook(keep)
    try:
        model(torch.tensor([ids]))
    finally:
        handle.remove()
    return stored["act"]


def patched_logit_diff(model, receiver_ids, donor_act, component, layer, position, correct, incorrect):
    def replace(module, args, output):
        hidden(output)[:, position] = donor_act[:, position]
        return output

    handle = hooked_module(model, component, layer).register_forward_hook(replace)
    try:
        return logit_diff(model, receiver_ids, correct, incorrect)
    finally:
        handle.remove()


@torch.no_grad()
def reference_patching(model: GPT2LMHeadModel, pair, components, direction: str) -> dict:
    """{(component, layer, position): patched logit diff} plus "clean" and "corrupted"."""
    donor, receiver = (
        (pair.clean_ids, pair.corrupted_ids) if direction == "denoise"
        else (pair.corrupted_ids, pair.clean_ids)
    )
    answers = (pair.correct_id, pair.incorrect_id)
    result = {
        "clean": logit_diff(model, list(pair.clean_ids), *answers),
        "corrupted": logit_diff(model, list(pair.corrupted_ids), *answers),
    }
    for component in components:
        for layer in range(model.config.n_layer):
            act = capture(model, list(donor), component, layer)
            for position in range(len(receiver)):
                result[(component, layer, position)] = patched_logit_diff(
                    model, list(receiver), act, component, layer, position, *answers
                )
    return result
