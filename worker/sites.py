"""Where patches go: the patchable components of a GPT-2 block and how to reach them in nnsight."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from nnsight import TransformersModel

FORWARD_ORDER = ("attn", "mlp", "resid")


@dataclass(frozen=True)
class Cell:
    component: str
    layer: int
    position: int


def component_output(model: TransformersModel, component: str, layer: int) -> torch.Tensor:
    """The activation patched for `component`: block output, attention output or MLP output.

    Blocks and attention return tuples on some transformers versions; element 0 is the
    hidden state, while indexing a plain tensor with [0] would select batch row 0.
    """
    block = model.transformer.h[layer]
    output = {"resid": block, "attn": block.attn, "mlp": block.mlp}[component].output
    return output[0] if isinstance(output, tuple) else output


def traced_logit_diff(model: TransformersModel, answers: torch.Tensor) -> torch.Tensor:
    """Inside a trace: correct minus incorrect logit at the last position, per row.

    `answers` is [rows, 2] (correct id, incorrect id); only those two columns are read.
    """
    answer_logits = model.lm_head.output[:, -1, :].gather(1, answers).float()
    return answer_logits[:, 0] - answer_logits[:, 1]
