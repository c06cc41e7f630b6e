"""Fixtures for loading and publishing: tiny trained checkpoints (LoRA and merged, two distillation steps) and a
local Hub on 127.0.0.1 (`tests.hub.local_hub`) that huggingface_hub is pointed at.

huggingface_hub reads its environment (``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE``, the token path) once,
when it is imported. The `hub` fixture therefore sets both the environment (what a subprocess reads) and the
values this process's huggingface_hub already read (`huggingface_hub.constants`), so in-process calls and
subprocesses both talk to the local Hub and use a Hugging Face home inside the test's folder.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch

from kvtrain.io import DIGEST_KEY, MANIFEST, write_checked_json
from kvtrain.training.output import write_output_manifest
from tests.hub.local_hub import LocalHub
from tests.training.conftest import TINY_ARGS

# What the local Hub accepts as a valid token; the leak test looks for it everywhere.
TOKEN = "hf_kvtrainLocalTestToken0123456789abcdef"
BASE_REPO = "kvtrain-test/tiny-llama"


def train(base: Path, out: Path, *extra: str) -> Path:
    """Two distillation steps on the tiny model (expected-attention eviction with calibrated statistics)."""
    from kvtrain.training.run import main

    return main(["--model_name_or_path", str(base), "--output_dir", str(out), *TINY_ARGS, "--max_steps", "2",
                 "--save_strategy", "no", "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj",
                 "v_proj", "--kv_scorer", "expected_attention", "--use_cpu", "true", *extra])


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from kvtrain.models import tiny_model, tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-base")
    tiny_model("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def query_stats(path: Path, config, *, seed: int = 0, **fingerprint_changes) -> Path:
    """Expected-attention query statistics for `config`'s shape, recording its fingerprint (changed as asked)."""
    from kvtrain.artifacts.query_stats import save_query_stats
    from kvtrain.models import ModelShape, model_fingerprint

    shape = ModelShape.of(config)
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape.num_layers, shape.num_heads, shape.head_dim, generator=g)
    sigma = torch.eye(shape.head_dim).expand(shape.num_layers, shape.num_heads, -1, -1).clone()
    save_query_stats(path, mu, sigma, {**model_fingerprint(config), **fingerprint_changes})
    return path


@pytest.fixture(scope="session")
def stats_file(tiny_base, tmp_path_factory) -> Path:
    from transformers import AutoConfig

    return query_stats(tmp_path_factory.mktemp("stats") / "query_stats.safetensors", AutoConfig.from_pretrained(tiny_base))


@pytest.fixture(scope="session")
def lora_checkpoint(tiny_base, stats_file, tmp_path_factory) -> Path:
    return train(tiny_base, tmp_path_factory.mktemp("lora"), "--kv_param", f"stats={stats_file}")


@pytest.fixture(scope="session")
def merged_checkpoint(tiny_base, stats_file, tmp_path_factory) -> Path:
    return train(tiny_base, tmp_path_factory.mktemp("merged"), "--kv_param", f"stats={stats_file}",
                 "--merge_adapter", "true")


@pytest.fixture
def copy_of(tmp_path):
    """A writable copy of a checkpoint, for tests that damage it."""

    def copy(folder: Path) -> Path:
        return Path(shutil.copytree(folder, tmp_path / f"copy-{folder.name}"))

    return copy


def rewrite_json(path: Path, change) -> None:
    """Change a JSON file of a checkpoint as a kvtrain that wrote it so would have: its content digest and the
    checkpoint's manifest recomputed."""
    data = json.loads(path.read_text())
    digest = data.pop(DIGEST_KEY, None)
    change(data)
    if digest is None:
        path.write_text(json.dumps(data, indent=2))
    else:
        write_checked_json(path, data)
    for folder in (path.parent, path.parent.parent):
        if (folder / MANIFEST).is_file():
            write_output_manifest(folder)


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def point_huggingface_hub_at(monkeypatch, endpoint: str, home: Path, *, token: str | None = TOKEN,
                             offline: bool = False) -> None:
    """Environment and huggingface_hub's already-read settings: `endpoint`, a fresh HF home, `token`."""
    from huggingface_hub import constants

    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN_PATH",
                "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local Hub holding the tiny base model as `BASE_REPO`, with huggingface_hub pointed at it."""
    with LocalHub(TOKEN) as server:
        point_huggingface_hub_at(monkeypatch, server.url, tmp_path / "hf-home")
        yield server


@pytest.fixture
def hub_with_base(hub, tiny_base):
    """`hub` with the tiny base model uploaded as `BASE_REPO` (what a published LoRA names as its base)."""
    from huggingface_hub import HfApi

    api = HfApi(token=TOKEN)
    api.create_repo(BASE_REPO)
    api.upload_folder(repo_id=BASE_REPO, folder_path=tiny_base)
    hub.requests.clear()
    return hub
