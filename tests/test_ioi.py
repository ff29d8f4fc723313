"""The IOI generator: roles, labels, lengths and determinism."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.datasets.ioi import BABA_TEMPLATES, generate_ioi, single_token_names, templates
from jobs.pairfile import read_pairs
from jobs.tokens import decoded_pieces, readable
from tests.conftest import REPO, write_jsonl


def test_fifteen_templates_in_both_orders():
    found = templates()
    assert len(BABA_TEMPLATES) == 15 and len(found) == 30
    assert {t.order for t in found} == {"ABBA", "BABA"}


@pytest.mark.parametrize("corruption", ["swap", "abc"])
def test_pairs_have_roles_labels_and_equal_lengths(tmp_path, tokenizer_and_ctx, corruption):
    tokenizer, n_ctx = tokenizer_and_ctx
    records = generate_ioi(60, seed=3, tokenizer=tokenizer, corruption=corruption)
    assert len(records) == 60 and len({r["id"] for r in records}) == 60
    pair_file = read_pairs(write_jsonl(tmp_path / "ioi.jsonl", records), tokenizer, n_ctx)
    assert pair_file.invalid == []
    names = {" " + n for n in single_token_names(tokenizer)}
    for record, pair in zip(records, pair_file.pairs):
        io, s = record["correct"], record["incorrect"]
        assert io in names and s in names and io != s
        words = decoded_pieces(tokenizer, pair.clean_ids)
        assert list(pair.tokens) == [readable(word) for word in words]
        labels = record["labels"]
        assert words.count(io) == 1 and words.count(s) == 2
        assert words[labels.index("IO")] == io
        assert words[labels.index("S1")] == s and words[labels.index("S2")] == s
        assert labels.index("S1") < labels.index("S2") and labels[-1] == "END"
        assert labels[labels.index("S1") + 1] == "S1+1"
        corrupted = decoded_pieces(tokenizer, pair.corrupted_ids)
        s2 = labels.index("S2")
        if corruption == "swap":
            assert corrupted[s2] == io and corrupted[:s2] == words[:s2]
        else:
            assert io not in corrupted and s not in corrupted
    assert {r["order"] for r in records} == {"ABBA", "BABA"}
    assert len({r["template"] for r in records}) == 15


def test_same_seed_same_file_through_the_cli_in_any_folder(tmp_path, tiny_model_dir):
    def make(seed: int, name: str) -> bytes:
        out = tmp_path / name
        subprocess.run(
            [
                sys.executable,
                str(REPO / "driver.py"),
                "make-ioi",
                "--n",
                "40",
                "--seed",
                str(seed),
                "--out",
                str(out),
                "--model",
                str(tiny_model_dir),
            ],
            check=True,
            capture_output=True,
        )
        return out.read_bytes()

    assert make(7, "a.jsonl") == make(7, "new/folders/b.jsonl")  # the file's folders are made
    assert make(7, "a.jsonl") != make(8, "c.jsonl")


def test_names_that_are_not_one_token_are_dropped(tokenizer_and_ctx):
    tokenizer, _ = tokenizer_and_ctx
    kept = single_token_names(tokenizer, ["John", "Mary", "Bartholomew"])
    assert kept == ["John", "Mary"]
