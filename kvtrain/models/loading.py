"""Loading a supported causal LM and its tokenizer by embedded name, local path or Hub id."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from kvtrain.errors import UserError
from kvtrain.models.embedded import EMBEDDED_MODELS, embedded_model_dir, prepare_model
from kvtrain.models.shape import check_supported

# How long to wait for the Hub before saying it cannot be reached (transformers would retry for ~35 s).
HUB_PROBE_SECONDS = 3.0


def resolve_model(name_or_path: str) -> str:
    """Embedded name -> prepared local folder; existing local folder -> itself; otherwise a Hub id. A name that
    looks like a path and does not exist, and an invalid Hub id, fail at once, saying what would be accepted."""
    if name_or_path in EMBEDDED_MODELS:
        return str(prepare_model(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():  # a local file, however it is written: never looked up on the Hub
        raise UserError(f"{name_or_path}: a local file, not a directory (a model is a folder with config.json and "
                        "weights)")
    if _looks_like_a_path(name_or_path):
        raise UserError(f"{name_or_path}: no such directory (a local model folder was expected; embedded models: "
                        f"{', '.join(EMBEDDED_MODELS)}; or a Hub id such as org/name)")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError as err:
        raise UserError(f"model {name_or_path!r}: not a local folder, an embedded model ({', '.join(EMBEDDED_MODELS)}) "
                        f"or a valid Hub id ({err})") from None
    return name_or_path


def check_hub_model_available(repo_id: str) -> None:
    """A Hub id must be in the local cache or the Hub must answer: fail in seconds, not after ~35 s of retries."""
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    if hub_constants.HF_HUB_OFFLINE:
        raise UserError(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: "
                        "download it where there is network, or pass a local folder")
    reason = _hub_unreachable()
    if reason:
        raise UserError(f"model {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be "
                        f"reached ({reason}): pass a local folder, or download it where there is network")


def _looks_like_a_path(name: str) -> bool:
    """Absolute, explicitly relative, home-relative, more than one '/', or under an existing local folder."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or name.endswith("/"):
        return True
    head = name.split("/")[0]
    return "/" in name and Path(head).is_dir()


def _how_to_restore(source: str) -> str:
    """What to do about a damaged model folder: an embedded model is rebuilt by kvtrain, anything else is copied,
    saved or downloaded again by whoever made it."""
    for name in EMBEDDED_MODELS:
        if Path(source).resolve() == embedded_model_dir(name).resolve():
            return f"rebuild it with `kvtrain prepare-model --force {name}`"
    return "copy, save or download the model into that folder again"


def _hub_unreachable() -> str | None:
    """Why the Hub endpoint cannot be reached within `HUB_PROBE_SECONDS`, or None when it answers."""
    url = urlparse(hub_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as err:
        return f"{url.hostname}:{port}: {err.strerror or err}"
    return None


def load_config(name_or_path: str, *, revision: str = "main") -> tuple[str, Any]:
    """The resolved source (folder or Hub id) and the config of a supported model, read before any weights: a
    path typo, an unreachable Hub or an unsupported architecture fails here in seconds."""
    source = resolve_model(name_or_path)
    if not Path(source).is_dir():
        check_hub_model_available(source)
    config = AutoConfig.from_pretrained(source, revision=revision)
    check_supported(config)
    return source, config


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
    device: str | torch.device = "cpu",
    revision: str = "main",
    quantization_config: Any = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a supported causal LM and its tokenizer (pad token defaults to EOS), in eval mode.

    `dtype` ``"auto"`` keeps the checkpoint's own dtype (``torch_dtype``/``dtype`` of its config.json). `revision`
    is the Hub branch, tag or commit of config, tokenizer and weights alike. `quantization_config` (a transformers
    ``BitsAndBytesConfig``) loads the weights quantised onto `device`; it needs bitsandbytes.
    """
    if quantization_config is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("a quantised base model (load_in_4bit / load_in_8bit) needs bitsandbytes, which is not "
                        "installed: pip install bitsandbytes (on a CUDA machine), or load the model unquantised")
    source, config = load_config(name_or_path, revision=revision)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    placement = {} if quantization_config is None else {"quantization_config": quantization_config,
                                                        "device_map": {"": torch.device(device)}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=dtype, attn_implementation=attn_implementation, **placement
        )
    except SafetensorError as err:
        raise UserError(f"{source}: the model weights cannot be read ({err}): the file is truncated or damaged; "
                        f"{_how_to_restore(source)}") from None
    if quantization_config is None:  # bitsandbytes places the weights itself and refuses `.to`
        model.to(device)
    model.eval()
    return model, tokenizer
