"""Loading a checkpoint of a supported family into nnsight, from a hub id or a local directory.

Both sources go through the same `TransformersModel` call; every way loading can fail
(no network, bad path, an unsupported family or no causal LM head) becomes one `ModelLoadError` line
(the source resolved and the config checked by worker/model/checkpoint.py, as the driver does).
"""

from __future__ import annotations

import torch
from nnsight import TransformersModel

from worker.contract.options import DEFAULT_MODEL, DTYPE_NAMES, ModelLoadError
from worker.model.attention import expose_patterns
from worker.model.checkpoint import _explain, _patchable_config, _resolve_source


def resolve_device(device: str = "auto") -> str:
    """`auto` means the first GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} asked for, but no CUDA GPU is visible")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype not in DTYPE_NAMES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    if dtype == "float16" and not device.startswith("cuda"):
        raise ModelLoadError("float16 needs a GPU; use float32 (or bfloat16) on the CPU")
    return getattr(torch, dtype)


def load_model(source: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "float32") -> TransformersModel:
    """Load `source` (hub id or local directory) as an nnsight model ready for patching."""
    source = _resolve_source(source)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    _patchable_config(source)
    try:
        model = TransformersModel(source, task="text-generation", dispatch=True, device=device, dtype=torch_dtype)
    except Exception as error:  # transformers/hub raise many unrelated types for one cause
        raise _explain(source, error) from error
    model._module.eval()
    if (
        getattr(model._module.config, "attn_logit_softcapping", None)
        and model._module.config._attn_implementation == "sdpa"
    ):
        model._module.set_attn_implementation("eager")  # sdpa refuses soft-capped scores; eager applies the cap
    model._module.requires_grad_(False)  # never trained: AtP's backward computes activation gradients only
    expose_patterns(model)
    return model
