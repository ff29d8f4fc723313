"""The seed tutorial's patching shape in nnsight 0.8, kept as a baseline for benchmarks.

One trace per pair: a clean invoke, a corrupted invoke and one invoke per (layer, position)
that waits at a barrier for the clean activation of its layer. It lives in a module of its
own because nnsight reads trace bodies from source files.
"""

from __future__ import annotations

import nnsight
import torch

from worker.contract.pairs import Pair


def encoding(ids: tuple[int, ...]) -> dict:
    tensor = torch.tensor([ids])
    return {"input_ids": tensor, "attention_mask": torch.ones_like(tensor)}


def seed_shape_patching(model, pair: Pair) -> dict:
    """{(layer, position): patched logit diff} plus "clean" and "corrupted", resid only, denoising."""
    n_layers, n_tokens = len(model.transformer.h), pair.n_tokens
    (a,), (b,) = pair.correct_ids, pair.incorrect_ids
    with torch.inference_mode(), model.trace() as tracer:
        barriers = [tracer.barrier(n_tokens + 1) for _ in range(n_layers)]
        results = nnsight.save({})
        with tracer.invoke(encoding(pair.clean_ids)):
            for layer in range(n_layers):
                clean_hidden = model.transformer.h[layer].output
                barriers[layer]()
            logits = model.lm_head.output[:, -1]
            results["clean"] = logits[0, a] - logits[0, b]
        with tracer.invoke(encoding(pair.corrupted_ids)):
            logits = model.lm_head.output[:, -1]
            results["corrupted"] = logits[0, a] - logits[0, b]
        for layer in range(n_layers):
            for position in range(n_tokens):
                with tracer.invoke(encoding(pair.corrupted_ids)):
                    barriers[layer]()
                    model.transformer.h[layer].output[:, position, :] = clean_hidden[:, position, :]
                    logits = model.lm_head.output[:, -1]
                    results[(layer, position)] = logits[0, a] - logits[0, b]
    return {key: float(value) for key, value in results.items()}
