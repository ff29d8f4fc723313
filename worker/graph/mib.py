"""The model's graph as EAP-IG and MIB name it, so circuits move between tools.

Senders are `input` (the token embeddings alone, EAP-IG's `hook_embed`: position embeddings, like
the attention output bias, belong to no node, so no ablation touches them), `a{L}.h{H}` (a head's output through the
output projection, bias excluded) and `m{L}` (an MLP's output); receivers are each head's query, key and value input
(`a{L}.h{H}<q>`: the residual stream before the block's norm, as that head alone reads it), each
MLP's input (`m{L}`: the stream before the MLP's norm) and `logits` (the final stream before the
last norm). A sender feeds every later receiver that reads the stream after it: a layer's heads
read everything below the layer, its MLP also its own heads unless the block is parallel
(GPT-NeoX), `logits` everything. Edge `s->r` is named `a0.h3->a2.h1<q>`, `input->m0`, `m1->logits`.

Torch-free: the driver reads a graph from a checkpoint's config to select and check circuits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from worker.contract.receivers import INPUTS
from worker.model.families import family_of

GRAPH_SENDERS = ("input", "head", "mlp")  # the sites whose outputs the senders are (a run of edges reads them)


@dataclass(frozen=True)
class Graph:
    """The nodes and edges of a model with `layers` blocks of `heads` heads; `parallel`: the MLP
    reads the block input, not its own layer's heads; `d_model` (when known) the stream's width,
    which EAP-IG's graph JSON records."""

    layers: int
    heads: int
    parallel: bool
    d_model: int | None = None

    @classmethod
    def of_config(cls, config: Any) -> Graph:
        """The graph of a checkpoint, from its config alone (the driver's view: no weights)."""
        heads, parallel = getattr(config, family_of(config).n_heads), getattr(config, "use_parallel_residual", False)
        return cls(config.num_hidden_layers, heads, bool(parallel), config.hidden_size)

    @classmethod
    def of(cls, model: Any) -> Graph:
        """The graph of a loaded model (an nnsight `TransformersModel`)."""
        return cls.of_config(model._module.config)

    @cached_property
    def senders(self) -> list[tuple[str, int]]:
        """(name, layer) in forward order; `input` is layer -1."""
        nodes = [("input", -1)]
        for layer in range(self.layers):
            nodes += [(f"a{layer}.h{head}", layer) for head in range(self.heads)] + [(f"m{layer}", layer)]
        return nodes

    @cached_property
    def receivers(self) -> list[tuple[str, int]]:
        """(name, layer) in forward order; `logits` is layer `layers`."""
        nodes = []
        for layer in range(self.layers):
            nodes += [(f"a{layer}.h{h}<{i}>", layer) for h in range(self.heads) for i in INPUTS]
            nodes.append((f"m{layer}", layer))
        return [*nodes, ("logits", self.layers)]

    def feeds(self, sender: str, sender_layer: int, receiver: str, receiver_layer: int) -> bool:
        """Whether `receiver` reads the stream after `sender`."""
        if sender_layer < receiver_layer:
            return True
        own_heads = receiver.startswith("m") and sender.startswith("a") and not self.parallel
        return sender_layer == receiver_layer and own_heads

    @cached_property
    def edges(self) -> list[tuple[int, int]]:
        """(sender index, receiver index) of every edge, receiver-major, senders in forward order."""
        return [
            (s, r)
            for r, (receiver, r_layer) in enumerate(self.receivers)
            for s, (sender, s_layer) in enumerate(self.senders)
            if self.feeds(sender, s_layer, receiver, r_layer)
        ]

    @cached_property
    def edge_names(self) -> list[str]:
        return [f"{self.senders[s][0]}->{self.receivers[r][0]}" for s, r in self.edges]

    @cached_property
    def nodes(self) -> list[str]:
        """Every node in forward order: the senders, then `logits`."""
        return [name for name, _ in self.senders] + ["logits"]

    @staticmethod
    def node_of(receiver: str) -> str:
        """The node a receiver belongs to: `a2.h1<q>` -> `a2.h1`; `m1`, `logits` are their own."""
        return receiver.split("<")[0]
