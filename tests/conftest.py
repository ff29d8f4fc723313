"""Shared fixtures: a tiny random GPT-2 with its own BPE tokenizer, built once per session."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from examples.tiny_families import build_tiny
from examples.tiny_gpt2 import build_tiny_gpt2
from jobs.pairfile import encoder_for, parse_record, read_pairs
from tests.reference import next_token_logits
from worker.methods.registry import patch_batch
from worker.model.checkpoint import load_tokenizer
from worker.model.load import load_model

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_PAIRS = REPO / "examples" / "pairs.jsonl"
TEST_DEVICE = os.environ.get("PATCHSWEEP_TEST_DEVICE", "cpu")  # bench/gpu_check.sh: the patching tests on cuda
TOL = 1e-4  # on logit differences, absolute
OUTPUT_COMPONENTS = ("resid", "attn", "mlp", "head")  # the broad tests; tests/test_attention_sites.py the rest
ATTENTION_SITES = ("q", "k", "v", "pattern")


def pytest_configure(config) -> None:
    """Under pytest-xdist, each worker's torch gets its share of the cores: workers that each
    spin a thread per core oversubscribe them, and the whole suite ran several times slower."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


LONGEST_FIRST = ("test_readme.py", "test_cluster.py", "test_driver.py", "test_s3.py")  # the most minutes a file


def pytest_collection_modifyitems(items) -> None:
    """The longest files first: pytest-xdist hands files out in this order, so none of them is
    left to run alone at the end while the other workers idle."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def score_tolerance(score: float, clean: float, corrupted: float, tol: float = TOL) -> float:
    """How far a score may move when each logit difference in it moves by up to `tol`.

    score = (patched - base) / (clean - corrupted): errors in the numerator's two terms and
    in the gap's two terms are divided by the gap, so a pair with a small gap amplifies
    float noise (a different thread count is enough); the tolerance grows the same way.
    """
    return tol * (2 + 2 * abs(score)) / max(abs(clean - corrupted), tol)


IOI_LINES = [
    (
        "When John and Mary went to the store, Mary gave a drink to",
        "When John and Mary went to the store, John gave a drink to",
        " John",
        " Mary",
    ),
    (
        "When Tom and Anna went to the school, Anna gave a ring to",
        "When Tom and Anna went to the school, Tom gave a ring to",
        " Tom",
        " Anna",
    ),
    (
        "After the lunch, Lisa and Paul went to the garden. Paul gave a drink to",
        "After the lunch, Lisa and Paul went to the garden. Lisa gave a drink to",
        " Lisa",
        " Paul",
    ),
    (
        "Then, Kate and David had a lot of fun at the office. David gave the ring to",
        "Then, Kate and David had a lot of fun at the office. Kate gave the ring to",
        " Kate",
        " David",
    ),
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return load_model(str(tiny_model_dir), device=TEST_DEVICE)


@pytest.fixture(scope="session")
def tokenizer_and_ctx(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def ioi_pairs(tokenizer_and_ctx):
    """Four pairs of three different token lengths."""
    tokenizer, n_ctx = tokenizer_and_ctx
    records = [dict(zip(("clean", "corrupted", "correct", "incorrect"), line)) for line in IOI_LINES]
    encoder = encoder_for(tokenizer, records)
    return [parse_record(r, str(i), encoder, n_ctx) for i, r in enumerate(records)]


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    """The tiny GPT-2 as a plain Hugging Face model, for the references (tests/reference.py)."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="session")
def answer_pairs(hf_model, ioi_pairs) -> dict[str, list]:
    """The IOI prompts with answers the tiny model gives weight to (its names have ~1e-4
    probability, too little to test probabilities on): the top tokens after the clean prompt are
    correct, the top tokens after the corrupted one incorrect; one answer each, or sets of three."""
    found = {"single": [], "sets": []}
    for pair in ioi_pairs:
        clean_top = next_token_logits(hf_model, list(pair.clean_ids)).topk(10).indices.tolist()
        corrupted_top = next_token_logits(hf_model, list(pair.corrupted_ids)).topk(10).indices.tolist()
        for name, k in (("single", 1), ("sets", 3)):
            correct = tuple(clean_top[:k])
            incorrect = tuple([t for t in corrupted_top if t not in correct][:k])
            found[name].append(
                dataclasses.replace(
                    pair,
                    correct_ids=correct,
                    incorrect_ids=incorrect,
                    correct=tuple(map(str, correct)),
                    incorrect=tuple(map(str, incorrect)),
                )
            )
    return found


def free_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A PID namespace of its own, with a /proc to match; --kill-child: the command dies with unshare,
# which is the process a test's timeout kills.
OWN_PIDS = ["unshare", "--pid", "--fork", "--mount-proc", "--map-root-user", "--kill-child"]


@cache
def own_pids_allowed() -> bool:
    """Whether this machine lets a test make PID namespaces (containers may forbid it)."""
    try:
        return subprocess.run([*OWN_PIDS, "true"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def without_other_rays(command: list[str]) -> list[str]:
    """`command` where Ray's `auto` sees no Ray processes but its own: in a PID namespace of its own.

    `auto` takes a GCS it finds running anywhere on the machine (another test run's, another
    user's) over the address the last `ray start` recorded, and RAY_TMPDIR hides only the latter.
    Where namespaces are not allowed the command runs as it is, and the test is skipped while
    another Ray runs here.
    """
    from ray._private.services import find_gcs_addresses  # ray: only for the tests that start it

    if own_pids_allowed():
        return [*OWN_PIDS, *command]
    find_gcs_addresses.cache_clear()
    if find_gcs_addresses():
        pytest.skip("another Ray runs on this machine, and `auto` would find it (no PID namespace allowed)")
    return command


@pytest.fixture
def ray_tmpdir(monkeypatch) -> Iterator[Path]:
    """RAY_TMPDIR of the test's own: the address `ray start` records and the sessions of the Rays
    it starts are its alone, and gone after it. Short, as Ray's socket paths under it must be."""
    path = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def many_pairs(tmp_path_factory) -> Path:
    """48 pairs (the 12 examples, four times over with fresh ids), three token lengths."""
    records = [json.loads(line) for line in EXAMPLE_PAIRS.read_text().splitlines()]
    copies = [{**r, "id": f"{r['id']}-{k}"} for k in range(4) for r in records]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "many.jsonl", copies)


@dataclass(frozen=True)
class Core:
    """What the single-process core computed: (logit_diff, score) per cell, baselines per pair."""

    effects: dict
    baselines: dict


@pytest.fixture(scope="session")
def core_effects(tiny_model, tokenizer_and_ctx, many_pairs) -> Core:
    """The single-process patching core on the same pairs: what every driver run must match."""
    pairs = read_pairs(many_pairs, *tokenizer_and_ctx).pairs
    result = patch_batch(tiny_model, pairs, ["resid", "mlp"])
    effects = {
        (r["pair_id"], r["component"], r["layer"], r["position"]): (r["logit_diff"], r["score"])
        for r in result.effects.to_pylist()
    }
    baselines = {r["pair_id"]: (r["clean_logit_diff"], r["corrupted_logit_diff"]) for r in result.pairs.to_pylist()}
    return Core(effects, baselines)


@pytest.fixture(scope="session", params=["gpt2", "gpt_neox", "llama", "qwen2", "gemma2", "gemma3_text"])
def hooked_family(request, tmp_path_factory, tiny_model, hf_model, ioi_pairs):
    """(nnsight model, Hugging Face model, two pairs of different lengths in its tokenization):
    parallel blocks (GPT-NeoX), grouped-query attention (Llama; Qwen2 with key/value biases),
    post-norms, soft-caps and sliding windows (Gemma-2, Gemma-3)."""
    if request.param == "gpt2":
        return tiny_model, hf_model, ioi_pairs[1:3]
    model_dir = build_tiny(request.param, tmp_path_factory.mktemp(request.param))
    tokenizer, n_ctx = load_tokenizer(str(model_dir))
    records = [dict(zip(("clean", "corrupted", "correct", "incorrect"), line)) for line in IOI_LINES[1:3]]
    encoder = encoder_for(tokenizer, records)
    pairs = [parse_record(r, str(i), encoder, n_ctx) for i, r in enumerate(records)]
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return load_model(str(model_dir), device=TEST_DEVICE), hf_model, pairs
