"""Every supported family beyond GPT-2: tiny random checkpoints (examples/tiny_families.py), every
component, both directions, both exact paths, checked against the plain-PyTorch hook reference;
AtP against autograd; the forward patchsweep rebuilds (its own attention, the suffix recompute)
against the model's own, on prompts longer than Gemma's sliding window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from examples.tiny_families import FAMILIES, build_tiny
from jobs.datasets.ioi import generate_ioi
from jobs.pairfile import encoder_for, parse_record, read_pairs
from tests.conftest import IOI_LINES, OUTPUT_COMPONENTS, TEST_DEVICE, TOL, write_jsonl
from tests.reference import reference_atp
from tests.test_patching import assert_matches_reference, by_cell
from tests.test_paths import assert_paths_match_reference, labelled, paths
from worker.batch.group_read import read_groups
from worker.contract.options import PatchOptions
from worker.contract.receivers import parse_receivers
from worker.kernels.suffix import block_on_suffix, receiving_prefix, suffix_arguments
from worker.methods.registry import patch_batch
from worker.model.attention import reading_patterns
from worker.model.checkpoint import load_tokenizer
from worker.model.load import load_model
from worker.model.sites import blocks, capped, receivers_problem


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, checkpoint dir, nnsight model, Hugging Face model, the IOI pairs in its tokenization)."""
    model_dir = build_tiny(request.param, tmp_path_factory.mktemp(request.param))
    tokenizer, n_ctx = load_tokenizer(str(model_dir))
    records = [dict(zip(("clean", "corrupted", "correct", "incorrect"), line)) for line in IOI_LINES]
    encoder = encoder_for(tokenizer, records)
    pairs = [parse_record(r, str(i), encoder, n_ctx) for i, r in enumerate(records)]
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return request.param, model_dir, load_model(str(model_dir), device=TEST_DEVICE), hf_model, pairs


def test_patchsweeps_forward_equals_the_models_own(family):
    """The whole forward with patchsweep's attention (which soft-caps scores where the model does)
    equals transformers' eager forward; and the suffix recompute (every block on positions t..,
    over the cached keys and values of 0..t-1, each layer's own mask and rotary positions) gives
    the same last stream as the whole forward from every t, on prompts longer than a sliding window."""
    name, _, model, hf_model, pairs = family
    config = hf_model.config
    window = getattr(config, "sliding_window", None) if name.startswith("gemma") else None
    assert window is None or min(p.n_tokens for p in pairs) > window
    ids = torch.tensor([list(pairs[0].clean_ids)])  # the receiving run of `noise`
    with reading_patterns(model, True), torch.no_grad():
        ours = model._module(ids).logits
    hf_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            theirs = hf_model(ids).logits
    finally:
        hf_model.set_attn_implementation(config._attn_implementation)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    read = next(read_groups(model, pairs[:1], PatchOptions(("resid",), direction="noise"), ("resid",)))
    receiving = read.donors.rows.receiving_rows(torch.tensor([0]))
    whole = read.acts.resid[-1][receiving, -1]
    for start in range(pairs[0].n_tokens):
        hidden = read.acts.resid[0][receiving, start:]
        arguments = suffix_arguments(model, start, hidden)
        for layer, block in enumerate(blocks(model)):
            prefix = receiving_prefix(read, layer, torch.tensor([0]), start)
            hidden = block_on_suffix(model, block, hidden, *prefix, arguments[layer])
        torch.testing.assert_close(hidden[:, -1], whole, rtol=1e-4, atol=1e-5 * whole.abs().max())
    if getattr(config, "final_logit_softcapping", None):  # the logits the metric reads are the model's own
        assert theirs.abs().max() < config.final_logit_softcapping
        unembedded = hf_model.lm_head(hf_model.model.norm(whole))
        torch.testing.assert_close(capped(model, unembedded), theirs[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["trace", "reuse"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_every_component_matches_hook_reference(family, direction, path):
    _, _, model, hf_model, pairs = family
    result = patch_batch(model, pairs, OUTPUT_COMPONENTS, direction, max_batch_tokens=40 * 16, exact_path=path)
    config = hf_model.config
    assert result.effects.num_rows == sum(p.n_tokens for p in pairs) * config.num_hidden_layers * (
        3 + config.num_attention_heads
    )
    assert_matches_reference(result, hf_model, pairs, direction, min_gap=0.05)


@pytest.mark.parametrize("path", ["trace", "reuse"])
def test_zero_ablation_matches_hook_reference(family, path):
    """Zeros at every cell (the fast path then recomputes from the first token, through the
    family's own blocks, rotary positions and parallel residual where it has them)."""
    _, _, model, hf_model, pairs = family
    result = patch_batch(model, pairs, OUTPUT_COMPONENTS, "noise", 40 * 16, exact_path=path, donor="zero")
    assert_matches_reference(result, hf_model, pairs, "noise", min_gap=0.05, donor="zero")


@pytest.mark.parametrize("path", ["trace", "reuse"])
@pytest.mark.parametrize("metric", ["kl", "logprob"])
def test_metrics_and_all_positions_match_hook_reference(family, metric, path):
    _, _, model, hf_model, pairs = family
    result = patch_batch(
        model, pairs, ["resid", "attn", "head"], "noise", positions="all", metric=metric, exact_path=path
    )
    # some random-model pairs barely differ in distribution (KL 0.002): their values are the test
    assert_matches_reference(result, hf_model, pairs, "noise", all_positions=True, min_gap=0)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_atp_matches_autograd_reference(family, direction):
    _, _, model, hf_model, pairs = family
    result = patch_batch(model, pairs, OUTPUT_COMPONENTS, direction, method="atp")
    baselines = {r["pair_id"]: (r["clean_logit_diff"], r["corrupted_logit_diff"]) for r in result.pairs.to_pylist()}
    estimates = by_cell(result.effects, "estimate")
    for pair in pairs:
        clean, corrupted = baselines[pair.pair_id]
        source, target = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
        for (component, layer, position, head), want in reference_atp(
            hf_model, pair, OUTPUT_COMPONENTS, direction
        ).items():
            got = estimates[(pair.pair_id, component, layer, position, head)] * (source - target) + target
            assert got == pytest.approx(want, rel=1e-4, abs=TOL), (component, layer, position, head)


def test_bfloat16_follows_float32(family):
    """bfloat16 keeps about 3 significant digits, and these random models' activations are large
    (initialised wide on purpose), so values move by up to ~10%: they must still track float32."""
    _, model_dir, model, _, pairs = family
    half = load_model(str(model_dir), device="cpu", dtype="bfloat16")
    full = patch_batch(model, pairs, ["resid", "head"]).effects.column("logit_diff").to_numpy()
    low = patch_batch(half, pairs, ["resid", "head"]).effects.column("logit_diff").to_numpy()
    assert np.isfinite(low).all() and np.corrcoef(full, low)[0, 1] > 0.99


def test_make_ioi_names_are_one_token_with_the_familys_tokenizer(family, tmp_path):
    _, model_dir, _, _, _ = family
    tokenizer, n_ctx = load_tokenizer(str(model_dir))
    records = generate_ioi(20, seed=0, tokenizer=tokenizer)
    pair_file = read_pairs(write_jsonl(tmp_path / "ioi.jsonl", records), tokenizer, n_ctx)
    assert pair_file.invalid == [] and len(pair_file.pairs) == 20
    for record, pair in zip(records, pair_file.pairs):
        labels = record["labels"]
        assert pair.tokens[labels.index("IO")] == "␣" + record["correct"].strip()
        assert pair.tokens[labels.index("S2")] == "␣" + record["incorrect"].strip()


def test_driver_runs_a_llama_checkpoint_end_to_end(tmp_path):
    """make-ioi with Llama's SentencePiece-style tokenizer, then the driver, as a user would."""
    import json
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from tests.conftest import REPO

    model_dir = build_tiny("llama", tmp_path / "llama")

    def driver(*args):
        return subprocess.run(
            [sys.executable, str(REPO / "driver.py"), *map(str, args)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert driver("make-ioi", "--n", 12, "--out", tmp_path / "ioi.jsonl", "--model", model_dir).returncode == 0
    done = driver(
        "--pairs",
        tmp_path / "ioi.jsonl",
        "--model",
        model_dir,
        "--out",
        tmp_path / "run",
        "--components",
        "resid,head",
        "--positions",
        "S2,END",
    )
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(tmp_path / "run" / "effects").num_rows
    assert rows == 12 * 2 * 3 * (1 + 4)  # pairs x positions x layers x (resid + 4 query heads)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["model"] == str(model_dir)
    tokens = pq.read_table(tmp_path / "run" / "pairs.parquet").column("tokens").to_pylist()[0]
    assert tokens[0] == "<s>" and "␣gave" in tokens


def test_driver_finds_and_evaluates_circuits_on_a_gemma2_checkpoint(tmp_path):
    """make-ioi with Gemma's tokenizer, then `find-circuits` as a user runs it (in process): EAP-IG
    over the post-norm graph, circuits at MIB's budgets, each evaluated on every pair; the whole
    graph keeps the whole behaviour (faithfulness 1: every edge ablated is the corrupted run, none
    the clean one), in EAP-IG's graph JSON."""
    import json

    import pyarrow.parquet as pq

    from tests.test_driver import run_driver

    model_dir = build_tiny("gemma2", tmp_path / "gemma2")
    made = run_driver("make-ioi", "--n", 8, "--out", tmp_path / "ioi.jsonl", "--model", model_dir)
    assert made.returncode == 0, made.stderr
    out = tmp_path / "circuits"
    done = run_driver("find-circuits", "--pairs", tmp_path / "ioi.jsonl", "--model", model_dir, "--out", out)
    assert done.returncode == 0, done.stderr
    aggregate = pq.read_table(out / "evaluation" / "aggregate.parquet").to_pylist()
    whole = max(aggregate, key=lambda row: row["edges"])
    assert whole["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    saved = json.loads(next((out / "evaluation" / "circuits").glob("*.json")).read_text())
    assert saved["cfg"]["n_layers"] == 3 and saved["cfg"]["n_heads"] == 4


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_paths_match_hook_reference(family, direction):
    """Logits and query receivers on every family; keys and values where each head has its own
    (GPT-NeoX); with grouped-query attention a k or v receiver is refused in one line."""
    name, _, model, hf_model, pairs = family
    receivers = ["logits", "1.0:q,2.3:q@END"] + (["1.1:k,2.2:v"] if name == "gpt_neox" else [])
    pairs = labelled(pairs)
    result = paths(model, pairs, receivers, direction, max_batch_tokens=40 * 4)
    for receiver in receivers:
        assert_paths_match_reference(result, hf_model, pairs, receiver, direction, True, min_gap=0.05)
    if name != "gpt_neox":
        problem = receivers_problem(model, parse_receivers(["1.1:k"]))
        assert "share each key/value head" in problem and "\n" not in problem
