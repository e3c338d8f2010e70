"""adapterspec-flax: a Flax NNX backend for adapterspec, shipped as a separate package.

Install it and adapterspec finds it (entry point ``flax`` in the ``adapterspec`` group); then the
ordinary API works on ``flax.nnx.Module`` models whose attribute paths follow the spec's module names::

    import adapterspec
    from flax import nnx

    model = MyNNXModel(rngs=nnx.Rngs(0))          # model.layers[0].self_attn.q_proj is an nnx.Linear
    adapterspec.load_adapter(model, "path/to/peft-lora")
    logits = model(tokens)
    adapterspec.save_adapter(model, "out/lora")   # PEFT loads it

Supported: LoRA (rsLoRA, ``rank_pattern``/``alpha_pattern``, ``lora_bias``, DoRA on linear layers)
on ``nnx.Linear`` and ``nnx.Embed``; IA3 on ``nnx.Linear``. Importing this package imports no framework.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
