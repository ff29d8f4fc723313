"""The object each Ray actor holds: one loaded model, turning shards of pairs into tables.

A plain class, so it runs the same in a test without Ray; the driver wraps it with
`ray.remote`. Model loading errors are kept, not raised, so the driver can show the
user their one-line message instead of an actor-death traceback.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pyarrow as pa
import ray
import torch
import transformers

from worker.batch.mean_donors import donor_sums
from worker.contract.faults import InjectedFault
from worker.contract.options import HEAD_COMPONENTS, ModelLoadError, PatchOptions
from worker.contract.pairs import Pair
from worker.contract.receivers import parse_receivers
from worker.contract.storage import PartWriter, Receipt
from worker.methods.fitting import run_fitted
from worker.model.load import load_model
from worker.model.sites import head_split_problem, receivers_problem


class PatchWorker:
    def __init__(self, model: str, device: str, dtype: str, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        transformers.utils.logging.disable_progress_bar()
        self.error: str | None = None
        self.fault = InjectedFault.from_env()  # None outside the driver's fault tests
        try:
            self.model = load_model(model, device, dtype)
        except ModelLoadError as error:
            self.error = str(error)

    def ready(self, options: PatchOptions = PatchOptions()) -> str | None:
        """None once the model is loaded and can do what `options` ask (patch heads, read receivers), else why not."""
        if self.error is not None:
            return self.error
        if set(HEAD_COMPONENTS) & set(options.components) and (problem := head_split_problem(self.model)):
            return problem
        return receivers_problem(self.model, parse_receivers(options.receivers))

    def node(self) -> str:
        """The Ray node this worker runs on ("local" outside Ray), recorded per shard."""
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def sum_shard(self, pairs: Sequence[Pair], options: PatchOptions) -> pa.Table:
        """The donor-side sums of a shard, for the first pass of a mean-donor run."""
        return donor_sums(self.model, pairs, options)

    def run_shard(self, name: str, pairs: Sequence[Pair], options: PatchOptions, writer: PartWriter) -> Receipt:
        """Patch a shard, its batch halved until it fits (worker/methods/fitting.py), and write its
        parts (pairs first, results last); what was written."""
        started = time.perf_counter()
        if self.fault:
            self.fault.at("start", pairs)
        before_try = self.fault.before_try if self.fault else None
        fitted = run_fitted(self.model, pairs, options, before_try)
        written = writer.write_pairs(name, fitted.pairs)
        if self.fault:
            self.fault.at("half-written", pairs)
        written += writer.write_results(name, fitted.results)
        seconds = round(time.perf_counter() - started, 3)
        return Receipt(fitted.results.num_rows, written, seconds, self.node(), fitted.batch_tokens, fitted.halvings)
