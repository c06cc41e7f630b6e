"""Tiny twins of the models the recipes name: random weights, each real model's features, only the sizes shrunk.

A twin is built from the real model's ``config.json`` values (written out below, with where they come from),
parsed the way ``from_pretrained`` parses a ``config.json`` (legacy ``rope_scaling``/``rope_theta`` keys
included), then shrunk: 2 layers, KV heads divided by 4 (at least 1) and query heads at the real GQA ratio, head_dim 16, hidden size in the
real proportion to heads x head_dim, intermediate size in the real proportion to the hidden size, sliding
windows divided by 128. Everything else is the real value: vocabulary size and special token ids (so the EOS
ids are the real ones), RoPE base and scaling, attention biases, q/k norms, tied embeddings.

The values were copied from the models' ``config.json`` and ``generation_config.json`` files on the Hugging
Face Hub (meta-llama/Llama-3.1-8B-Instruct, mistralai/Mistral-7B-Instruct-v0.3, mistralai/Mistral-7B-v0.1,
Qwen/Qwen2.5-7B-Instruct, Qwen/Qwen2.5-0.5B-Instruct, Qwen/Qwen3-0.6B). The Hub is not reachable from our
machines, so they are kept here as constants: if a model's files change upstream, update them here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


@dataclass(frozen=True)
class RealModel:
    """What a twin copies: the real ``config.json`` values and the EOS ids of ``generation_config.json``."""

    hub_id: str
    config: dict[str, Any]
    generation_eos: tuple[int, ...]
    features: tuple[str, ...] = field(default=())  # the quirks this twin exists to carry, for the docs' table


# meta-llama/Llama-3.1-8B-Instruct config.json; generation_config.json repeats the three EOS ids.
LLAMA_31_8B_INSTRUCT = RealModel(
    "meta-llama/Llama-3.1-8B-Instruct",
    {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 128256,
    },
    generation_eos=(128001, 128008, 128009),
    features=("EOS list", "RoPE scaling (llama3)", "GQA 4:1"),
)

# mistralai/Mistral-7B-Instruct-v0.3 config.json (vocabulary extended to 32768, no sliding window, theta 1e6).
MISTRAL_7B_INSTRUCT_V03 = RealModel(
    "mistralai/Mistral-7B-Instruct-v0.3",
    {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 32768,
    },
    generation_eos=(2,),
    features=("GQA 4:1", "sliding_window null"),
)

# mistralai/Mistral-7B-v0.1 config.json: the sliding-window Mistral (4096-token window on every layer).
MISTRAL_7B_V01 = RealModel(
    "mistralai/Mistral-7B-v0.1",
    {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 32000,
    },
    generation_eos=(2,),
    features=("sliding window on every layer",),
)

# Qwen/Qwen2.5-7B-Instruct config.json; generation_config.json has eos_token_id [151645, 151643].
QWEN25_7B_INSTRUCT = RealModel(
    "Qwen/Qwen2.5-7B-Instruct",
    {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vocab_size": 152064,
    },
    generation_eos=(151645, 151643),
    features=("q/k/v biases", "EOS list (generation_config)", "GQA 7:1"),
)

# The `rope_scaling` block the Qwen2.5 model cards tell users to add for contexts beyond 32768 tokens (YaRN):
# the RoPE scaling whose cos/sin carry an attention factor (0.1 ln 4 + 1), unlike llama3's.
QWEN25_YARN_ROPE_SCALING = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}

# Qwen/Qwen2.5-0.5B-Instruct config.json: the small Qwen2.5 sizes tie the input and output embeddings.
QWEN25_05B_INSTRUCT = RealModel(
    "Qwen/Qwen2.5-0.5B-Instruct",
    {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    generation_eos=(151645, 151643),
    features=("q/k/v biases", "tied embeddings", "EOS list (generation_config)"),
)

# Qwen/Qwen3-0.6B config.json: q/k RMSNorm before RoPE, head_dim (128) decoupled from hidden_size / heads,
# tied embeddings; generation_config.json has eos_token_id [151645, 151643].
QWEN3_06B = RealModel(
    "Qwen/Qwen3-0.6B",
    {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    generation_eos=(151645, 151643),
    features=("q/k norm", "head_dim != hidden_size / heads", "tied embeddings", "EOS list (generation_config)"),
)

REAL_MODELS: dict[str, RealModel] = {
    "llama-3.1-8b-instruct": LLAMA_31_8B_INSTRUCT,
    "mistral-7b-instruct-v0.3": MISTRAL_7B_INSTRUCT_V03,
    "mistral-7b-v0.1": MISTRAL_7B_V01,
    "qwen2.5-7b-instruct": QWEN25_7B_INSTRUCT,
    "qwen2.5-0.5b-instruct": QWEN25_05B_INSTRUCT,
    "qwen3-0.6b": QWEN3_06B,
}

# The recipes' models (recipes/<name>/distill/*.yaml) and their twins.
RECIPE_TWINS = {
    "llama-3.1-8b": "llama-3.1-8b-instruct",
    "mistral-7b": "mistral-7b-instruct-v0.3",
    "qwen2.5-7b": "qwen2.5-7b-instruct",
}

TWIN_LAYERS = 2
TWIN_HEAD_DIM = 16
KV_HEAD_DIVISOR = 4  # query heads follow at the real GQA ratio
WINDOW_DIVISOR = 128


def twin_config(name: str, **overrides: Any):
    """The transformers config of twin `name` (a key of `REAL_MODELS`); `overrides` are config.json keys
    applied after shrinking (e.g. ``rope_scaling=QWEN25_YARN_ROPE_SCALING``, ``attention_dropout=0.1``)."""
    if name not in REAL_MODELS:
        raise ValueError(f"unknown twin {name!r}; twins: {', '.join(REAL_MODELS)}")
    real = dict(REAL_MODELS[name].config)
    heads, kv_heads = real["num_attention_heads"], real["num_key_value_heads"]
    real_head_dim = real.get("head_dim") or real["hidden_size"] // heads
    shrunk_kv = max(1, kv_heads // KV_HEAD_DIVISOR)
    shrunk_heads = shrunk_kv * (heads // kv_heads)
    # hidden_size keeps its real proportion to heads x head_dim (1 for most models, 1/2 for Qwen3-0.6B).
    hidden = round(real["hidden_size"] / (heads * real_head_dim) * shrunk_heads * TWIN_HEAD_DIM)
    shrunk = {
        "num_hidden_layers": TWIN_LAYERS,
        "num_attention_heads": shrunk_heads,
        "num_key_value_heads": shrunk_kv,
        "hidden_size": hidden,
        "intermediate_size": math.ceil(real["intermediate_size"] / real["hidden_size"] * hidden),
    }
    if "head_dim" in real or hidden != shrunk_heads * TWIN_HEAD_DIM:
        shrunk["head_dim"] = TWIN_HEAD_DIM
    if real.get("sliding_window") and (real["model_type"] == "mistral" or real.get("use_sliding_window")):
        shrunk["sliding_window"] = real["sliding_window"] // WINDOW_DIVISOR
    if "max_window_layers" in real:
        shrunk["max_window_layers"] = min(real["max_window_layers"], TWIN_LAYERS)
    values = {**real, **shrunk, **overrides}
    return CONFIG_MAPPING[values["model_type"]].from_dict(values)


def twin_model(name: str, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A random-weight fp32 twin of a real model (see the module docstring), in eval mode, identical for a seed.

    Its ``generation_config`` carries the real ``generation_config.json`` EOS ids, as a loaded checkpoint would.
    """
    config = twin_config(name, **overrides)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        # Building a test model must not perturb the caller's random stream.
        torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig.from_model_config(config)
    model.generation_config.eos_token_id = list(REAL_MODELS[name].generation_eos)
    model.eval()
    return model
