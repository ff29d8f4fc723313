"""Actor side: everything that runs next to a model, in layers (docs/DESIGN.md, Architecture):
methods (the registry and one runner per results table) over engines (one per way of computing)
over kernels over batch over graph over model over contract (what the driver shares, torch-free).

Importable and usable without Ray, e.g. in a notebook:
    from worker.model.load import load_model
    from worker.methods.registry import patch_batch
    model = load_model("openai-community/gpt2")
    result = patch_batch(model, pairs, components=["resid"])
The package itself imports nothing, so the driver can use its light modules
(`worker.contract.options`, `worker.contract.pairs`) without loading torch.
"""
