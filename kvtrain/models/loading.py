"""Loading a supported causal LM and its tokenizer by embedded name, local path or Hub id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from kvtrain.models.embedded import EMBEDDED_MODELS, prepare_model
from kvtrain.models.shape import check_supported


def resolve_model(name_or_path: str) -> str:
    """Embedded name -> prepared local folder; existing local folder -> itself; anything else -> Hub id."""
    if name_or_path in EMBEDDED_MODELS:
        return str(prepare_model(name_or_path))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    return name_or_path


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, Any]:
    """Load a supported causal LM and its tokenizer (pad token defaults to EOS), in eval mode."""
    source = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(source)
    check_supported(config)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device)
    model.eval()
    return model, tokenizer
