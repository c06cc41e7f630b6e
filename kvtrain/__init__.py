"""kvtrain: make language models compression-aware (compressed KV cache runtime, replay, calibration, training).

The names most programs need are importable from here, as kvpress users are used to::

    from kvtrain import CompressedCache, KVCompressionConfig, from_pretrained, load_model, replay_compression

They are resolved on first use (PEP 562), so `import kvtrain.config` stays light and importing the package
never imports the training or evaluation stacks.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module defining it
_PUBLIC = {
    "CompressedCache": "kvtrain.runtime.cache",
    "replay_compression": "kvtrain.runtime.replay",
    "replay_disabled": "kvtrain.runtime.replay",
    "teacher_forced_decode": "kvtrain.runtime.decode",
    "observe_attention": "kvtrain.runtime.routing",
    "use_kvtrain_attention": "kvtrain.runtime.routing",
    "load_compressed": "kvtrain.runtime.pretrained",
    "from_pretrained": "kvtrain.runtime.pretrained",
    "CompressedModel": "kvtrain.runtime.pretrained",
    "KVCompressionConfig": "kvtrain.config",
    "ConfigError": "kvtrain.config",
    "KVCompressionArguments": "kvtrain.arguments",
    "load_model": "kvtrain.models",
    "prepare_model": "kvtrain.models",
    "tiny_model": "kvtrain.models",
    "tiny_tokenizer": "kvtrain.models",
    "load_artifacts": "kvtrain.artifacts.calibration",
    "evaluate_loyalty": "kvtrain.eval.loyalty",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kvtrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
