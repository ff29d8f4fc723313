"""The bundled toy IOI model: it does the task, and AtP ranks its cells as exact patching does.

(That patching it shows the IOI shape, S2 early and END late, is checked on the README's own run:
tests/test_readme.py.)"""

from __future__ import annotations

from transformers import AutoTokenizer, GPT2LMHeadModel

from examples.toy_ioi.train import HELD_OUT_TEMPLATES, evaluate
from tests.conftest import REPO, TEST_DEVICE

TOY_MODEL = REPO / "examples" / "toy-ioi-gpt2"
IOI_PAIRS = REPO / "examples" / "ioi_pairs.jsonl"


def test_toy_model_does_ioi_on_held_out_templates():
    model = GPT2LMHeadModel.from_pretrained(TOY_MODEL).eval()
    metrics = evaluate(model, AutoTokenizer.from_pretrained(TOY_MODEL), HELD_OUT_TEMPLATES, n=300)
    assert metrics["mean_logit_diff"] > 2
    assert metrics["accuracy"] > 0.95


def test_atp_ranks_the_cells_exact_patching_ranks_highest_near_the_top():
    """On the toy IOI model (measured with 200 pairs, bench/atp_quality.py: Spearman 0.89 for
    resid and 0.90 for attn over every cell; 97% and 98% of each pair's exact top 10 in AtP's
    top 10), checked here on 40 pairs with bounds well below those numbers."""
    from jobs.pairfile import read_pairs
    from worker.methods.registry import patch_batch
    from worker.model.checkpoint import load_tokenizer
    from worker.model.load import load_model

    pairs = read_pairs(IOI_PAIRS, *load_tokenizer(str(TOY_MODEL))).pairs[:40]
    model = load_model(str(TOY_MODEL), device=TEST_DEVICE)
    exact = patch_batch(model, pairs, ["resid", "attn"]).effects.to_pandas()
    exact["estimate"] = patch_batch(model, pairs, ["resid", "attn"], method="atp").effects.column("estimate").to_numpy()
    for component, rows in exact.groupby("component"):
        assert rows.score.rank().corr(rows.estimate.rank()) > 0.75, component
        shares = [
            len(set(cells.score.abs().nlargest(10).index) & set(cells.estimate.abs().nlargest(10).index)) / 10
            for _, cells in rows.groupby("pair_id")
        ]
        assert sum(shares) / len(shares) > 0.8, component
