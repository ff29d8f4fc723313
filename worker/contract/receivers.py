"""What a path-patching run measures a sender's effect through: its receivers, as the user writes them.

`logits`: the final residual stream at the last position, reached without passing through
any other attention head. A head set, `9.9:q,9.6:q,10.0:q@END`: those heads' query, key or
value inputs (layer.head:input), at the positions carrying the label after `@` (every
position without one). Free of torch, so the driver checks a spec before anything loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LOGITS = "logits"
INPUTS = ("q", "k", "v")
HEAD_INPUT = re.compile(r"^(\d+)\.(\d+):([qkv])$")


@dataclass(frozen=True)
class ReceiverHead:
    layer: int
    head: int
    input: str  # q, k or v


@dataclass(frozen=True)
class Receiver:
    heads: tuple[ReceiverHead, ...]  # empty: the logits
    label: str | None = None  # heads' inputs at positions with this label; None: every position

    @property
    def name(self) -> str:
        """The canonical spelling, as the `receiver` column holds it."""
        if not self.heads:
            return LOGITS
        heads = ",".join(f"{h.layer}.{h.head}:{h.input}" for h in self.heads)
        return heads + (f"@{self.label}" if self.label else "")

    @property
    def layers(self) -> list[int]:
        return sorted({h.layer for h in self.heads})


def parse_receiver(text: str) -> Receiver:
    """`logits`, or `L.H:q|k|v[,L.H:q|k|v...][@LABEL]`; raises ValueError saying what is wrong."""
    text = text.strip()
    if text == LOGITS:
        return Receiver(())
    spec, at, label = text.partition("@")
    label = label.strip()
    if at and not label:
        raise ValueError(f"receiver {text!r}: no position label after '@'")
    heads = []
    for item in (part.strip() for part in spec.split(",")):
        match = HEAD_INPUT.match(item)
        if match is None:
            raise ValueError(
                f"receiver {text!r}: {item!r} is not LAYER.HEAD:q|k|v (e.g. 9.9:q), and the whole is not {LOGITS!r}"
            )
        heads.append(ReceiverHead(int(match[1]), int(match[2]), match[3]))
    if len(set(heads)) < len(heads):
        raise ValueError(f"receiver {text!r} lists a head input twice")
    return Receiver(tuple(heads), label or None)


def parse_receivers(texts: tuple[str, ...] | list[str]) -> tuple[Receiver, ...]:
    """Several receivers, each measured on its own; a receiver given twice is an error."""
    receivers = tuple(parse_receiver(text) for text in texts)
    names = [r.name for r in receivers]
    if len(set(names)) < len(names):
        raise ValueError(f"receivers: {', '.join(n for n in names if names.count(n) > 1)} given twice")
    return receivers


def canonical_receivers(texts: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Each receiver's canonical spec, as `PatchOptions.receivers` holds them (spaces and order of
    writing dropped), checked as `parse_receivers` checks them."""
    return tuple(receiver.name for receiver in parse_receivers(texts))
