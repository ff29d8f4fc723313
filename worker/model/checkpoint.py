"""A checkpoint's config and tokenizer, from a hub id or a local directory, without any weights:
what the driver needs (transformers only, no nnsight). Every way reading can fail (no network,
bad path, an unsupported family or no causal LM head) becomes one `ModelLoadError` line. A hub
that cannot be reached is noticed in seconds and the hub client put in offline mode (cached
files only), instead of retrying every file for most of a minute.
"""

from __future__ import annotations

import os
import socket
import urllib.parse

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from worker.contract.options import DEFAULT_MODEL, ModelLoadError
from worker.model.families import UnsupportedModel, family_of

HUB_PROBE_SECONDS = 3
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _go_offline_if_hub_unreachable() -> None:
    """Put the hub client in offline mode when its endpoint does not accept a connection.

    Offline mode still loads what the local cache holds, and fails at once for the rest.
    Behind a proxy the endpoint cannot be probed directly, so the client is left as it is.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in PROXY_VARIABLES):
        return
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        constants.HF_HUB_OFFLINE = True  # read at each request by huggingface_hub.is_offline_mode()


def _looks_like_path(source: str) -> bool:
    """Hub ids are `name` or `namespace/name`; anything else is meant as a directory."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or os.path.exists(source)


def _resolve_source(source: str) -> str:
    """Expand `~`; refuse a path that is not a directory before the hub is ever asked."""
    if not _looks_like_path(source):
        _go_offline_if_hub_unreachable()
        return source
    path = os.path.expanduser(source)
    if not os.path.isdir(path):
        raise ModelLoadError(
            f"cannot load model {source!r}: no such directory "
            "(pass --model PATH to a local checkpoint directory, or a hub id)"
        )
    return path


def _explain(source: str, error: Exception) -> ModelLoadError:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    where = "local directory" if os.path.isdir(source) else "model id or path"
    return ModelLoadError(
        f"cannot load {where} {source!r}: {first_line} "
        "(no network here? pass --model PATH to a local checkpoint directory)"
    )


def _patchable_config(source: str) -> PretrainedConfig:
    """The checkpoint's config; a model patchsweep cannot patch is refused from it alone, before
    any weights load."""
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as error:
        raise _explain(source, error) from error
    try:
        family_of(config)
    except UnsupportedModel as error:
        raise ModelLoadError(f"cannot patch {source!r}: {error}") from None
    return config


def load_config(source: str = DEFAULT_MODEL) -> PretrainedConfig:
    """The checkpoint's config, refused as `load_model` would refuse it, without loading any weights."""
    return _patchable_config(_resolve_source(source))


def load_tokenizer(source: str = DEFAULT_MODEL) -> tuple[PreTrainedTokenizerBase, int]:
    """The tokenizer and context length of `source`, without loading any weights.

    The driver validates pairs with these, so it never needs the model itself.
    """
    source = _resolve_source(source)
    config = _patchable_config(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise _explain(source, error) from error
    n_ctx = getattr(config, "n_positions", None) or config.max_position_embeddings
    return tokenizer, int(n_ctx)
