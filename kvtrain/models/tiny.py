"""Tiny random-weight models of the supported architectures and a word-level tokenizer, built offline for tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from kvtrain.data import embedded_text

_TINY_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


def tiny_model(
    arch: str = "llama",
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 128,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A random-weight fp32 causal LM of a supported architecture, in eval mode, identical for a seed.

    ``head_dim`` defaults to ``hidden_size // num_heads``; GQA (``num_kv_heads < num_heads``) by default.
    """
    if arch not in _TINY_CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(_TINY_CONFIGS)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; pass head_dim")
        head_dim = hidden_size // num_heads
    config = _TINY_CONFIGS[arch](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if arch == "mistral":
        # Mistral defaults to a 4096-token sliding window, which makes DynamicCache use sliding layers;
        # kvtrain compares compressed caches against full attention.
        config.sliding_window = None
    config.architectures = [_causal_lm_class_name(arch)]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=attn_implementation
        )
    finally:
        # Building a test model must not perturb the caller's random stream.
        torch.random.set_rng_state(generator_state)
    model.eval()
    return model


def _causal_lm_class_name(arch: str) -> str:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}[arch]


def tiny_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained offline on the embedded text; ids match ``tiny_model``'s specials.

    Special ids: ``<pad>``=0, ``<unk>``=1, ``<s>``=2, ``</s>``=3 (bos prepended to every encoding).
    The vocabulary holds the ``vocab_size - 4`` most frequent words, so it fits a tiny model's embedding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    if vocab_size <= len(specials):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(specials)} special tokens")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials)
    tok.train_from_iterator(embedded_text().split("\n"), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
