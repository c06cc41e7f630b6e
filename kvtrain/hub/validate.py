"""What `kvtrain publish` checks before anything leaves the machine, and measures for the card.

The checkpoint is loaded the way a user will load it (`kvtrain.from_pretrained`: manifest, sha256 of every
bundle file, the model fingerprint of the bundle and of each safetensors artifact), then generates greedily
under its compressed cache from a held-out prompt of the embedded text. That generation must produce finite
scores, and its cache gives the bytes per token the card reports (`CompressedCache.nbytes` over the tokens
seen, against a full cache of the same model), and the bookkeeping it holds besides (`kvtrain.eval.cache_bytes`:
positions, validity flags, votes, scorer state, the scorer's query window).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvtrain.artifacts.checkpoint import check_artifact_fingerprints, read_bundle, read_training_metadata
from kvtrain.config import ConfigError
from kvtrain.data import load_texts, token_blocks
from kvtrain.eval.cache_bytes import cache_bytes
from kvtrain.models import head_dim
from kvtrain.runtime.pretrained import ADAPTER_CONFIG, CompressedModel, from_pretrained


class PublishError(ConfigError):
    """A one-line reason a checkpoint cannot be published (a ConfigError, so the command line reports it
    without a traceback)."""


@dataclass(frozen=True)
class CacheMeasure:
    """Bytes the compressed cache held after a greedy generation, against a full cache of the same model."""

    prompt_tokens: int
    new_tokens: int
    seen: int  # tokens the cache has seen (the last generated token is never fed back)
    nbytes: int
    bookkeeping_bytes: int  # positions, validity flags, votes, scorer state and query window, besides `nbytes`
    stored_dtype: str
    full_bytes_per_token: int  # a full cache in `stored_dtype`
    full_bytes_per_token_16bit: int

    @property
    def bytes_per_token(self) -> float:
        return self.nbytes / self.seen


@dataclass
class CheckedCheckpoint:
    folder: Path
    loaded: CompressedModel
    metadata: dict[str, Any]  # kvtrain_training.json
    files: dict[str, str]  # kv_compression/ file name -> sha256, as checked
    fingerprinted: list[str]  # kv_compression/ files whose recorded model fingerprint was checked
    fingerprint: dict[str, Any]
    measure: CacheMeasure

    @property
    def is_adapter(self) -> bool:
        return (self.folder / ADAPTER_CONFIG).is_file()

    @property
    def step(self) -> int | None:
        return training_step(self.metadata)


def training_step(metadata: dict[str, Any]) -> int | None:
    """The training step the weights are from: the last step the log of ``kvtrain_training.json`` records."""
    history = (metadata.get("metrics") or {}).get("log_history") or []
    steps = [entry["step"] for entry in history if isinstance(entry.get("step"), int)]
    return max(steps) if steps else None


def check_checkpoint(folder: str | Path, *, base_model: str | None = None, prompt_tokens: int = 512,
                     new_tokens: int = 16) -> CheckedCheckpoint:
    """Load, check and measure a checkpoint folder; any problem is a PublishError naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder}: no such checkpoint folder")
    try:
        loaded = from_pretrained(folder, base_model=base_model)
        bundle = read_bundle(folder)  # already checked by loading; read again for the card's file list
        metadata = read_training_metadata(folder)
        base_config = getattr(loaded.model, "get_base_model", lambda: loaded.model)().config
        fingerprinted = check_artifact_fingerprints(bundle, base_config)
    except (ValueError, OSError) as err:  # transformers and peft raise OSError for missing weight files
        raise PublishError(f"{folder}: not publishable: {_one_line(err)}") from err
    measure = measure_cache(loaded, prompt_tokens=prompt_tokens, new_tokens=new_tokens, where=folder)
    return CheckedCheckpoint(folder, loaded, metadata, bundle.files, fingerprinted, bundle.model_fingerprint, measure)


@torch.no_grad()
def measure_cache(loaded: CompressedModel, *, prompt_tokens: int, new_tokens: int, where: Path) -> CacheMeasure:
    """Greedy generation of `new_tokens` after a held-out prompt of `prompt_tokens`, under a fresh compressed
    cache; raises PublishError when a score is not finite."""
    try:
        prompt = token_blocks(loaded.tokenizer, load_texts(None, split="heldout"), prompt_tokens, n_blocks=1)
    except ValueError as err:  # the held-out text is shorter than asked
        raise PublishError(f"--prompt-tokens {prompt_tokens}: {err}") from None
    prompt = prompt.to(loaded.model.device)
    cache = loaded.new_cache()
    out = loaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    if not all(torch.isfinite(step).all() for step in out.logits):  # raw logits: processors set -inf
        raise PublishError(f"{where}: generation under the compressed cache gives non-finite logits")
    config = loaded.model.config
    elements = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config)  # keys + values
    dtype = next(loaded.model.parameters()).dtype
    return CacheMeasure(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        seen=cache.get_seq_length(),
        nbytes=cache.nbytes(),
        bookkeeping_bytes=round(cache_bytes(cache, config).bookkeeping * cache.get_seq_length()),  # one row
        stored_dtype=str(dtype).removeprefix("torch."),
        full_bytes_per_token=elements * dtype.itemsize,
        full_bytes_per_token_16bit=elements * 2,
    )


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
