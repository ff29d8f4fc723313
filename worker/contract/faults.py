"""Faults the driver's tests inject into an actor, to see shards retried, failed and rewritten whole.

Off unless `PATCHSWEEP_TEST_FAULT=KIND:ARG` is set in the actor's environment; read once, when
the actor starts, so the real path only asks whether a fault was set at all. The stages are
where a shard is: `start`, or `half-written` (its pairs part written, its results part not).

    crash-once:MARKER       exit abruptly (as an OOM kill would) if MARKER does not exist, creating it
    crash-half-once:MARKER  the same, once the shard is half written
    crash-on:PAIR_ID        exit abruptly whenever the shard holds PAIR_ID
    raise-on:PAIR_ID        raise an ordinary exception whenever the shard holds PAIR_ID
    slow:SECONDS            sleep before every shard
    oom-above:TOKENS        an out-of-memory error for every try whose batch bound is above TOKENS
                            (`max_batch_tokens`), as a device too small for those batches gives
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from worker.contract.options import PatchOptions
from worker.contract.pairs import Pair

TEST_FAULT_ENV = "PATCHSWEEP_TEST_FAULT"


@dataclass(frozen=True)
class InjectedFault:
    kind: str
    arg: str

    @classmethod
    def from_env(cls) -> InjectedFault | None:
        kind, _, arg = os.environ.get(TEST_FAULT_ENV, "").partition(":")
        return cls(kind, arg) if kind else None

    def crash_once(self) -> None:
        if not os.path.exists(self.arg):
            open(self.arg, "w").close()
            os._exit(1)

    def before_try(self, options: PatchOptions) -> None:
        """Before each try at a shard's batches (worker/methods/fitting.py)."""
        if self.kind == "oom-above" and options.max_batch_tokens > int(self.arg):
            import torch  # only in an actor, which has it loaded; the contract stays torch-free

            raise torch.OutOfMemoryError(
                f"injected test fault: batches of {options.max_batch_tokens} tokens do not fit"
            )

    def at(self, stage: str, pairs: Sequence[Pair]) -> None:
        """Fire this fault if it belongs at `stage` of a shard of `pairs`."""
        if stage == "half-written":
            if self.kind == "crash-half-once":
                self.crash_once()
            return
        in_shard = any(pair.pair_id == self.arg for pair in pairs)
        if self.kind == "crash-once":
            self.crash_once()
        if self.kind == "crash-on" and in_shard:
            os._exit(1)
        if self.kind == "raise-on" and in_shard:
            raise RuntimeError(f"injected test fault on pair {self.arg}")
        if self.kind == "slow":
            time.sleep(float(self.arg))
