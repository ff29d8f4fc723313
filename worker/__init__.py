"""Actor side: everything that runs next to a model (loading, patching traces, result rows).

Importable and usable without Ray, e.g. in a notebook:
    from worker.model.load import load_model
    from worker.engines.trace import patch_batch
    model = load_model("openai-community/gpt2")
    result = patch_batch(model, pairs, components=["resid"])
The package itself imports nothing, so the driver can use its light modules
(`worker.contract.options`, `worker.contract.pairs`) without loading torch.
"""
