"""What a job may ask of a worker, and how a worker refuses: names and defaults only.

Free of torch and transformers on purpose, so the driver can check options, answer
`--help` and run queries without loading either (about 3 s on a small machine).
"""
from __future__ import annotations

from collections.abc import Sequence

DEFAULT_MODEL = "openai-community/gpt2"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
COMPONENTS = ("resid", "attn", "mlp", "head")
DEFAULT_COMPONENTS = ("resid", "attn", "mlp")   # `head` has n_heads times the cells: asked for by name
DIRECTIONS = ("denoise", "noise")
POSITION_MODES = ("each", "all")   # or a list of position labels
DEFAULT_MAX_BATCH_TOKENS = 4096


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message is one line for the user."""


def parse_positions(text: str) -> str:
    """`each`, `all`, or the listed labels joined by commas (spaces and repeats dropped)."""
    parts = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not parts:
        raise ValueError("positions must be each, all, or a comma-separated list of position labels")
    if len(parts) > 1 and set(parts) & set(POSITION_MODES):
        raise ValueError(f"positions: {' or '.join(POSITION_MODES)} cannot be combined with labels, got {text!r}")
    return ",".join(parts)


def position_labels(positions: str) -> tuple[str, ...]:
    """The labels a `positions` value lists; empty for `each` and `all`."""
    return () if positions in POSITION_MODES else tuple(positions.split(","))


def check_options(components: Sequence[str], direction: str) -> None:
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise ValueError(f"components must be a non-empty subset of {COMPONENTS}, got {list(components)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
