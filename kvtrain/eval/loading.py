"""Loading what `kvtrain eval` evaluates: a model by name or path, or a training output (checkpoint).

A checkpoint is a folder a kvtrain trainer wrote: weights plus `kv_compression/compression.json`, the
compression it was trained for (`kvtrain.load_compressed`). A LoRA adapter is merged into the weights for
evaluation, so generation and the cache see a plain model.
"""

from __future__ import annotations

from pathlib import Path

from kvtrain.artifacts.checkpoint import read_training_metadata
from kvtrain.config import ConfigError, KVCompressionConfig
from kvtrain.models import load_model
from kvtrain.models.limits import check_sequence
from kvtrain.models.loading import load_config
from kvtrain.runtime.pretrained import load_compressed

CHECKPOINT_CONFIG = Path("kv_compression") / "compression.json"
TRAINING_METADATA = "kvtrain_training.json"


def is_checkpoint(source: str) -> bool:
    """A folder written by a kvtrain trainer (its metadata or a `kv_compression/` folder is there)."""
    path = Path(source).expanduser()
    return path.is_dir() and ((path / TRAINING_METADATA).is_file() or (path / "kv_compression").exists())


def check_checkpoint(source: str | Path, what: str = "checkpoint") -> Path:
    """The checkpoint folder, or a ConfigError naming what is missing."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{what} {str(source)!r}: no such folder")
    if not (path / CHECKPOINT_CONFIG).is_file():
        raise ConfigError(f"{what} {str(source)!r}: no {CHECKPOINT_CONFIG} (a kvtrain training output holds the "
                          "compression it was trained for there; evaluate a plain model with --model and --kv-config)")
    if not (path / TRAINING_METADATA).is_file():
        raise ConfigError(f"{what} {str(source)!r}: no {TRAINING_METADATA}; not a kvtrain training output")
    return path


def load_for_eval(source: str):
    """(model, tokenizer, the checkpoint's compression config or None) for a name, a path or a checkpoint."""
    if is_checkpoint(source):
        model, tokenizer, config = load_compressed(check_checkpoint(source))
        if hasattr(model, "merge_and_unload"):  # a LoRA adapter: evaluate the merged weights
            model = model.merge_and_unload()
        model.eval()
        return model, tokenizer, config
    model, tokenizer = load_model(source)
    return model, tokenizer, None


def model_config(source: str):
    """The transformers config of what `load_for_eval` loads, from config.json alone (no weights): for a LoRA
    checkpoint, its base model's."""
    if is_checkpoint(source):
        path = check_checkpoint(source)
        if not (path / "config.json").is_file():  # an adapter: the positions are its base model's
            base = read_training_metadata(path).get("base_model")
            if not isinstance(base, str) or not base:
                raise ConfigError(f"{path / TRAINING_METADATA}: field 'base_model' = {base!r}: a LoRA checkpoint "
                                  "must name its base model")
            return load_config(base)[1]
        source = str(path)
    return load_config(source)[1]


def check_suite_limits(suite, options, source: str, where: str) -> None:
    """Refuse, from config.json before the weights load, a run of `suite` with `options` on `source` whose longest
    sequence exceeds the model's positions or the machine's memory; `where` names the options' origin."""
    longest = suite.longest_sequence(options)
    if longest is not None:
        tokens, what = longest
        check_sequence(model_config(source), tokens, f"{where} {what}", batch=getattr(options, "batch_size", 1))


def checkpoint_config(source: str | Path):
    """The compression config a checkpoint was trained for (artifact paths resolved), without loading weights."""
    path = check_checkpoint(source)
    return KVCompressionConfig.load(path / CHECKPOINT_CONFIG).with_artifact_paths(
        lambda name: str(path / "kv_compression" / name))
