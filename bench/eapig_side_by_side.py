"""One circuit evaluated by EAP-IG's `evaluate_graph` and by `driver.py circuit`, pair by pair.

Run from the repository root in EAP-IG's venv (the library half runs in this process; patchsweep's
half runs as `driver.py circuit` in patchsweep's venv, a subprocess, so patchsweep never imports
the library):

    python3 -m venv bench/venv-eapig && bench/venv-eapig/bin/pip install torch==2.13.0 \
        transformer_lens==2.18.0 'pyarrow<22' && bench/venv-eapig/bin/pip install -e bench/venv-eapig-src
    bench/venv-eapig/bin/python bench/eapig_side_by_side.py [--patchsweep-python .venv/bin/python]

(TransformerLens 2.18 wants numpy<2, which pyarrow 22+ refuses. `bench/venv-eapig-src` is a
checkout of hannamw/EAP-IG (the library, read from its repository); everything under `bench/venv*` is ignored by git.)

The model is examples/tiny-gpt2, loaded into TransformerLens without weight processing (its
logits checked against HF's). Six IOI pairs of one length are written to OUT/pairs.jsonl, each
prompt starting with `<|endoftext|>`, because EAP-IG's `tokenize_plus` prepends BOS and
patchsweep adds no special token. Circuits come from seeded random edge scores (`apply_topn` and
`apply_greedy`, 40 edges each, pruned, written with `to_json`). Metric: correct minus incorrect
logit at the last position, per pair. Interventions compared: EAP-IG `zero` / patchsweep
`--donor zero`; `patching` / `pair`; `mean-positional` / `mean` (the pairs are unlabelled, so
patchsweep's position key is LENGTH:POSITION: the per-position mean over the corrupted prompts);
EAP-IG's `mean` / `mean-all` is printed too, with a diagnostic (`every_position_means`) that
shows why they differ. For each: both circuits, the empty circuit and the full graph. EAP-IG's
mean pass allocates on 'cuda'; on a CPU-only machine that allocation is put on the CPU (nothing
else of the library is changed). OUT defaults to runs/eapig_side_by_side (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import eap.evaluate
import eap.utils
import torch
from eap.evaluate import evaluate_graph
from eap.graph import Graph
from torch.utils.data import DataLoader
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "tiny-gpt2"
BOS = "<|endoftext|>"
# (first name, second name, place, object, which name is S): one template, so one token length.
PAIRS = [
    ("Mary", "James", "store", "ring", 1),
    ("Anna", "Tom", "school", "drink", 0),
    ("Lisa", "John", "store", "drink", 1),
    ("Kate", "David", "school", "ring", 0),
    ("Sarah", "Paul", "store", "ring", 0),
    ("John", "Mary", "school", "drink", 1),
]
CIRCUITS = ["top40", "greedy40"]
INTERVENTIONS = [("zero", "zero"), ("patching", "pair"), ("mean-positional", "mean"), ("mean", "mean-all")]


def write_pairs(path: Path) -> list[dict]:
    rows = []
    for i, (a, b, place, thing, s) in enumerate(PAIRS):
        subject, other = (a, b)[s], (b, a)[s]
        prompt = f"{BOS}When {a} and {b} went to the {place}, {{}} gave a {thing} to"
        rows.append(
            {
                "id": f"p{i}",
                "clean": prompt.format(subject),
                "corrupted": prompt.format(other),
                "correct": f" {other}",
                "incorrect": f" {subject}",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def load_model(out: Path) -> tuple[HookedTransformer, GPT2LMHeadModel]:
    hf = GPT2LMHeadModel.from_pretrained(MODEL).eval()
    # The checkpoint names transformers 5's TokenizersBackend, which this transformers lacks and
    # TransformerLens reloads by name: the same tokenizer.json under GPT2TokenizerFast's name.
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "tokenizer.json").write_bytes((MODEL / "tokenizer.json").read_bytes())
    tok_cfg = json.loads((MODEL / "tokenizer_config.json").read_text())
    tok_cfg.pop("backend", None)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "tokenizer_class": "GPT2TokenizerFast"}))
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.n_embd,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        n_layers=c.n_layer,
        n_ctx=c.n_positions,
        eps=c.layer_norm_epsilon,
        d_vocab=c.vocab_size,
        act_fn=c.activation_function,
        use_attn_scale=True,
        scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
        normalization_type="LN",
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=True,
        device="cpu",
    )
    model = HookedTransformer(cfg, tokenizer=GPT2TokenizerFast.from_pretrained(tok_dir), move_to_device=False)
    model.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)  # no folding, no centring
    model.eval()
    model.cfg.use_split_qkv_input = True
    model.cfg.use_attn_result = True
    model.cfg.use_hook_mlp_in = True
    return model, hf


@contextmanager
def every_position_means():
    """Diagnostic: EAP-IG's non-positional mean, replaced by each node's mean over every position.

    The library's `compute_mean_activations(per_position=False)` keeps only each prompt's last
    position (divided by the prompt's length) and then averages over the nodes (`means.mean(0)`),
    so every sender is ablated to one shared d_model vector. The per-position means over
    equal-length prompts, averaged over positions, give each node its mean over every position.
    """
    real = eap.evaluate.compute_mean_activations

    def per_node(model, graph, dataloader, per_position=False):
        means = real(model, graph, dataloader, per_position=True)
        return means if per_position else means.mean(0)

    eap.evaluate.compute_mean_activations = per_node
    try:
        yield
    finally:
        eap.evaluate.compute_mean_activations = real


@contextmanager
def cuda_to(device: str):
    """EAP-IG's compute_mean_activations allocates its sums with device='cuda'; put them on `device`."""
    real = eap.utils.torch

    def zeros(*args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs["device"] = device
        return real.zeros(*args, **kwargs)

    eap.utils.torch = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    eap.utils.torch.zeros = zeros
    try:
        yield
    finally:
        eap.utils.torch = real


def library_half(model: HookedTransformer, rows: list[dict], out: Path) -> dict:
    tok = model.tokenizer
    # tokenize_plus prepends the BOS text itself: hand it the prompts without ours
    clean = [r["clean"].removeprefix(BOS) for r in rows]
    corrupted = [r["corrupted"].removeprefix(BOS) for r in rows]
    answers = torch.tensor([[tok(r["correct"]).input_ids[0], tok(r["incorrect"]).input_ids[0]] for r in rows])
    data = list(zip(clean, corrupted, answers))
    loader = DataLoader(data, batch_size=len(data), collate_fn=lambda b: tuple(map(list, zip(*b))))
    corrupted_loader = DataLoader(corrupted, batch_size=3, collate_fn=list)  # not a tuple: batch[0] is not taken

    def logit_diff(logits, clean_logits, input_lengths, labels):
        last = logits[torch.arange(len(logits)), input_lengths - 1]
        labels = torch.stack(labels)
        return last.gather(1, labels[:, :1]).squeeze(1) - last.gather(1, labels[:, 1:]).squeeze(1)

    circuits = {}
    for name in CIRCUITS:
        g = Graph.from_model(model)
        gen = torch.Generator().manual_seed(0)
        g.scores[:] = torch.randn(g.scores.shape, generator=gen) * g.real_edge_mask
        if name == "top40":
            g.apply_topn(40, absolute=True)  # resets, takes the top 40, prunes
        else:
            g.apply_greedy(40, absolute=True)  # grown from the logits, pruned
        g.to_json(str(out / f"{name}.json"))
        print(f"{name}: {g.count_included_edges()} edges after pruning, {g.count_included_nodes()} nodes")
        circuits[name] = g

    full = Graph.from_model(model)
    full.reset(empty=False)
    graphs = {**circuits, "empty": Graph.from_model(model), "full": full}
    results = {}
    for intervention, _ in INTERVENTIONS:
        for name, g in graphs.items():
            kwargs = {}
            if "mean" in intervention:
                kwargs["intervention_dataloader"] = corrupted_loader
            with cuda_to("cpu"):
                r = evaluate_graph(model, g, loader, logit_diff, quiet=True, intervention=intervention, **kwargs)
            results[intervention, name] = r.tolist()
            if intervention == "mean":
                # Diagnostic, not the library's behaviour: 'mean' with each sender's own mean over every
                # position of every corrupted prompt (what patchsweep's mean-all takes).
                with cuda_to("cpu"), every_position_means():
                    r = evaluate_graph(model, g, loader, logit_diff, quiet=True, intervention=intervention, **kwargs)
                results["mean-per-node", name] = r.tolist()
    return results


def patchsweep_half(python: str, pairs: Path, out: Path) -> dict:
    results = {}
    read = (
        "import json, sys, pyarrow.parquet as pq\n"
        "t = pq.read_table(sys.argv[1] + '/faithfulness').to_pylist()\n"
        "p = pq.read_table(sys.argv[1] + '/pairs.parquet').to_pylist()\n"
        "print(json.dumps({'rows': [(r['pair_id'], r['circuit'], r['logit_diff']) for r in t],"
        " 'clean': {r['pair_id']: r['clean_logit_diff'] for r in p}}))"
    )
    for _, donor in INTERVENTIONS:
        run = out / f"ps-{donor}"
        cmd = [python, "driver.py", "circuit", "--pairs", str(pairs)]
        cmd += [a for name in CIRCUITS for a in ("--circuit", str(out / f"{name}.json"))]
        cmd += ["--model", str(MODEL), "--donor", donor, "--out", str(run), "--device", "cpu", "--overwrite"]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        got = json.loads(
            subprocess.run([python, "-c", read, str(run)], capture_output=True, check=True, text=True).stdout
        )
        results[donor] = got
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patchsweep-python", default="/work/main/.venv/bin/python")
    parser.add_argument("--out", default=str(ROOT / "runs" / "eapig_side_by_side"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)

    rows = write_pairs(out / "pairs.jsonl")
    model, hf = load_model(out)
    tokens = model.to_tokens([r["clean"].removeprefix(BOS) for r in rows])
    assert tokens.tolist() == hf_tokens(model, rows), "BOS-prefixed prompts tokenize differently"
    gap = (model(tokens) - hf(tokens).logits).abs().max().item()
    print(f"TransformerLens vs HF logits: max |diff| {gap:.2e}")
    assert gap < 1e-4

    lib = library_half(model, rows, out)
    ps = patchsweep_half(args.patchsweep_python, out / "pairs.jsonl", out)
    ids = [r["id"] for r in rows]
    clean_lib = lib["patching", "full"]
    clean_ps = [ps["pair"]["clean"][i] for i in ids]
    print(f"clean logit_diff: max |patchsweep - EAP-IG full graph| {max_gap(clean_ps, clean_lib):.2e}")
    print(f"{'EAP-IG':16} {'patchsweep':10} {'circuit':9} {'max |diff|':>10}  per pair: EAP-IG / patchsweep")
    compared = [*INTERVENTIONS, ("mean-per-node", "mean-all")]
    for intervention, donor in compared:
        table = {(c, p): v for p, c, v in ps[donor]["rows"]}
        for name in [*CIRCUITS, "empty"]:
            a = lib[intervention, name]
            b = [table[name, i] for i in ids]
            pairs = "  ".join(f"{x:+.4f}/{y:+.4f}" for x, y in zip(a, b))
            print(f"{intervention:16} {donor:10} {name:9} {max_gap(a, b):10.2e}  {pairs}")
        full = lib[intervention, "full"]
        print(
            f"{intervention:16} {'(clean)':10} {'full':9} {max_gap(full, clean_lib):10.2e}  EAP-IG full graph vs clean"
        )
    print("mean-per-node: EAP-IG's 'mean' with each node's own mean over every position (a diagnostic, see docstring)")


def hf_tokens(model: HookedTransformer, rows: list[dict]) -> list[list[int]]:
    return [model.tokenizer(r["clean"]).input_ids for r in rows]


def max_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


if __name__ == "__main__":
    sys.exit(main())
