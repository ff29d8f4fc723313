"""The greater-than generator, its answer sets under every metric, and the driver on it."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from transformers import GPT2LMHeadModel

from examples.tiny_gpt2 import YEAR_TOKENS, build_tiny_gpt2
from jobs.datasets.greater_than import generate_greater_than
from jobs.pairfile import read_pairs
from tests.conftest import REPO
from tests.test_patching import assert_matches_reference
from worker.contract.options import PatchOptions
from worker.methods.registry import patch_batch
from worker.model.checkpoint import load_tokenizer
from worker.model.load import load_model

YEARS = [f"{y:02d}" for y in range(100)]


@pytest.fixture(scope="module")
def years_model_dir(tmp_path_factory):
    """The tiny random GPT-2 with the century and every two-digit year as whole tokens."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-years"), extra_tokens=YEAR_TOKENS)


@pytest.fixture(scope="module")
def years_pairs(tmp_path_factory, years_model_dir):
    tokenizer, n_ctx = load_tokenizer(str(years_model_dir))
    records = generate_greater_than(6, seed=1, tokenizer=tokenizer)
    path = tmp_path_factory.mktemp("gt") / "gt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records, read_pairs(path, tokenizer, n_ctx, PatchOptions(metric="prob_diff", positions="YY,END"))


def test_pairs_have_year_answer_sets_and_labels(years_model_dir, years_pairs):
    tokenizer, _ = load_tokenizer(str(years_model_dir))
    _, records, pair_file = years_pairs
    assert pair_file.invalid == [] and len(pair_file.pairs) == 6
    for record, pair in zip(records, pair_file.pairs):
        year = f"{record['year']:02d}"
        assert record["clean"] == f"The {record['noun']} lasted from the year 17{year} to the year 17"
        assert record["corrupted"] == record["clean"].replace(f"17{year}", "1701", 1)
        assert list(pair.correct) == [y for y in YEARS if y > year] and list(pair.incorrect) == YEARS[: int(year) + 1]
        labels = record["labels"]
        at_year = labels.index("YY")
        assert tokenizer.decode([pair.clean_ids[at_year]]) == year
        assert tokenizer.decode([pair.corrupted_ids[at_year]]) == "01"
        assert [i for i, (a, b) in enumerate(zip(pair.clean_ids, pair.corrupted_ids)) if a != b] == [at_year]
        assert labels[at_year - 1] == "XX1" and labels[-1] == "END" and labels.count("YY") == 1
        assert tokenizer.decode([pair.clean_ids[-1]]).strip() == "17"


def test_a_tokenizer_without_one_token_years_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="only 0 of the 100 two-digit years are one token"):
        generate_greater_than(3, 0, load_tokenizer(str(tiny_model_dir))[0])
    failed = subprocess.run(
        [
            sys.executable,
            str(REPO / "driver.py"),
            "make-greater-than",
            "--n",
            "3",
            "--out",
            str(tmp_path / "gt.jsonl"),
            "--model",
            str(tiny_model_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith("error: only 0 of the 100 two-digit years are one token for this tokenizer")


@pytest.mark.parametrize("path", ["trace", "reuse"])
@pytest.mark.parametrize("metric", ["prob_diff", "logit_diff"])
def test_year_sets_match_hook_reference(years_model_dir, years_pairs, metric, path):
    pairs = years_pairs[2].pairs
    result = patch_batch(
        load_model(str(years_model_dir), device="cpu"), pairs, ["resid", "head"], exact_path=path, metric=metric
    )
    # a random model barely tells the years apart (gaps of 0.005 in prob_diff): the values are the test here
    assert_matches_reference(
        result, GPT2LMHeadModel.from_pretrained(years_model_dir).eval(), pairs, "denoise", min_gap=0
    )


def test_driver_runs_greater_than_with_prob_diff(tmp_path):
    """The README's commands, on the bundled tiny model whose years are tokens."""
    years_model_dir = REPO / "examples" / "tiny-years-gpt2"

    def driver(*args):
        return subprocess.run(
            [sys.executable, str(REPO / "driver.py"), *map(str, args)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )

    made = driver(
        "make-greater-than", "--n", 8, "--seed", 0, "--out", tmp_path / "gt.jsonl", "--model", years_model_dir
    )
    assert made.returncode == 0, made.stderr
    assert made.stderr.strip() == f"wrote 8 greater-than pairs to {tmp_path / 'gt.jsonl'}"
    out = tmp_path / "run"
    done = driver(
        "--pairs",
        tmp_path / "gt.jsonl",
        "--model",
        years_model_dir,
        "--out",
        out,
        "--metric",
        "prob_diff",
        "--components",
        "resid",
        "--positions",
        "YY,END",
    )
    assert done.returncode == 0, done.stderr
    effects, pairs = pq.read_table(out / "effects"), pq.read_table(out / "pairs.parquet")
    assert "prob_diff" in effects.column_names and "logit_diff" not in effects.column_names
    assert {"clean_prob_diff", "corrupted_prob_diff"} <= set(pairs.column_names)
    assert effects.schema.metadata[b"patchsweep.metric"] == b"prob_diff"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metric"] == manifest["config"]["metric"] == "prob_diff"
    assert effects.num_rows == 8 * 2 * 3  # two labelled positions, three layers
    assert "(denoise, prob_diff): resid" in (out / "report.html").read_text()
