"""Model loading: local directories like hub ids, and one clear error for everything else."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from worker.model import load_model, load_tokenizer
from worker.options import ModelLoadError


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
    with pytest.raises(ModelLoadError, match="no such directory.*--model PATH"):
        load_model(source)
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_tokenizer(source)


def test_directory_without_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load local directory.*--model PATH") as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value)


def test_causal_lm_that_is_not_gpt2_is_refused(tmp_path, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="LlamaForCausalLM, not a GPT-2-style causal LM"):
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
    assert worker.ready(["resid", "head"]) is None
    attn = worker.model._module.transformer.h[1].attn
    attn.num_heads -= 1
    assert worker.ready(["resid"]) is None
    assert worker.ready(["head"]) == (
        f"cannot patch heads: layer 1's attention output projection takes {attn.c_proj.weight.shape[0]} inputs, "
        f"not {attn.num_heads} heads x {attn.head_dim} channels")
