"""Actor side: everything that runs next to a model (loading, patching traces, result rows).

Importable and usable without Ray, e.g. in a notebook:
    model = load_model("openai-community/gpt2")
    result = patch_batch(model, pairs, components=["resid"])
"""
from worker.model import DEFAULT_MODEL, ModelLoadError, load_model, load_tokenizer
from worker.pairs import Pair
from worker.patching import COMPONENTS, DIRECTIONS, PatchResult, patch_batch

__all__ = [
    "COMPONENTS", "DEFAULT_MODEL", "DIRECTIONS", "ModelLoadError", "Pair", "PatchResult",
    "load_model", "load_tokenizer", "patch_batch",
]
