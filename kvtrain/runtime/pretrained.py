"""Loading a compression-ready checkpoint (weights + `kv_compression/` bundle) in one call.

`from_pretrained` takes a local folder or a Hub repo id (downloaded through `huggingface_hub.snapshot_download`,
so the Hugging Face cache, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE=1`` behave as everywhere else) and returns a
`CompressedModel`: the model, its tokenizer, the compression config it was trained for and a factory of fresh
compressed caches, so that `CompressedModel.generate` runs with the checkpoint's compression by default.

A LoRA output loads as a `PeftModel` on top of the base model its training metadata names (``base_model`` of
``kvtrain_training.json``: an embedded name such as ``smollm2-135m``, rebuilt identically on any machine with
kvtrain, a Hub id, or a local folder; `kvtrain publish` replaces a local folder by the Hub id the user names).
Full weights load directly. The bundle is checked (manifest, sha256 of every file), and the loaded weights must
have the model fingerprint recorded in the bundle and in every safetensors artifact, so a compression config is
never silently applied to a model it was not trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from kvtrain.artifacts.checkpoint import (
    TRAINING_METADATA,
    check_artifact_fingerprints,
    read_bundle,
    read_training_metadata,
)
from kvtrain.config import KVCompressionConfig
from kvtrain.errors import UserError
from kvtrain.io import CorruptFileError, manifest_problem
from kvtrain.models import EMBEDDED_MODELS, check_fingerprint, load_model, model_fingerprint
from kvtrain.runtime.cache import CompressedCache

ADAPTER_CONFIG = "adapter_config.json"


def load_compressed(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    base_model: str | None = None,
):
    """(model, tokenizer, KVCompressionConfig) of a checkpoint folder, the model in eval mode.

    The config's artifact paths point into the checkpoint's ``kv_compression/``. `base_model` replaces the base
    a LoRA checkpoint's metadata names (for a base kept elsewhere on this machine). Raises ValueError when a file
    of the checkpoint or its bundle is incomplete or altered (their manifests), when the base cannot be found, or
    when the loaded weights' fingerprint differs from the recorded one.
    """
    path = Path(path)
    damaged = manifest_problem(path)
    if damaged is not None:
        raise CorruptFileError(f"{path}: {damaged}; train again or restore the folder from a copy")
    bundle = read_bundle(path)
    metadata = read_training_metadata(path)
    source = f"{bundle.folder}/compression.json"
    kv_config = KVCompressionConfig.from_dict(bundle.compression, source=source).with_artifact_paths(bundle.path_of)
    if (path / ADAPTER_CONFIG).is_file():
        from peft import PeftModel  # only adapters need peft

        # The base weights the adapter was trained on: the recipe's revision, not whatever `main` is now (a base
        # the caller names instead is taken as it is).
        recorded = (metadata.get("arguments") or {}).get("model", {}).get("model_revision") or "main"
        revision = "main" if base_model else recorded
        base, _ = load_model(_base_model(path, base_model or metadata.get("base_model")), dtype=dtype, device=device,
                             revision=revision)
        model = PeftModel.from_pretrained(base, str(path)).eval()
        config = base.config
    else:
        model, _ = load_model(str(path), dtype=dtype, device=device)
        config = model.config
    check_fingerprint(bundle.model_fingerprint or metadata["model_fingerprint"], model_fingerprint(config), path)
    check_artifact_fingerprints(bundle, config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, kv_config


def _base_model(checkpoint: Path, base: Any) -> str:
    """The base of a LoRA checkpoint, refused with what to do when this machine cannot load it."""
    where = checkpoint / TRAINING_METADATA
    if not isinstance(base, str) or not base:
        raise ValueError(f"{where}: field 'base_model' = {base!r}: a LoRA checkpoint must name its base model")
    if base not in EMBEDDED_MODELS and is_local_path(base) and not Path(base).expanduser().is_dir():
        raise ValueError(
            f"{where}: base_model {base!r} is a local folder that does not exist on this machine; pass "
            "base_model= naming the same weights (a Hub id, an embedded name such as smollm2-135m, or a folder)"
        )
    return base


def is_local_path(name: str) -> bool:
    """Whether `name` is written as a filesystem path rather than a Hub id (``org/name``) or an embedded name."""
    return name.startswith(("/", "./", "../", "~", "\\")) or name in (".", "..") or name.count("/") > 1


@dataclass
class CompressedModel:
    """A loaded compression-ready checkpoint: generation uses its compression unless told otherwise."""

    model: Any  # a transformers causal LM, or a PeftModel around one
    tokenizer: Any
    config: KVCompressionConfig
    path: Path  # the local folder it was loaded from (a Hub snapshot for a repo id)

    def new_cache(self) -> CompressedCache:
        """A fresh compressed cache of the checkpoint's config (one per generation; a cache is not reusable)."""
        return CompressedCache.for_model(self.model, self.config)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """`model.generate` under a fresh compressed cache (unless `past_key_values` is given); returns its ids."""
        kwargs.setdefault("past_key_values", self.new_cache())
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return self.model.generate(input_ids=input_ids, **kwargs)

    def generate_text(self, prompt: str, *, chat: bool = False, max_new_tokens: int = 64, **kwargs) -> str:
        """The greedy continuation of `prompt` (with the chat template when `chat`), decoded."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"generate_text: prompt={prompt!r}: give a non-empty text to continue")
        if chat:
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
        kwargs.setdefault("do_sample", False)
        out = self.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def from_pretrained(
    path_or_repo_id: str | Path,
    revision: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    base_model: str | None = None,
    cache_dir: str | Path | None = None,
) -> CompressedModel:
    """Load a compression-ready checkpoint from a local folder or a Hub repo id (at `revision`).

    >>> m = kvtrain.from_pretrained("runs/quickstart/model")        # doctest: +SKIP
    >>> m.generate_text("Explain Python decorators.", chat=True)    # doctest: +SKIP
    """
    folder = resolve_checkpoint(path_or_repo_id, revision, cache_dir=cache_dir)
    model, tokenizer, config = load_compressed(folder, dtype=dtype, device=device, base_model=base_model)
    return CompressedModel(model, tokenizer, config, folder)


def resolve_checkpoint(path_or_repo_id: str | Path, revision: str | None = None, *,
                       cache_dir: str | Path | None = None) -> Path:
    """A local checkpoint folder: `path_or_repo_id` itself, or the Hub snapshot of that repo id at `revision`."""
    name = str(path_or_repo_id)
    local = Path(name).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(f"{name}: a local folder has no revision (revision={revision!r} is for Hub repo ids)")
        return local
    if local.exists():
        raise UserError(f"{name}: a local file, not a checkpoint folder (give the folder that holds the weights and "
                        "kv_compression/, or a Hub repo id ORG/NAME)")
    if isinstance(path_or_repo_id, Path) or is_local_path(name):
        raise ValueError(f"{name}: no such checkpoint folder")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir))
    except HFValidationError:
        raise ValueError(f"{name!r} is neither a local folder nor a Hub repo id (ORG/NAME)") from None
    except RevisionNotFoundError:
        raise ValueError(f"{name}: the Hub repo has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{name}: not a local folder, and {constants.ENDPOINT} has no such repo (or it is "
                         "private and no valid token was given)") from None
    except LocalEntryNotFoundError as err:
        why = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode() else f"{constants.ENDPOINT} cannot be reached")
        raise ValueError(f"{name}{'@' + revision if revision else ''}: not in the Hugging Face cache and {why} "
                         f"({_first_line(err.__cause__ or err)})") from None


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
