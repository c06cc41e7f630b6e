"""Loading a compression-ready checkpoint (weights + `kv_compression/` bundle) in one call.

A LoRA output loads as a `PeftModel` on top of the base model its training metadata names; full weights load
directly. The bundle is checked (manifest, sha256 of every file) and the loaded weights must have the model
fingerprint recorded when the checkpoint was written, so a compression config is never silently applied to a
model it was not trained with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from kvtrain.artifacts.checkpoint import read_bundle, read_training_metadata
from kvtrain.config import KVCompressionConfig
from kvtrain.models import check_fingerprint, load_model, model_fingerprint

ADAPTER_CONFIG = "adapter_config.json"


def load_compressed(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer, KVCompressionConfig) of a checkpoint folder, the model in eval mode.

    The config's artifact paths point into the checkpoint's ``kv_compression/``. Raises ValueError when the
    bundle is incomplete or altered, or when the loaded weights' fingerprint differs from the recorded one.
    """
    path = Path(path)
    bundle = read_bundle(path)
    metadata = read_training_metadata(path)
    source = f"{bundle.folder}/compression.json"
    kv_config = KVCompressionConfig.from_dict(bundle.compression, source=source).with_artifact_paths(bundle.path_of)
    if (path / ADAPTER_CONFIG).is_file():
        from peft import PeftModel  # only adapters need peft

        # The base weights the adapter was trained on: the recipe's revision, not whatever `main` is now.
        revision = metadata["arguments"]["model"].get("model_revision") or "main"
        base, _ = load_model(metadata["base_model"], dtype=dtype, device=device, revision=revision)
        model = PeftModel.from_pretrained(base, str(path)).eval()
        config = base.config
    else:
        model, _ = load_model(str(path), dtype=dtype, device=device)
        config = model.config
    check_fingerprint(bundle.model_fingerprint or metadata["model_fingerprint"], model_fingerprint(config), path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, kv_config
