"""The object each Ray actor holds: one loaded model, turning shards of pairs into tables.

A plain class, so it runs the same in a test without Ray; the driver wraps it with
`ray.remote`. Model loading errors are kept, not raised, so the driver can show the
user their one-line message instead of an actor-death traceback.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import pyarrow as pa
import ray
import torch
import transformers

from worker.model import ModelLoadError, load_model
from worker.pairs import Pair
from worker.patching import patch_batch

CRASH_ONCE_ENV = "PATCHSWEEP_TEST_CRASH_ONCE"


def crash_once_for_tests() -> None:
    """Fault injection: if the env var names a marker file that does not exist yet, create it and die.

    Exits the process abruptly (as an OOM kill would), so Ray restarts the actor and retries.
    """
    marker = os.environ.get(CRASH_ONCE_ENV)
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


class PatchWorker:
    def __init__(self, model: str, device: str, dtype: str, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        transformers.utils.logging.disable_progress_bar()
        self.error: str | None = None
        try:
            self.model = load_model(model, device, dtype)
        except ModelLoadError as error:
            self.error = str(error)

    def ready(self) -> str | None:
        """None once the model is loaded, else the reason it could not be."""
        return self.error

    def node(self) -> str:
        """The Ray node this worker runs on ("local" outside Ray), recorded per shard."""
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def run_shard(
        self,
        pairs: Sequence[Pair],
        components: Sequence[str],
        direction: str,
        max_batch_tokens: int,
    ) -> tuple[pa.Table, pa.Table]:
        crash_once_for_tests()
        result = patch_batch(self.model, pairs, components, direction, max_batch_tokens)
        return result.effects, result.pairs
