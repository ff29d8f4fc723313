"""Model loading: local directories like hub ids, and one clear error for everything else."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from worker.contract.options import ModelLoadError, PatchOptions
from worker.model.checkpoint import load_tokenizer
from worker.model.load import load_model


def test_local_directory_loads_on_cpu(tiny_model, tiny_model_dir):
    assert tiny_model.device.type == "cpu"
    assert next(tiny_model._module.parameters()).dtype == torch.float32
    tokenizer, n_ctx = load_tokenizer(str(tiny_model_dir))
    assert n_ctx == 64 and len(tokenizer) == tiny_model._module.config.vocab_size


def test_bfloat16_on_cpu(tiny_model_dir):
    model = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert next(model._module.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("source", ["/no/such/model", "./missing-dir", "a/b/c"])
def test_missing_directory(source):
    with pytest.raises(ModelLoadError, match=r"no such directory.*--model PATH"):
        load_model(source)
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_tokenizer(source)


def test_directory_without_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match=r"cannot load local directory.*--model PATH") as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value)


def test_an_unsupported_family_is_refused_before_loading_weights(tmp_path, tiny_model_dir):
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=16,
    )
    OPTForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # refused from its config: the weights are never read
    for load in (lambda: load_model(str(tmp_path), device="cpu"), lambda: load_tokenizer(str(tmp_path))):
        with pytest.raises(ModelLoadError) as info:
            load()
        assert str(info.value) == (
            f"cannot patch {str(tmp_path)!r}: model type 'opt' is not supported; "
            "patchsweep patches gemma2, gemma3_text, gpt2, gpt_neox, llama, mistral, qwen2 models"
        )


def test_a_multimodal_gemma3_is_refused_in_one_line_pointing_to_its_text_model(tmp_path, tiny_model_dir):
    from transformers import Gemma3Config

    Gemma3Config().save_pretrained(tmp_path)  # a config alone: refused before any weights are looked for
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path), device="cpu")
    assert str(info.value) == (
        f"cannot patch {str(tmp_path)!r}: the checkpoint is a multimodal Gemma-3 (model type 'gemma3'); "
        "patchsweep patches text models: use a text-only Gemma-3 checkpoint (model type 'gemma3_text', "
        "a Gemma3ForCausalLM)"
    )


def test_soft_capped_attention_runs_eager_where_the_checkpoint_asks_for_sdpa(tmp_path):
    """sdpa refuses soft-capped scores; a Gemma-3 that caps them is loaded with eager attention."""
    import json

    from examples.tiny_families import build_tiny

    model_dir = build_tiny("gemma3_text", tmp_path / "gemma3")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 10.0}))
    model = load_model(str(model_dir), device="cpu")
    assert model._module.config._attn_implementation == "eager"
    model._module(torch.arange(1, 9)[None])  # sdpa would raise on the cap
    plain = build_tiny("gemma3_text", tmp_path / "plain")
    assert load_model(str(plain), device="cpu")._module.config._attn_implementation == "sdpa"


def test_a_checkpoint_without_a_causal_lm_head_is_refused(tmp_path, tiny_model_dir):
    from transformers import GPT2Config, GPT2Model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    GPT2Model(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="the checkpoint is a GPT2Model, without a causal language-model head"):
        load_model(str(tmp_path), device="cpu")


def test_half_precision_and_cuda_need_a_gpu(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal only applies without one")
    with pytest.raises(ModelLoadError, match="float16 needs a GPU"):
        load_model(str(tiny_model_dir), device="cpu", dtype="float16")
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_model(str(tiny_model_dir), device="cuda")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(str(tiny_model_dir), device="cpu", dtype="float64")


def test_heads_are_refused_where_the_output_projection_does_not_take_them_side_by_side(tiny_model_dir):
    from worker.actor import PatchWorker

    worker = PatchWorker(str(tiny_model_dir), "cpu", "float32", threads=1)
    assert worker.ready(PatchOptions(("resid", "head"))) is None
    config = worker.model._module.config
    config.n_head -= 1
    assert worker.ready(PatchOptions(("resid",))) is None
    assert worker.ready(PatchOptions(("head",))) == (
        f"cannot patch heads: layer 0's attention output projection takes {config.n_embd} inputs, "
        f"not {config.n_head} heads x {config.n_embd // config.n_head} channels"
    )


def test_receivers_are_refused_where_the_model_has_no_such_head(tiny_model_dir):
    from worker.actor import PatchWorker

    worker = PatchWorker(str(tiny_model_dir), "cpu", "float32", threads=1)
    paths = PatchOptions(("head",), "all", method="paths", receivers=("logits", "1.0:q,3.1:v@END"))
    assert worker.ready(paths) == "receiver 1.0:q,3.1:v@END: the model has 3 layers of 4 heads, no head 3.1"
    assert worker.ready(PatchOptions(("head",), "all", method="paths", receivers=("2.3:k",))) is None
