"""The bundled toy IOI model: it does the task, and patching shows the IOI shape (S2 early, END late)."""
from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GPT2LMHeadModel

from examples.toy_ioi.train import HELD_OUT_TEMPLATES, evaluate
from jobs.results.query import query
from tests.conftest import REPO

TOY_MODEL = REPO / "examples" / "toy-ioi-gpt2"
IOI_PAIRS = REPO / "examples" / "ioi_pairs.jsonl"


def test_toy_model_does_ioi_on_held_out_templates():
    model = GPT2LMHeadModel.from_pretrained(TOY_MODEL).eval()
    metrics = evaluate(model, AutoTokenizer.from_pretrained(TOY_MODEL), HELD_OUT_TEMPLATES, n=300)
    assert metrics["mean_logit_diff"] > 2
    assert metrics["accuracy"] > 0.95


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ioi") / "run"
    done = subprocess.run([sys.executable, str(REPO / "driver.py"), "--pairs", str(IOI_PAIRS),
                           "--model", str(TOY_MODEL), "--out", str(out), "--components", "resid"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def test_resid_patching_moves_from_s2_to_end(bundled_run):
    rows = query(str(bundled_run), "SELECT layer, label, mean_score FROM aggregate "
                                   "WHERE component = 'resid' ORDER BY layer").to_pylist()
    by_layer = defaultdict(dict)
    for row in rows:
        by_layer[row["layer"]][row["label"]] = row["mean_score"]
    argmax = [max(scores, key=scores.get) for _, scores in sorted(by_layer.items())]
    assert argmax[0] == "S2" and argmax[-1] == "END"
    switch = argmax.index("END")
    assert set(argmax[:switch]) == {"S2"} and set(argmax[switch:]) == {"END"}
    assert by_layer[0]["S2"] > 0.5 and by_layer[len(argmax) - 1]["END"] > 0.9
