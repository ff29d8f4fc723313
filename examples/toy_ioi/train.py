"""Train a small GPT-2 that really does IOI, on CPU in a few minutes, and save it with its tokenizer.

GPT-2 weights cannot be downloaded here, so real IOI heatmaps need a model we build. The
model sees IOI sentences from 12 of the 15 templates (both orders, every name) plus filler
sentences that use every word; templates 12-14 are held out to measure generalisation.

    OMP_NUM_THREADS=1 python -m examples.toy_ioi.train --out examples/toy-ioi-gpt2 --seconds 330

`--layers 12 --heads 12 --width 48` gives GPT-2 small's graph, MIB's (examples/mib-gpt2).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from examples.tiny_gpt2 import EOS, build_tokenizer
from jobs.datasets.ioi import NAMES, OBJECTS, PLACES, fill, templates

TRAIN_TEMPLATES, HELD_OUT_TEMPLATES = list(range(12)), [12, 13, 14]
FILLERS = [
    "[A] likes the [PLACE].",
    "The [OBJECT] is at the [PLACE].",
    "[A] has a [OBJECT].",
    "[A] and [B] are friends.",
    "[A] went home.",
]


def ioi_sentence(rng: random.Random, template_text: str) -> tuple[str, str, str]:
    """(prompt, IO, S) for one random filling of a template."""
    io, s = rng.sample(NAMES, 2)
    prompt = fill(template_text, a=io, b=s, s2=s, place=rng.choice(PLACES), obj=rng.choice(OBJECTS))
    return prompt, io, s


def filler_sentence(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    return (
        rng.choice(FILLERS)
        .replace("[A]", a)
        .replace("[B]", b)
        .replace("[PLACE]", rng.choice(PLACES))
        .replace("[OBJECT]", rng.choice(OBJECTS))
    )


def filler_row(rng: random.Random, tokenizer, length: int) -> list[int]:
    ids = tokenizer(EOS).input_ids
    while len(ids) < length:
        ids += tokenizer(" " + filler_sentence(rng)).input_ids
    return ids[:length]


def corpus(rng: random.Random) -> list[str]:
    """Text for the tokenizer: every template, name, place and object many times."""
    texts = [ioi_sentence(rng, t.text)[0] for t in templates() for _ in range(40)]
    return texts + [filler_sentence(rng) for _ in range(2000)] + [" " + n for n in NAMES] * 20


def batch(rng: random.Random, tokenizer, size: int, template_indices: list[int]) -> tuple[torch.Tensor, bool]:
    """One template per IOI batch (so no padding), or a batch of filler lines joined to one length."""
    if rng.random() < 0.2:
        return torch.tensor([filler_row(rng, tokenizer, 24) for _ in range(size)]), False
    template = rng.choice([t for t in templates() if t.index in template_indices])
    rows = []
    for _ in range(size):
        prompt, io, _ = ioi_sentence(rng, template.text)
        rows.append(tokenizer(EOS + prompt + " " + io).input_ids)
    return torch.tensor(rows), True


def training_loss(model, ids: torch.Tensor, is_ioi: bool, answer_weight: float) -> torch.Tensor:
    """Next-token loss everywhere, plus the answer token again: the IOI signal is one token in twenty."""
    output = model(ids, labels=ids)
    if not is_ioi or not answer_weight:
        return output.loss
    answer = torch.nn.functional.cross_entropy(output.logits[:, -2], ids[:, -1])
    return output.loss + answer_weight * answer


@torch.no_grad()
def evaluate(model, tokenizer, template_indices: list[int], n: int = 600, seed: int = 1) -> dict:
    """Mean logit difference (IO minus S) at the last prompt token, and accuracy (IO preferred)."""
    rng = random.Random(seed)
    chosen = [t for t in templates() if t.index in template_indices]
    diffs = []
    for i in range(n):
        prompt, io, s = ioi_sentence(rng, chosen[i % len(chosen)].text)
        logits = model(torch.tensor([tokenizer(EOS + prompt).input_ids])).logits[0, -1]
        io_id, s_id = (tokenizer(" " + name).input_ids[0] for name in (io, s))
        diffs.append(float(logits[io_id] - logits[s_id]))
    return {"mean_logit_diff": round(sum(diffs) / n, 3), "accuracy": round(sum(d > 0 for d in diffs) / n, 4), "n": n}


@torch.no_grad()
def patching_signature(model, tokenizer, n: int = 60) -> dict:
    """Mean resid patching score at S2 and END per layer (swap corruption): the IOI shape."""
    from jobs.datasets.ioi import generate_ioi
    from jobs.pairfile import encoder_for, parse_record
    from worker.methods.registry import patch_batch
    from worker.model.load import load_model

    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        records = generate_ioi(n, seed=123, tokenizer=tokenizer)
        encoder = encoder_for(tokenizer, records)
        pairs = [parse_record(r, r["id"], encoder, 64) for r in records]
        effects = patch_batch(load_model(scratch, device="cpu"), pairs, ["resid"]).effects.to_pylist()
    label_of = {(r["id"], i): label for r in records for i, label in enumerate(r["labels"])}
    signature = {}
    for role in ("S2", "END"):
        per_layer = [
            [e["score"] for e in effects if e["layer"] == layer and label_of[(e["pair_id"], e["position"])] == role]
            for layer in range(model.config.n_layer)
        ]
        signature[role] = [round(sum(v) / len(v), 3) for v in per_layer]
    return signature


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="examples/toy-ioi-gpt2")
    parser.add_argument("--seconds", type=float, default=330)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--answer-weight", type=float, default=1.0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(corpus(rng), vocab_size=1000)
    assert all(len(tokenizer(" " + n).input_ids) == 1 for n in NAMES), "every name must be one token"
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    start, step = time.time(), 0
    while time.time() - start < args.seconds:
        ids, is_ioi = batch(rng, tokenizer, 64, TRAIN_TEMPLATES)
        loss = training_loss(model, ids, is_ioi, args.answer_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
    model.eval()
    metrics = {
        "steps": step,
        "train_seconds": round(time.time() - start),
        "train_templates": evaluate(model, tokenizer, TRAIN_TEMPLATES),
        "held_out_templates": evaluate(model, tokenizer, HELD_OUT_TEMPLATES),
        "resid_patching": patching_signature(model, tokenizer),
    }
    print(json.dumps(metrics, indent=2))
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()
