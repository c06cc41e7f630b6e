"""NaN and inf stop training with where they were found, instead of being logged (transformers filters a
non-finite loss out of its logs and trains on) or averaged into a metric."""

from __future__ import annotations

import torch
from torch import Tensor

from kvtrain.errors import NonFiniteError


@torch.no_grad()
def first_nonfinite_layer(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> str:
    """Where a plain forward of `model` (a causal LM) first produces NaN or inf: the embeddings, a decoder
    layer, the final norm, or nowhere (then the non-finite value came from the loss or the compressed path)."""
    decoder = model.get_decoder()
    found: list[str] = []
    stages = [("the input embeddings", decoder.embed_tokens)]
    stages += [(f"decoder layer {i}", layer) for i, layer in enumerate(decoder.layers)]
    stages.append(("the final norm", decoder.norm))

    def watch(name):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if not found and not torch.isfinite(hidden).all():
                found.append(name)
        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in stages]
    try:
        decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return f"the first non-finite activations come out of {found[0]}" if found else (
        "a plain forward of the model is finite, so the compressed path or the loss produced it")


def check_finite_gradients(model, step: int) -> None:
    """Raise naming the first parameter whose gradient holds NaN or inf."""
    for name, parameter in model.named_parameters():
        if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
            raise NonFiniteError(f"step {step}: the gradient of {name} is not finite; training stopped (lower the "
                                 "learning rate, or check the model and data)")
