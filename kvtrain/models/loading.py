"""Loading a supported causal LM and its tokenizer by embedded name, local path or Hub id."""

from __future__ import annotations

import importlib.util
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
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
    device: str | torch.device = "cpu",
    revision: str = "main",
    quantization_config: Any = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a supported causal LM and its tokenizer (pad token defaults to EOS), in eval mode.

    `dtype` ``"auto"`` keeps the checkpoint's own dtype (``torch_dtype``/``dtype`` of its config.json). `revision`
    is the Hub branch, tag or commit of config, tokenizer and weights alike. `quantization_config` (a transformers
    ``BitsAndBytesConfig``) loads the weights quantised onto `device`; it needs bitsandbytes.
    """
    if quantization_config is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("a quantised base model (load_in_4bit / load_in_8bit) needs bitsandbytes, which is not "
                         "installed: pip install bitsandbytes (on a CUDA machine), or load the model unquantised")
    source = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(source, revision=revision)
    check_supported(config)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    placement = {} if quantization_config is None else {"quantization_config": quantization_config,
                                                        "device_map": {"": torch.device(device)}}
    model = AutoModelForCausalLM.from_pretrained(
        source, revision=revision, dtype=dtype, attn_implementation=attn_implementation, **placement
    )
    if quantization_config is None:  # bitsandbytes places the weights itself and refuses `.to`
        model.to(device)
    model.eval()
    return model, tokenizer
