"""The pair file (JSONL, gzip- or zstd-compressed JSONL, or Parquet with the same keys as
columns): reading it and validating every line against the model's tokenizer.

Every problem is collected, not raised, so a user sees all bad lines at once as
`FILE:LINE: reason`, and `--skip-invalid` can set them aside with their reasons.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from jobs.tokens import decoded_pieces, readable
from worker.contract.options import NEEDS_INCORRECT, PatchOptions
from worker.contract.pairs import Pair
from worker.contract.storage import opened
from worker.contract.tables import RESULT_COLUMNS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

KNOWN = ("clean", "corrupted", "correct", "incorrect", "id", "labels")


class PairFileError(ValueError):
    """The file itself cannot be read (missing, a directory, ...)."""


class BadPair(ValueError):
    """One line's problem; the message is the reason shown to the user."""


@dataclass(frozen=True)
class InvalidLine:
    path: str
    line: int
    text: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class PairFile:
    pairs: list[Pair]
    invalid: list[InvalidLine]


class Encoder:
    """A tokenizer with a memory of the strings it has encoded and the tokens it has named.

    `encode_all` tokenizes many strings in one batched call, which a fast tokenizer runs
    in parallel (what that saves: docs/PERFORMANCE.md, "Why the code is shaped so").
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.known: dict[tuple[str, bool], list[int]] = {}
        self.token_of: dict[int, str] = {}

    def encode_all(self, texts: Iterable[Any], special_tokens: bool) -> None:
        """Encode every string among `texts` (other values are left to validation)."""
        todo = list({t for t in texts if isinstance(t, str) and (t, special_tokens) not in self.known})
        if todo:
            encoded = self.tokenizer(todo, add_special_tokens=special_tokens).input_ids
            self.known.update(((text, special_tokens), ids) for text, ids in zip(todo, encoded))

    def __call__(self, text: str, special_tokens: bool) -> list[int]:
        if (text, special_tokens) not in self.known:
            self.encode_all([text], special_tokens)
        return self.known[(text, special_tokens)]

    def tokens(self, ids: Sequence[int]) -> tuple[str, ...]:
        """The readable text of each of `ids` (`␣George`), one shared string per vocabulary entry."""
        missing = list({i for i in ids if i not in self.token_of})
        self.token_of.update(zip(missing, map(readable, decoded_pieces(self.tokenizer, missing))))
        return tuple(self.token_of[i] for i in ids)


def answer_token(encoder: Encoder, key: str, value: Any) -> tuple[str, int]:
    """An answer as (text, token id); given either as a one-token string or as a token id."""
    tokenizer = encoder.tokenizer
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadPair(f"{key!r} must be a string or a token id, got {type(value).__name__}")
    if isinstance(value, int):
        if not 0 <= value < len(tokenizer):
            raise BadPair(f"{key!r} token id {value} is outside the vocabulary (0..{len(tokenizer) - 1})")
        return tokenizer.decode([value]), value
    ids = encoder(value, special_tokens=False)
    if len(ids) != 1:
        pieces = list(encoder.tokens(ids))
        raise BadPair(
            f"{key!r} answer {value!r} is {len(ids)} tokens {pieces}, must be exactly one "
            '(a leading space is often part of the token, e.g. " John")'
        )
    return value, ids[0]


def answer_set(encoder: Encoder, key: str, value: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """One answer, or a list of them (each a one-token string or a token id), as texts and ids."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise BadPair(f"{key!r} is an empty list; give at least one answer")
    texts, ids = [], []
    for item in values:
        text, token = answer_token(encoder, key, item)
        if token in ids:
            raise BadPair(f"{key!r} has the answer {text!r} twice")
        texts.append(text)
        ids.append(token)
    return tuple(texts), tuple(ids)


def prompt_ids(encoder: Encoder, key: str, value: Any) -> list[int]:
    if not isinstance(value, str) or not value:
        raise BadPair(f"{key!r} must be a non-empty string")
    return encoder(value, special_tokens=True)


def parse_record(
    record: Any, default_id: str, encoder: Encoder, n_ctx: int, options: PatchOptions = PatchOptions()
) -> Pair:
    """Validate one decoded JSON line and turn it into a tokenized `Pair`, for a run with `options`
    (its metric decides whether `incorrect` is needed, its positions which labels must be there)."""
    if not isinstance(record, dict):
        raise BadPair(f"a line must be a JSON object, got {type(record).__name__}")
    required = ("clean", "corrupted", "correct") + (("incorrect",) if options.metric in NEEDS_INCORRECT else ())
    missing = [key for key in required if key not in record]
    if missing:
        needs = f" (the {options.metric} metric needs it)" if "incorrect" in missing else ""
        raise BadPair(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}{needs}")
    clean_ids = prompt_ids(encoder, "clean", record["clean"])
    corrupted_ids = prompt_ids(encoder, "corrupted", record["corrupted"])
    if len(clean_ids) != len(corrupted_ids):
        raise BadPair(
            f"clean and corrupted must tokenize to the same length: lengths {len(clean_ids)} vs {len(corrupted_ids)}"
        )
    if len(clean_ids) > n_ctx:
        raise BadPair(f"prompt is {len(clean_ids)} tokens, longer than the model's context of {n_ctx}")
    if clean_ids == corrupted_ids:
        raise BadPair("clean and corrupted tokenize identically, so there is nothing to patch")
    correct, correct_ids = answer_set(encoder, "correct", record["correct"])
    incorrect, incorrect_ids = (
        answer_set(encoder, "incorrect", record["incorrect"]) if "incorrect" in record else ((), ())
    )
    both = [text for text, token in zip(correct, correct_ids) if token in incorrect_ids]
    if both:
        raise BadPair(
            f"{', '.join(map(repr, both))} {'is' if len(both) == 1 else 'are'} in both 'correct' and 'incorrect'"
        )
    pair_id = record.get("id", default_id)
    if isinstance(pair_id, bool) or not isinstance(pair_id, (str, int)):
        raise BadPair(f"'id' must be a string, got {type(pair_id).__name__}")
    labels = record.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise BadPair("'labels' must be a list of strings, one per token")
        if len(labels) != len(clean_ids):
            raise BadPair(f"'labels' has {len(labels)} entries but the prompt has {len(clean_ids)} tokens")
    check_wanted_labels(labels, options)
    metadata = {k: v for k, v in record.items() if k not in KNOWN}
    for key, value in metadata.items():
        if key in RESULT_COLUMNS:
            raise BadPair(f"metadata key {key!r} clashes with an output column; rename it")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise BadPair(f"metadata {key!r} must be a scalar (string, number, bool or null)")
    return Pair(
        pair_id=str(pair_id),
        clean=record["clean"],
        corrupted=record["corrupted"],
        correct=correct,
        incorrect=incorrect,
        clean_ids=tuple(clean_ids),
        corrupted_ids=tuple(corrupted_ids),
        correct_ids=correct_ids,
        incorrect_ids=incorrect_ids,
        tokens=encoder.tokens(clean_ids),
        labels=tuple(map(sys.intern, labels)) if labels is not None else None,  # a few distinct labels
        metadata=metadata,
    )


def check_wanted_labels(labels: list[str] | None, options: PatchOptions) -> None:
    for option, wanted in options.wanted_labels():
        if labels is None:
            raise BadPair(f"no 'labels', which {option} {','.join(wanted)} needs")
        missing = [label for label in wanted if label not in labels]
        if missing:
            raise BadPair(f"no position labelled {', '.join(map(repr, missing))} ({option} {','.join(wanted)})")


def check_labels_exist(path: str | Path, known: set[str], options: PatchOptions) -> None:
    """A listed label that no line has (`known`: every line's labels) is a typo in the option, not
    a bad line: one error for the file."""
    for option, wanted in options.wanted_labels():
        if not known:
            raise PairFileError(
                f"{path}: {option} {','.join(wanted)} selects positions by label, but no line has 'labels'"
            )
        unknown = [label for label in wanted if label not in known]
        if unknown:
            raise PairFileError(
                f"{path}: {option} lists {', '.join(map(repr, unknown))}, which no line has "
                f"(its labels: {', '.join(sorted(known))})"
            )


GZIP_MAGIC, ZSTD_MAGIC, PARQUET_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"PAR1"
CHUNK_LINES = 4096  # lines tokenized in one batched call; memory is bounded by a chunk, not the file


def unreadable(path: str | Path, error: Exception) -> PairFileError:
    """One line for a pair file that cannot be read: a missing file or key, a bucket that does not
    answer, credentials it refuses."""
    said = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[0]
    return PairFileError(f"{path}: cannot read pair file: {said}")


def first_bytes(path: str | Path) -> bytes:
    try:
        with opened(str(path)) as handle:
            return handle.read(4)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise unreadable(path, error) from error


def jsonl_lines(path: str | Path, magic: bytes) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line of a JSONL file, read as a stream:
    plain, or gzip- or zstd-compressed (told apart by their first bytes, not the name)."""
    try:
        with opened(str(path)) as raw:
            if magic.startswith(GZIP_MAGIC):
                handle = gzip.GzipFile(fileobj=raw)
            elif magic.startswith(ZSTD_MAGIC):
                handle = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
            else:
                handle = io.BufferedReader(raw)  # an Arrow stream reads lines through a buffer
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, line.rstrip(b"\r\n")
    except (OSError, EOFError, zstandard.ZstdError) as error:
        if magic.startswith((GZIP_MAGIC, ZSTD_MAGIC)):
            raise PairFileError(f"{path}: cannot read pair file: a damaged compressed file ({error})") from error
        raise unreadable(path, error) from error


def decode_line(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        return BadPair(f"not UTF-8 text (byte {error.start})")
    except json.JSONDecodeError as error:
        return BadPair(f"not JSON: {error.msg} (column {error.colno})")


def parquet_rows(path: str | Path) -> Iterator[tuple[int, bytes, Any]]:
    """A Parquet pair file, a batch of rows at a time: one record per row (its 1-based number stands
    for the line), with the JSONL keys as columns; a null is a key the row does not have."""
    number = 0
    try:
        for batch in pq.ParquetFile(opened(str(path), random_access=True)).iter_batches(batch_size=CHUNK_LINES):
            for row in batch.to_pylist():
                number += 1
                record = {key: value for key, value in row.items() if value is not None}
                yield number, json.dumps(record).encode(), record
    except (OSError, pa.ArrowException) as error:
        raise PairFileError(f"{path}: cannot read pair file: {error}") from error


def decoded_lines(path: str | Path) -> Iterator[tuple[int, bytes, Any]]:
    """(line number, raw bytes, the decoded JSON or the `BadPair` saying why it is not), streamed
    from a JSONL file (plain, gzip or zstd) or a Parquet file."""
    magic = first_bytes(path)
    if magic == PARQUET_MAGIC:
        return parquet_rows(path)
    return ((number, raw, decode_line(raw)) for number, raw in jsonl_lines(path, magic))


def encoder_for(tokenizer: PreTrainedTokenizerBase, records: list[Any], encoder: Encoder | None = None) -> Encoder:
    """An encoder that already knows every prompt and answer string of `records` (a fresh one, or
    `encoder` with its remembered strings replaced by these)."""
    objects = [r for r in records if isinstance(r, dict)]
    encoder = encoder or Encoder(tokenizer)
    encoder.known.clear()
    encoder.encode_all((r.get(key) for r in objects for key in ("clean", "corrupted")), special_tokens=True)
    answers = (r.get(key) for r in objects for key in ("correct", "incorrect"))
    encoder.encode_all(
        (a for value in answers for a in (value if isinstance(value, list) else [value])), special_tokens=False
    )
    return encoder


def checked_lines(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, n_ctx: int, options: PatchOptions, labels_seen: set[str]
) -> Iterator[tuple[int, bytes, Pair | InvalidLine]]:
    """Every non-blank line in file order (its number, its bytes), as a `Pair` or the `InvalidLine` saying why not,
    tokenized `CHUNK_LINES` at a time; every label of every line is added to `labels_seen`.
    Duplicate ids are not looked for: that takes the whole file (`read_pairs`, `scan_pairs`)."""
    encoder, lines = None, decoded_lines(path)
    while chunk := list(itertools.islice(lines, CHUNK_LINES)):
        records = [record for _, _, record in chunk]
        labels_seen.update(
            label
            for r in records
            if isinstance(r, dict) and isinstance(r.get("labels"), list)
            for label in r["labels"]
            if isinstance(label, str)
        )
        encoder = encoder_for(tokenizer, records, encoder)
        for number, raw, record in chunk:
            try:
                if isinstance(record, BadPair):
                    raise record
                yield number, raw, parse_record(record, str(number - 1), encoder, n_ctx, options)
            except BadPair as error:
                yield number, raw, InvalidLine(str(path), number, raw.decode("utf-8", errors="replace"), str(error))


def read_pairs(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, n_ctx: int, options: PatchOptions = PatchOptions()
) -> PairFile:
    """Validate every line of `path` for a run with `options` and keep the result in memory: good
    lines become pairs, bad ones `InvalidLine`s. (The driver streams instead: `scan_pairs`, `stream_pairs`.)"""
    pairs, invalid, first_line_of, labels_seen = [], [], {}, set()
    for number, raw, checked in checked_lines(path, tokenizer, n_ctx, options, labels_seen):
        if isinstance(checked, Pair) and checked.pair_id in first_line_of:
            checked = duplicate(path, number, raw, checked, first_line_of[checked.pair_id])
        if isinstance(checked, InvalidLine):
            invalid.append(checked)
            continue
        first_line_of[checked.pair_id] = number
        pairs.append(checked)
    check_labels_exist(path, labels_seen, options)
    if options.donor == "resample":
        resampling = Resampling(options.direction, options.seed)
        for pair in pairs:
            resampling.add(first_line_of[pair.pair_id], pair)
        alone = resampling.pair_up(set())
        invalid = sorted(invalid + alone_in_length(path, alone), key=lambda bad: bad.line)
        pairs = [resampling.donate(p, first_line_of[p.pair_id]) for p in pairs if first_line_of[p.pair_id] not in alone]
    return PairFile(pairs, invalid)


def duplicate(path: str | Path, number: int, raw: bytes, pair: Pair, first: int) -> InvalidLine:
    return InvalidLine(
        str(path),
        number,
        raw.decode("utf-8", errors="replace"),
        f"duplicate id {pair.pair_id!r} (first on line {first})",
    )


class Resampling:
    """`--donor resample`: each good pair's donor is another good pair of its token length. Each
    length's pairs, in file order, are shuffled by `seed` and read as a cycle: each pair takes
    the next one's donor-side prompt (clean when denoising, corrupted when noising). So the same
    file, direction and seed give the same donors however the run is sharded, read or resumed.

    Collected during the scan: each good pair's line, id and donor-side token ids (4 bytes a
    token plus the id), the one thing a streamed run keeps that grows with the file."""

    def __init__(self, direction: str, seed: int) -> None:
        self.side, self.seed = (0 if direction == "denoise" else 1), seed
        self.lines: dict[int, array] = {}
        self.pair_ids: dict[int, list[str]] = {}
        self.prompts: dict[int, array] = {}
        self.donor: dict[int, np.ndarray] = {}

    def add(self, line: int, pair: Pair) -> None:
        length = pair.n_tokens
        self.lines.setdefault(length, array("q")).append(line)
        self.pair_ids.setdefault(length, []).append(pair.pair_id)
        self.prompts.setdefault(length, array("i")).extend((pair.clean_ids, pair.corrupted_ids)[self.side])

    def pair_up(self, dropped: set[int]) -> dict[int, int]:
        """Leave out the `dropped` lines (repeated ids), pair the rest, and return the lines that
        are alone in their length (with that length), which cannot be resampled."""
        alone = {}
        for length in list(self.lines):
            lines = np.frombuffer(self.lines[length], np.int64)
            keep = ~np.isin(lines, list(dropped))
            if keep.sum() == 1:
                alone[int(lines[keep][0])] = length
                keep[:] = False
            prompts = np.frombuffer(self.prompts[length], np.int32).reshape(len(lines), length)[keep]
            self.lines[length], self.prompts[length] = lines[keep], prompts
            self.pair_ids[length] = [pair_id for pair_id, kept in zip(self.pair_ids[length], keep) if kept]
            order = np.random.default_rng([self.seed, length]).permutation(int(keep.sum()))
            self.donor[length] = np.empty_like(order)
            self.donor[length][order] = np.roll(order, -1)
        return alone

    def donate(self, pair: Pair, line: int) -> Pair:
        """`pair` (on `line`) with its donor's id and donor-side prompt."""
        length = pair.n_tokens
        donor = self.donor[length][np.searchsorted(self.lines[length], line)]
        return dataclasses.replace(
            pair, donor_pair_id=self.pair_ids[length][donor], donor_ids=tuple(self.prompts[length][donor].tolist())
        )


def alone_in_length(path: str | Path, alone: dict[int, int]) -> list[InvalidLine]:
    """The bad lines of pairs with no other pair of their token length (`alone`: line -> length)
    to resample from (read again: the rare case pays for a second look)."""
    reason = "no other pair of its length ({} tokens) to resample from (--donor resample)"
    return (
        [
            InvalidLine(str(path), number, raw.decode("utf-8", errors="replace"), reason.format(alone[number]))
            for number, raw, _ in decoded_lines(path)
            if number in alone
        ]
        if alone
        else []
    )


@dataclass(frozen=True)
class FileScan:
    """What the driver keeps of a validated pair file: the bad lines, and how many good pairs
    there are of each token length (enough to plan every shard); not the pairs (except, for
    `--donor resample`, their donor-side prompts: `Resampling`)."""

    invalid: list[InvalidLine]
    lengths: dict[int, int]
    resampling: Resampling | None = None

    @property
    def skipped(self) -> set[int]:
        return {bad.line for bad in self.invalid}


def scan_pairs(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, n_ctx: int, options: PatchOptions = PatchOptions()
) -> FileScan:
    """Validate every line of `path` as `read_pairs` does, in memory that does not grow with the
    file's pairs: each pair is dropped once counted, and ids are checked for repeats by their
    64-bit hashes (16 bytes a pair), sorted at the end."""
    invalid, labels_seen = [], set()
    ids, lines, lengths = array("q"), array("q"), array("h")
    resampling = Resampling(options.direction, options.seed) if options.donor == "resample" else None
    for number, _, checked in checked_lines(path, tokenizer, n_ctx, options, labels_seen):
        if isinstance(checked, InvalidLine):
            invalid.append(checked)
            continue
        ids.append(id_hash(checked.pair_id))
        lines.append(number)
        lengths.append(checked.n_tokens)
        if resampling:
            resampling.add(number, checked)
    check_labels_exist(path, labels_seen, options)
    order = np.lexsort((np.frombuffer(lines, np.int64), np.frombuffer(ids, np.int64)))
    sorted_ids = np.frombuffer(ids, np.int64)[order]
    shared = np.unique(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]])  # hashes on more than one line
    repeats = repeated_ids(path, tokenizer, n_ctx, options, set(shared.tolist()))
    invalid += repeats
    counts = np.bincount(np.frombuffer(lengths, np.int16).astype(np.int64)) if lengths else np.zeros(0, np.int64)
    index_of_line = {lines[i]: i for i in order[np.isin(sorted_ids, shared)].tolist()} if repeats else {}
    for bad in repeats:
        counts[lengths[index_of_line[bad.line]]] -= 1
    if resampling:
        alone = resampling.pair_up({bad.line for bad in repeats})
        invalid += alone_in_length(path, alone)
        for length in alone.values():
            counts[length] -= 1
    return FileScan(
        sorted(invalid, key=lambda bad: bad.line),
        {length: int(count) for length, count in enumerate(counts) if count},
        resampling,
    )


def id_hash(pair_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(pair_id.encode(), digest_size=8).digest(), "little", signed=True)


def repeated_ids(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, n_ctx: int, options: PatchOptions, shared: set[int]
) -> list[InvalidLine]:
    """The lines whose id an earlier line has, as bad lines naming that first line, among the ids
    whose hash is in `shared` (read again: a file with repeated ids is the rare case that pays for
    a second look). The ids themselves are compared, so two ids that share a hash are not taken
    for one."""
    if not shared:
        return []
    first_line_of, found = {}, []
    for number, raw, checked in checked_lines(path, tokenizer, n_ctx, options, set()):
        if not isinstance(checked, Pair) or id_hash(checked.pair_id) not in shared:
            continue
        if checked.pair_id in first_line_of:
            found.append(duplicate(path, number, raw, checked, first_line_of[checked.pair_id]))
        else:
            first_line_of[checked.pair_id] = number
    return found


def stream_pairs(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    n_ctx: int,
    options: PatchOptions,
    skipped: set[int],
    resampling: Resampling | None = None,
) -> Iterator[Pair]:
    """The good pairs of a scanned file, in file order, a chunk of lines in memory at a time
    (`skipped`: the scan's bad lines; `resampling`: its donors, for `--donor resample`)."""
    for number, _, checked in checked_lines(path, tokenizer, n_ctx, options, set()):
        if number not in skipped:
            if not isinstance(checked, Pair):
                raise PairFileError(f"{path}:{number}: the file changed while the job ran ({checked.reason})")
            yield resampling.donate(checked, number) if resampling else checked
