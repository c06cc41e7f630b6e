"""The model options of a recipe (TRL's `ModelConfig`): each one passed on (to the loader or to PEFT) or refused
by name, so that no option a user sets is silently ignored.

`trust_remote_code` and `torch_dtype` are not `ModelConfig` fields (TRL renamed the latter `dtype`): a recipe
setting them is refused by the recipe parser as an unknown key. Remote code is never needed: kvtrain supports
only architectures that transformers implements (`kvtrain.models.SUPPORTED_MODEL_TYPES`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from trl import ModelConfig, get_quantization_config

from kvtrain.errors import UserError

# kvtrain replaces the model's attention with its own (`kvtrain.runtime.routing`): full-attention forwards run
# SDPA there, so only these can be honoured.
ATTENTION_IMPLEMENTATIONS = (None, "sdpa", "kvtrain")

# Where every `ModelConfig` field goes. A field TRL adds later is refused when a recipe sets it (`load_options`).
LOADER_FIELDS = ("model_name_or_path", "model_revision", "dtype", "attn_implementation", "load_in_8bit",
                 "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")
FOUR_BIT_FIELDS = ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")
PEFT_FIELDS = ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
               "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora")


def resolve_dtype(name: str | None) -> torch.dtype | str:
    """``dtype`` of a recipe: a torch dtype name, or ``auto`` (the checkpoint's own dtype, not float32)."""
    if name in (None, "auto"):
        return "auto"
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise UserError(f"dtype={name!r} is not a torch dtype (e.g. float32, bfloat16) or 'auto'")
    return value


def load_options(model_args: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of `kvtrain.models.load_model` for a recipe's model options; unsupported ones refused."""
    changed = [f.name for f in dataclasses.fields(model_args) if getattr(model_args, f.name) != _default(f)]
    unplaced = [name for name in changed if name not in LOADER_FIELDS + PEFT_FIELDS]
    if unplaced:
        raise UserError(f"model option(s) {unplaced} are set but this kvtrain passes them neither to the loader "
                        "nor to PEFT; remove them")
    for names, switch in ((PEFT_FIELDS[1:], "use_peft"), (FOUR_BIT_FIELDS, "load_in_4bit")):
        idle = [name for name in changed if name in names]
        if idle and not getattr(model_args, switch):  # e.g. a LoRA recipe run with --use_peft false: say so
            warnings.warn(f"model option(s) {idle} are set but {switch} is false, so they do nothing", stacklevel=2)
    if model_args.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise UserError(
            f"attn_implementation={model_args.attn_implementation!r}: kvtrain runs the model's attention itself "
            f"(the compressed cache, replay, and SDPA for full attention); use one of {ATTENTION_IMPLEMENTATIONS}"
        )
    options: dict[str, Any] = {
        "dtype": resolve_dtype(model_args.dtype),
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
    }
    quantised = model_args.load_in_4bit or model_args.load_in_8bit
    if quantised:
        flag = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
        if not model_args.use_peft:
            raise UserError(f"{flag}: a quantised base model can only be trained through LoRA; set use_peft: true")
        if model_args.load_in_4bit and options["dtype"] == "auto":
            raise UserError("load_in_4bit computes in `dtype`: set dtype to bfloat16 or float16, not auto")
        options["quantization_config"] = get_quantization_config(model_args)
        if torch.cuda.is_available():
            from accelerate import PartialState

            options["device"] = f"cuda:{PartialState().local_process_index}"
    return options


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default
