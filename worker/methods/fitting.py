"""Batches that fit the device: sized to its memory before a shard, halved when they still run out.

A method's batch is bounded by `max_batch_tokens` (rows x tokens per forward, the budget's unit):
every method cuts its pairs and rows by it (worker/batch/rows.py `per_batch`), so the bound
decides each forward's memory, whatever the method keeps beside it.

Planned: each method says what one unit of its batch holds (`batch_bytes`, from the model's
widths, layers, heads, vocabulary and the prompt length), and a shard's bound is at most
`max_batch_memory` over that (`planned`); `--max-batch-tokens` stays a cap. By default the memory
is half the device's free memory at the shard's start on a GPU, or, on CPU, half the memory the
machine has available, shared by the actors its cores hold. The estimates are measured against
the process's peak memory by bench/batch_memory.py (docs/PERFORMANCE.md, "Batches that fit").

Survived: on an out-of-memory error (torch's `OutOfMemoryError` on CUDA, the CPU allocator's
`RuntimeError`, Python's `MemoryError`) the shard's tensors are dropped, the device's cache is
emptied, and the shard runs again from its start with half the bound: it is written whole or not
at all, and its results do not depend on the bound. Once the bound is one token (every forward
one pair, or one row) and the shard still does not fit, it fails with `DoesNotFit`: one line,
and not retried (it would not fit again).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import pyarrow as pa
import torch
from nnsight import TransformersModel

from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair
from worker.methods.registry import run_method
from worker.model.sites import head_dim, n_heads, n_layers

CPU_ALLOCATOR_FAILED = "DefaultCPUAllocator: can't allocate memory"
MEMORY_SHARE = 0.5  # of the free memory a batch may take by default: the rest is the allocator's slack


@dataclass(frozen=True)
class Shape:
    """What a batch's memory depends on, from the model: bytes per element, layers, heads, their
    channels, the residual width, the MLP's and the vocabulary."""

    element: int
    layers: int
    heads: int
    head_channels: int
    width: int
    mlp: int
    vocab: int

    @classmethod
    def of(cls, model: TransformersModel) -> Shape:
        config = model._module.config
        width = config.hidden_size
        mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * width
        element = next(model._module.parameters()).element_size()
        return cls(element, n_layers(model), n_heads(model), head_dim(model), width, mlp, config.vocab_size)

    def forward(self, tokens: int) -> int:
        """Elements one row-token holds at once in a forward without gradients that reads every
        position's logits: the logits, the widest layer's MLP activations (in and out of the
        nonlinearity, gated or not), its attention scores and probabilities, queries, keys,
        values and a few streams."""
        attention = 3 * self.heads * (tokens + self.head_channels)
        return self.vocab + 3 * self.mlp + attention + 6 * self.width

    def suffix(self, tokens: int) -> int:
        """Elements one row-token holds in the exact paths' recompute (worker/kernels/suffix.py), one
        layer at a time, read out at the answers only: MLP activations, a query's scores, a stream."""
        return self.mlp + self.heads * (tokens + self.head_channels) + 2 * self.width

    def backward(self, tokens: int) -> int:
        """Elements per row-token autograd keeps for a backward through every layer (norms' inputs,
        queries, keys, values, scores and probabilities, MLP activations, the streams) and the
        logits' with their gradient."""
        per_layer = 3 * self.mlp + 3 * self.heads * tokens + 5 * self.heads * self.head_channels + 8 * self.width
        return self.layers * per_layer + 2 * self.vocab

    def senders(self) -> int:
        """Elements per row-token of every edge sender's output: the embeddings, each head, each MLP."""
        return (self.layers * (self.heads + 1) + 1) * self.width


def batch_bytes(model: TransformersModel, options: PatchOptions, tokens: int) -> int:
    """Bytes one unit of `max_batch_tokens` (a row of one token) holds in `options.method`'s batch
    of prompts `tokens` long:
    - exact, paths: the suffix recompute of a patched row (the clean and corrupted reads are the
      group's, a fixed cost beside the batch);
    - atp, atpstar: a forward with its backward; AtP*'s QK fix adds five [heads, tokens]
      probability rows per layer;
    - eap, eap-ig: a forward with its backward, and the senders' outputs and differences the edge
      contraction holds per pair-row (one and a half of each sender's width, spread over EAP-IG's
      steps, which are rows of the budget already);
    - circuit: 32 sender differences of the width per unit (worker/engines/edge_sets.py counts 32
      as one row of the budget).
    Checked against the measured peak memory by bench/batch_memory.py."""
    shape, method = Shape.of(model), options.method
    if method in ("atp", "atpstar", "eap", "eap-ig"):
        elements = shape.forward(tokens) + shape.backward(tokens)
        if method == "atpstar":
            elements += 5 * shape.layers * shape.heads * tokens
        if method in ("eap", "eap-ig"):
            rows_per_pair = 2 + (options.ig_steps - 1 if method == "eap-ig" else 0)
            elements += 3 * shape.senders() // rows_per_pair
    elif method == "circuit":
        elements = 32 * shape.width
    else:
        elements = shape.suffix(tokens)
    return elements * shape.element


def free_bytes(model: TransformersModel) -> int:
    """Memory a batch may take by default: a share of the GPU's free memory, or of the machine's
    available memory split among its actors (one per the threads this one has)."""
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return int(MEMORY_SHARE * free)
    return int(MEMORY_SHARE * available_bytes() * torch.get_num_threads() / (os.cpu_count() or 1))


def available_bytes() -> int:
    """The machine's available memory: Linux's MemAvailable, or elsewhere (macOS) its physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def planned(model: TransformersModel, options: PatchOptions, tokens: int) -> PatchOptions:
    """`options` with `max_batch_tokens` at most what `max_batch_memory` (or the free memory) holds."""
    budget = options.max_batch_memory or free_bytes(model)
    fits = max(1, budget // batch_bytes(model, options, tokens))
    return replace(options, max_batch_tokens=min(options.max_batch_tokens, fits))


class DoesNotFit(RuntimeError):
    """One pair of the shard does not fit in memory even alone."""


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or (
        isinstance(error, RuntimeError) and CPU_ALLOCATOR_FAILED in str(error)
    )


def free_memory() -> None:
    """Let go of what a failed try held (its tensors are garbage once its traceback is) and hand the
    CUDA cache back, so the next try starts from the model alone."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Fitted:
    """A shard's tables, the batch bound they were computed with, and how many halvings found it."""

    results: pa.Table
    pairs: pa.Table
    batch_tokens: int
    halvings: int


def run_fitted(
    model: TransformersModel,
    pairs: Sequence[Pair],
    options: PatchOptions,
    before_try: Callable[[PatchOptions], None] | None = None,
) -> Fitted:
    """`run_method`'s tables for `pairs` (of one token length, a shard's) with a planned batch,
    halved until it fits. `before_try` sees each try's options (the fault tests raise an
    out-of-memory error there)."""
    options, halvings = planned(model, options, max(p.n_tokens for p in pairs)), 0
    while True:
        try:
            if before_try:
                before_try(options)
            return Fitted(*run_method(model, pairs, options), options.max_batch_tokens, halvings)
        except Exception as error:
            if not out_of_memory(error):
                raise
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        free_memory()  # out of the except block: the failed try's frames are gone with its traceback
        if options.max_batch_tokens <= 1:
            raise DoesNotFit(
                f"a pair of {max(p.n_tokens for p in pairs)} tokens does not fit in memory even alone ({reason})"
            )
        options, halvings = replace(options, max_batch_tokens=options.max_batch_tokens // 2), halvings + 1
