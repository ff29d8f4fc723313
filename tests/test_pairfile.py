"""Pair file validation: every rule of DESIGN.md, reported as FILE:LINE: reason."""

from __future__ import annotations

from collections import Counter

import pytest

from jobs.pairfile import PairFileError, read_pairs
from tests.conftest import IOI_LINES, write_jsonl
from worker.contract.options import PatchOptions

CLEAN, CORRUPTED, CORRECT, INCORRECT = IOI_LINES[0]
GOOD = {"clean": CLEAN, "corrupted": CORRUPTED, "correct": CORRECT, "incorrect": INCORRECT}


def validate(tmp_path, tokenizer_and_ctx, records):
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    return path, read_pairs(path, *tokenizer_and_ctx)


def test_good_lines_become_pairs_with_metadata(tmp_path, tokenizer_and_ctx):
    tokenizer, _ = tokenizer_and_ctx
    john = tokenizer(" John").input_ids[0]
    records = [
        {**GOOD, "template": "t0", "weight": 2},
        "",
        {**GOOD, "id": "b", "correct": john, "incorrect": " Mary"},
    ]
    _, result = validate(tmp_path, tokenizer_and_ctx, records)
    assert result.invalid == []
    first, second = result.pairs
    assert first.pair_id == "0" and first.metadata == {"template": "t0", "weight": 2}
    assert second.pair_id == "b" and second.correct_ids == (john,) and second.correct == (" John",)
    assert first.n_tokens == len(tokenizer(CLEAN).input_ids)
    assert first.tokens[:3] == ("When", "␣John", "␣and")  # decoded text, not byte-level pieces (ĠJohn)


def test_batched_encoding_equals_one_call_per_string(tmp_path, tokenizer_and_ctx):
    tokenizer, _ = tokenizer_and_ctx
    records = [dict(zip(("clean", "corrupted", "correct", "incorrect"), line)) for line in IOI_LINES]
    _, result = validate(tmp_path, tokenizer_and_ctx, records)
    for pair, (clean, corrupted, correct, incorrect) in zip(result.pairs, IOI_LINES, strict=True):
        assert list(pair.clean_ids) == tokenizer(clean).input_ids
        assert list(pair.corrupted_ids) == tokenizer(corrupted).input_ids
        assert pair.correct_ids == tuple(tokenizer(correct, add_special_tokens=False).input_ids)
        assert pair.incorrect_ids == tuple(tokenizer(incorrect, add_special_tokens=False).input_ids)


@pytest.mark.parametrize(
    "record, reason",
    [
        ('{"clean": "x",', "not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"clean": CLEAN, "corrupted": CORRUPTED}, "missing keys 'correct', 'incorrect'"),
        ({**GOOD, "correct": " John Mary"}, "is 2 tokens"),
        ({**GOOD, "correct": ""}, "is 0 tokens"),
        ({**GOOD, "incorrect": 10**9}, "outside the vocabulary"),
        ({**GOOD, "incorrect": 1.5}, "must be a string or a token id"),
        ({**GOOD, "corrupted": CORRUPTED + " Mary"}, "lengths 14 vs 15"),
        ({**GOOD, "corrupted": CLEAN}, "tokenize identically"),
        ({**GOOD, "clean": ""}, "'clean' must be a non-empty string"),
        ({**GOOD, "incorrect": " John"}, "' John' is in both 'correct' and 'incorrect'"),
        ({**GOOD, "correct": []}, "'correct' is an empty list"),
        ({**GOOD, "correct": [" John", " Tom Anna"]}, "'correct' answer ' Tom Anna' is 2 tokens"),
        ({**GOOD, "incorrect": [" Mary", " Tom", " Mary"]}, "'incorrect' has the answer ' Mary' twice"),
        ({**GOOD, "incorrect": [" Mary", " Tom", " John", " Anna"]}, "' John' is in both"),
        (
            {k: v for k, v in GOOD.items() if k != "incorrect"},
            "missing key 'incorrect' (the logit_diff metric needs it)",
        ),
        ({**GOOD, "labels": ["a", "b"]}, "'labels' has 2 entries but the prompt has 14 tokens"),
        ({**GOOD, "labels": "S1"}, "list of strings"),
        ({**GOOD, "id": [1]}, "'id' must be a string"),
        ({**GOOD, "template": {"a": 1}}, "must be a scalar"),
        ({**GOOD, "tokens": "x"}, "clashes with an output column"),
    ],
)
def test_each_bad_rule_names_file_and_line(tmp_path, tokenizer_and_ctx, record, reason):
    path, result = validate(tmp_path, tokenizer_and_ctx, [GOOD, GOOD | {"id": "x"}, record])
    assert len(result.pairs) == 2
    (bad,) = result.invalid
    assert str(bad).startswith(f"{path}:3: ")
    assert reason in str(bad)
    assert "\n" not in str(bad)


def test_prompt_longer_than_context(tmp_path, tokenizer_and_ctx):
    tokenizer, _ = tokenizer_and_ctx
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD])
    (bad,) = read_pairs(path, tokenizer, n_ctx=10).invalid
    assert str(bad) == f"{path}:1: prompt is 14 tokens, longer than the model's context of 10"


def test_duplicate_ids_including_default_ids(tmp_path, tokenizer_and_ctx):
    records = [GOOD, {**GOOD, "id": "0"}, {**GOOD, "id": "k"}, "", {**GOOD, "id": "k"}]
    path, result = validate(tmp_path, tokenizer_and_ctx, records)
    assert [str(e) for e in result.invalid] == [
        f"{path}:2: duplicate id '0' (first on line 1)",
        f"{path}:5: duplicate id 'k' (first on line 3)",
    ]


def test_all_bad_lines_are_reported_with_their_text(tmp_path, tokenizer_and_ctx):
    records = ["nope", GOOD, {**GOOD, "correct": " John Mary"}]
    _, result = validate(tmp_path, tokenizer_and_ctx, records)
    assert (result.invalid[0].line, result.invalid[0].text) == (1, "nope")
    assert [e.line for e in result.invalid] == [1, 3]


def test_non_utf8_line(tmp_path, tokenizer_and_ctx):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"clean": "\xff"}\n')
    (bad,) = read_pairs(path, *tokenizer_and_ctx).invalid
    assert str(bad).startswith(f"{path}:1: not UTF-8")


def test_missing_file_is_one_line_error(tmp_path, tokenizer_and_ctx):
    with pytest.raises(PairFileError, match="cannot read pair file"):
        read_pairs(tmp_path / "absent.jsonl", *tokenizer_and_ctx)


def test_listed_position_labels_must_be_on_every_pair(tmp_path, tokenizer_and_ctx):
    tokenizer, n_ctx = tokenizer_and_ctx
    n = len(tokenizer(CLEAN).input_ids)
    labels = ["x"] * (n - 2) + ["S2", "END"]
    records = [
        {**GOOD, "id": "a", "labels": labels},
        {**GOOD, "id": "b"},
        {**GOOD, "id": "c", "labels": ["x"] * (n - 1) + ["END"]},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    result = read_pairs(path, tokenizer, n_ctx, PatchOptions(positions="S2,END"))
    assert [pair.pair_id for pair in result.pairs] == ["a"]
    assert [str(line) for line in result.invalid] == [
        f"{path}:2: no 'labels', which --positions S2,END needs",
        f"{path}:3: no position labelled 'S2' (--positions S2,END)",
    ]
    assert read_pairs(path, tokenizer, n_ctx).invalid == []  # labels are optional otherwise


@pytest.mark.parametrize(
    "labelled, message",
    [
        (True, "--positions lists 'S3', which no line has (its labels: END, S2, x)"),
        (False, "--positions S3 selects positions by label, but no line has 'labels'"),
    ],
)
def test_a_label_no_line_has_is_one_error_for_the_file(tmp_path, tokenizer_and_ctx, labelled, message):
    tokenizer, n_ctx = tokenizer_and_ctx
    n = len(tokenizer(CLEAN).input_ids)
    record = {**GOOD, "labels": ["x"] * (n - 2) + ["S2", "END"]} if labelled else GOOD
    path = write_jsonl(tmp_path / "pairs.jsonl", [record])
    with pytest.raises(PairFileError) as error:
        read_pairs(path, tokenizer, n_ctx, PatchOptions(positions="S3"))
    assert str(error.value) == f"{path}: {message}"


def test_answer_sets_of_strings_and_ids(tmp_path, tokenizer_and_ctx):
    tokenizer, _ = tokenizer_and_ctx
    tom = tokenizer(" Tom").input_ids[0]
    _, result = validate(tmp_path, tokenizer_and_ctx, [{**GOOD, "correct": [" John", tom], "incorrect": [" Mary"]}])
    (pair,) = result.pairs
    assert pair.correct == (" John", " Tom") and pair.correct_ids == (tokenizer(" John").input_ids[0], tom)
    assert pair.incorrect == (" Mary",)


@pytest.mark.parametrize(
    "metric, needed", [("logit_diff", True), ("prob_diff", True), ("logprob", False), ("kl", False)]
)
def test_incorrect_is_needed_only_by_metrics_that_compare(tmp_path, tokenizer_and_ctx, metric, needed):
    tokenizer, n_ctx = tokenizer_and_ctx
    path = write_jsonl(tmp_path / "pairs.jsonl", [{k: v for k, v in GOOD.items() if k != "incorrect"}])
    result = read_pairs(path, tokenizer, n_ctx, PatchOptions(metric=metric))
    if needed:
        assert [str(line) for line in result.invalid] == [
            f"{path}:1: missing key 'incorrect' (the {metric} metric needs it)"
        ]
    else:
        assert result.invalid == [] and result.pairs[0].incorrect_ids == ()


@pytest.mark.parametrize("kind", ["gzip", "zstd", "parquet"])
def test_compressed_and_parquet_pair_files_read_like_jsonl(tmp_path, tokenizer_and_ctx, kind):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    tokenizer, n_ctx = tokenizer_and_ctx
    n = len(tokenizer(CLEAN).input_ids)
    records = [
        {**GOOD, "id": "a", "labels": ["x"] * n, "template": "t0"},
        {**GOOD, "id": "b", "correct": [" John"]},
        {**GOOD, "id": "c", "correct": " Tom Anna"},
    ]
    plain = read_pairs(write_jsonl(tmp_path / "pairs.jsonl", records), tokenizer, n_ctx)
    text = (tmp_path / "pairs.jsonl").read_bytes()
    path = tmp_path / f"pairs.{kind}"
    if kind == "gzip":
        path.write_bytes(gzip.compress(text))
    elif kind == "zstd":
        path.write_bytes(zstandard.ZstdCompressor().compress(text))
    else:
        rows = [{**r, "correct": r["correct"] if isinstance(r["correct"], list) else [r["correct"]]} for r in records]
        pq.write_table(pa.Table.from_pylist(rows), path)
    read = read_pairs(path, tokenizer, n_ctx)
    assert [p.pair_id for p in read.pairs] == ["a", "b"] == [p.pair_id for p in plain.pairs]
    assert [(p.clean_ids, p.correct_ids, p.labels, p.metadata) for p in read.pairs] == [
        (p.clean_ids, p.correct_ids, p.labels, p.metadata) for p in plain.pairs
    ]
    (bad,) = read.invalid
    assert str(bad).startswith(f"{path}:3: 'correct' answer ' Tom Anna' is 2 tokens")


def test_a_damaged_compressed_file_is_one_error(tmp_path, tokenizer_and_ctx):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(b"\x1f\x8b" + b"not gzip at all")
    with pytest.raises(PairFileError, match="cannot read pair file: a damaged compressed file"):
        read_pairs(path, *tokenizer_and_ctx)


@pytest.mark.parametrize("kind", ["jsonl", "zstd", "parquet"])
def test_the_streamed_scan_and_read_equal_reading_the_whole_file(tmp_path, tokenizer_and_ctx, monkeypatch, kind):
    """What the driver does (a validating scan keeping counts and bad lines, then a second read
    yielding the good pairs) a few lines at a time equals `read_pairs` on the whole file: the same
    pairs in the same order, the same bad lines, repeated ids found across chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from jobs import pairfile

    tokenizer, n_ctx = tokenizer_and_ctx
    lines = [dict(zip(("clean", "corrupted", "correct", "incorrect"), line)) for line in IOI_LINES]
    records = [{**lines[i % 4], "id": f"p{i % 11}"} for i in range(23)]  # ids repeat from the 12th line on
    records[5] = {**records[5], "correct": " Tom Anna"}
    records[9] = {**records[9], "id": "p2"}
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    if kind == "zstd":
        path = tmp_path / "pairs.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "pairs.jsonl").read_bytes()))
    elif kind == "parquet":
        path = tmp_path / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    whole = read_pairs(path, tokenizer, n_ctx)
    monkeypatch.setattr(pairfile, "CHUNK_LINES", 4)
    scan = pairfile.scan_pairs(path, tokenizer, n_ctx)
    streamed = list(pairfile.stream_pairs(path, tokenizer, n_ctx, PatchOptions(), scan.skipped))
    assert streamed == whole.pairs and len(streamed) == 11
    assert scan.invalid == whole.invalid and len(scan.invalid) == 12
    assert "duplicate id 'p2' (first on line 3)" in str(scan.invalid[1])
    assert scan.lengths == dict(sorted(Counter(p.n_tokens for p in whole.pairs).items()))


def test_ids_that_share_a_hash_are_not_duplicates(tmp_path, tokenizer_and_ctx, monkeypatch):
    """The scan finds repeated ids by a 64-bit hash of each; a collision of two different ids
    (forced here: every id hashes to its length) must not be taken for a repeat, while real
    repeats among them still are, and the counts per length keep every distinct pair."""
    from jobs import pairfile

    tokenizer, n_ctx = tokenizer_and_ctx
    lines = [dict(zip(("clean", "corrupted", "correct", "incorrect"), line)) for line in IOI_LINES]
    ids = ["a1", "b2", "c3", "a1", "dd4", "ee5", "b2"]  # two-letter ids collide with each other, and so on
    path = write_jsonl(tmp_path / "pairs.jsonl", [{**lines[i % 4], "id": pair_id} for i, pair_id in enumerate(ids)])
    whole = read_pairs(path, tokenizer, n_ctx)
    monkeypatch.setattr(pairfile, "id_hash", len)
    scan = pairfile.scan_pairs(path, tokenizer, n_ctx)
    assert [str(bad).split(": ", 1)[1] for bad in scan.invalid] == [
        "duplicate id 'a1' (first on line 1)",
        "duplicate id 'b2' (first on line 2)",
    ]
    assert scan.invalid == whole.invalid
    assert scan.lengths == dict(sorted(Counter(p.n_tokens for p in whole.pairs).items()))
    assert sum(scan.lengths.values()) == 5


def test_resample_pairs_each_pair_with_another_of_its_length_by_seed(tmp_path, tokenizer_and_ctx, monkeypatch):
    """`--donor resample`: a seeded shuffle per token length, read as a cycle: every pair's donor is
    another pair of its length, each pair is somebody's donor once, the donor-side prompt is the
    donor's clean one (denoise) or corrupted one (noise); the streamed read gives what reading
    the whole file gives; another seed, another pairing; a pair alone in its length is a bad line."""
    from jobs import pairfile

    tokenizer, n_ctx = tokenizer_and_ctx
    lines = [dict(zip(("clean", "corrupted", "correct", "incorrect"), line)) for line in IOI_LINES]
    records = [{**lines[i % 3], "id": f"p{i}"} for i in range(9)] + [{**lines[3], "id": "alone"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    by_id = {p.pair_id: p for p in read_pairs(path, tokenizer, n_ctx).pairs}
    pairings = {}
    for direction, seed in (("denoise", 0), ("noise", 0), ("denoise", 1)):
        options = PatchOptions(direction=direction, donor="resample", seed=seed)
        whole = read_pairs(path, tokenizer, n_ctx, options)
        assert [str(bad).split(": ", 1)[1] for bad in whole.invalid] == [
            f"no other pair of its length ({by_id['alone'].n_tokens} tokens) to resample from (--donor resample)"
        ]
        side = "clean_ids" if direction == "denoise" else "corrupted_ids"
        for pair in whole.pairs:
            donor = by_id[pair.donor_pair_id]
            assert donor.pair_id != pair.pair_id and donor.n_tokens == pair.n_tokens
            assert pair.donor_ids == getattr(donor, side)
        assert sorted(p.donor_pair_id for p in whole.pairs) == sorted(p.pair_id for p in whole.pairs)
        monkeypatch.setattr(pairfile, "CHUNK_LINES", 4)
        scan = pairfile.scan_pairs(path, tokenizer, n_ctx, options)
        assert scan.invalid == whole.invalid and sum(scan.lengths.values()) == 9
        assert (
            list(pairfile.stream_pairs(path, tokenizer, n_ctx, options, scan.skipped, scan.resampling)) == whole.pairs
        )
        pairings[(direction, seed)] = [p.donor_pair_id for p in whole.pairs]
    assert pairings[("denoise", 0)] == pairings[("noise", 0)] != pairings[("denoise", 1)]
