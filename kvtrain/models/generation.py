"""What generation needs from a model's configs: every token id that ends a sequence."""

from __future__ import annotations

from kvtrain.errors import UserError


def eos_token_ids(model) -> list[int]:
    """The EOS ids of `model`: its ``generation_config`` ones (what `generate` stops at), then its config's,
    each an int or a list, without repeats. Llama-3.1-Instruct has three (``<|end_of_text|>``, ``<|eom_id|>``,
    ``<|eot_id|>``), Qwen2.5-Instruct's ``generation_config`` two; a single id is the one-element list."""
    ids: list[int] = []
    for config in (getattr(model, "generation_config", None), model.config):
        value = getattr(config, "eos_token_id", None)
        for token in [value] if isinstance(value, int) else list(value or []):
            if not isinstance(token, int):
                raise UserError(f"{type(config).__name__}.eos_token_id={value!r}: expected an int or a list of ints")
            if token not in ids:
                ids.append(token)
    return ids
