"""Batches that fit (worker/methods/fitting.py): planned to the memory a batch may hold; an
out-of-memory error halves the batch and the shard runs again, with the tables an unhalved run
gives; what is not out of memory is raised."""

from __future__ import annotations

import os
from dataclasses import replace

import pyarrow as pa
import pytest
import torch

from worker.contract.options import PatchOptions
from worker.methods import fitting
from worker.methods.fitting import (
    DoesNotFit,
    available_bytes,
    batch_bytes,
    free_bytes,
    out_of_memory,
    planned,
    run_fitted,
)
from worker.methods.registry import run_method


def test_out_of_memory_is_what_the_allocators_raise():
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**50, dtype=torch.uint8)  # more than any machine: the CPU allocator's own error
    assert out_of_memory(cpu.value) and out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert out_of_memory(MemoryError()) and not out_of_memory(RuntimeError("shapes do not match"))


def allocating_above(tokens: int, tries: list[int]):
    """A try hook that asks the CPU allocator for too much while the batch bound is above `tokens`."""

    def before_try(options: PatchOptions) -> None:
        tries.append(options.max_batch_tokens)
        if options.max_batch_tokens > tokens:
            torch.empty(2**50, dtype=torch.uint8)

    return before_try


@pytest.mark.parametrize("method", ["exact", "eap"])
def test_a_shard_out_of_memory_runs_again_with_half_the_batch(tiny_model, ioi_pairs, method):
    options = PatchOptions(("resid",) if method == "exact" else (), max_batch_tokens=256, method=method)
    tries: list[int] = []
    fitted = run_fitted(tiny_model, ioi_pairs, options, allocating_above(40, tries))
    assert tries == [256, 128, 64, 32] and (fitted.batch_tokens, fitted.halvings) == (32, 3)
    results, pairs = fitted.results, fitted.pairs
    want_results, want_pairs = run_method(tiny_model, ioi_pairs, options)
    assert pairs.equals(want_pairs) and results.column_names == want_results.column_names
    for name in results.column_names:
        got, want = results.column(name), want_results.column(name)
        if pa.types.is_floating(got.type):
            assert got.to_numpy(zero_copy_only=False) == pytest.approx(
                want.to_numpy(zero_copy_only=False), abs=1e-5, nan_ok=True
            )
        else:
            assert got.equals(want), name


def test_a_pair_that_never_fits_is_does_not_fit_and_other_errors_pass_through(tiny_model, ioi_pairs):
    options = PatchOptions(("resid",), max_batch_tokens=4)
    tries: list[int] = []
    with pytest.raises(DoesNotFit, match=r"a pair of \d+ tokens does not fit in memory even alone \(.*DefaultCPU"):
        run_fitted(tiny_model, ioi_pairs, options, allocating_above(0, tries))
    assert tries == [4, 2, 1]

    def broken(options: PatchOptions) -> None:
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        run_fitted(tiny_model, ioi_pairs, options, broken)


@pytest.mark.parametrize("method, components", [("exact", ("resid",)), ("eap", ()), ("atpstar", ("head",))])
def test_the_planned_batch_is_what_the_memory_holds(tiny_model, method, components):
    """At most `max_batch_memory` over what a unit of the method's batch holds, never above
    --max-batch-tokens, never below one; a backward costs more than a forward, a longer prompt more
    per unit (its attention scores); by default a share of the memory this machine has free."""
    options = PatchOptions(components, method=method, max_batch_tokens=4096)
    unit = batch_bytes(tiny_model, options, 12)
    for memory, bound in ((unit * 100, 100), (unit * 101 - 1, 100), (unit * 10**6, 4096), (1, 1)):
        assert planned(tiny_model, replace(options, max_batch_memory=memory), 12).max_batch_tokens == bound
    assert batch_bytes(tiny_model, options, 24) > unit
    assert method == "exact" or unit > batch_bytes(tiny_model, PatchOptions(("resid",)), 12)
    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    assert 0 < free_bytes(tiny_model) < available


def test_without_proc_meminfo_the_physical_memory_is_what_is_available(monkeypatch):
    """macOS has no /proc/meminfo: its physical memory stands in for MemAvailable."""

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/meminfo")

    monkeypatch.setattr(fitting, "open", no_proc, raising=False)
    assert available_bytes() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
