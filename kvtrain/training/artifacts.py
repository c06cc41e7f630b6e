"""What a distillation run leaves behind, and loading it back in one call.

An output folder holds the trained weights (`save_pretrained`: a LoRA adapter or full weights), the
tokenizer, `kv_compression/compression.json` (the `KVCompressionConfig` the model was trained for) with a
copy of every artifact file it references (projections, quant plan, budgets, query statistics) under a
name relative to that folder (with `train_projections`, the projections file holds the trained projections,
in the calibration format), and `kvtrain_training.json` (arguments, the model fingerprint, metrics). `load_compressed` checks that the
weights it loads have the fingerprint recorded at training time, so a compression config is never
silently applied to a model it was not trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from kvtrain.config import KVCompressionConfig
from kvtrain.io import atomic_write_bytes, atomic_write_text
from kvtrain.models import check_fingerprint, load_model, model_fingerprint
from kvtrain.training.projections import TrainableProjections

ARTIFACTS = "kv_compression"
COMPRESSION_CONFIG = Path(ARTIFACTS) / "compression.json"
TRAINING_METADATA = "kvtrain_training.json"
ADAPTER_CONFIG = "adapter_config.json"


def write_artifacts(
    output_dir: str | Path,
    kv_config: KVCompressionConfig,
    metadata: dict[str, Any],
    *,
    projections: TrainableProjections | None = None,
) -> None:
    """Write the compression config and the training metadata (JSON, atomically) next to the weights.

    Referenced files are copied, except the low-rank projections when `projections` (trained) are given:
    those are written in their place, under the calibrated file's name.
    """
    output_dir = Path(output_dir)
    folder = output_dir / ARTIFACTS
    folder.mkdir(parents=True, exist_ok=True)
    trained_source = kv_config.lowrank.projections if projections is not None else None

    def bundle(path: str) -> str:
        source = Path(path)
        target = folder / source.name
        if path == trained_source:
            projections.save(target)
        elif source.resolve() != target.resolve():
            atomic_write_bytes(target, source.read_bytes())
        return source.name

    kv_config.with_artifact_paths(bundle).save(output_dir / COMPRESSION_CONFIG)
    atomic_write_text(output_dir / TRAINING_METADATA, json.dumps(metadata, indent=2, default=str))


def read_metadata(path: str | Path) -> dict[str, Any]:
    file = Path(path) / TRAINING_METADATA
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a kvtrain distillation output (no {TRAINING_METADATA})")
    return json.loads(file.read_text())


def load_compressed(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer, KVCompressionConfig) of a distillation output folder, model in eval mode.

    A LoRA output is loaded as a `PeftModel` on top of the recorded base model. Raises ValueError when
    the loaded weights' fingerprint differs from the one recorded at training time.
    """
    path = Path(path)
    metadata = read_metadata(path)
    kv_config = KVCompressionConfig.load(path / COMPRESSION_CONFIG).with_artifact_paths(
        lambda name: str(path / ARTIFACTS / name)
    )
    if (path / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        base, _ = load_model(metadata["base_model"], dtype=dtype, device=device)
        model = PeftModel.from_pretrained(base, str(path)).eval()
        config = base.config
    else:
        model, _ = load_model(str(path), dtype=dtype, device=device)
        config = model.config
    check_fingerprint(metadata["model_fingerprint"], model_fingerprint(config), path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, kv_config
