"""Token text as a person reads it, for the pairs table, error messages and the report.

Byte-level BPE names tokens by their byte pieces (`ĠGeorge` for " George"), which reads as
noise on a heatmap axis. Each token is decoded on its own instead, and the whitespace that
would vanish on screen is made visible: `␣George`, `↵`, `⇥`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SENTENCEPIECE_SPACE = "▁"
VISIBLE_CONTROLS = str.maketrans({"\n": "↵", "\t": "⇥", "\r": "␍"})


def decoded_pieces(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own, as it is (no clean-up of spaces before punctuation).

    A SentencePiece-style piece (`▁John`, Llama's) keeps its leading space, which decoding the
    token alone would drop.
    """
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    return [
        piece.replace(SENTENCEPIECE_SPACE, " ") if piece.startswith(SENTENCEPIECE_SPACE) else text
        for piece, text in zip(pieces, texts)
    ]


def readable(text: str) -> str:
    """`text` with each leading space shown as ␣ and newlines, tabs and returns as visible marks."""
    body = text.lstrip(" ")
    return ("␣" * (len(text) - len(body)) + body).translate(VISIBLE_CONTROLS)
