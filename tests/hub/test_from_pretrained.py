"""`kvtrain.from_pretrained`: a trained checkpoint (local folder or Hub repo id) loads in one call and generates
under its own compression, token for token what the pieces assembled by hand give; plain transformers loads
the same weights; damaged, foreign or newer bundles are refused by name; the Hub cache works offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kvtrain
from kvtrain.io import MANIFEST as OUTPUT_MANIFEST
from kvtrain.config import KVCompressionConfig
from kvtrain.data import load_texts, token_blocks
from kvtrain.runtime.cache import CompressedCache
from tests.hub.conftest import TOKEN, closed_port, query_stats, rewrite_json
from tests.training.conftest import REPO

NEW_TOKENS = 24


def prompt_ids(tokenizer, length: int = 48) -> torch.Tensor:
    return token_blocks(tokenizer, load_texts(None, split="heldout"), length, n_blocks=1)


def config_by_hand(checkpoint) -> KVCompressionConfig:
    """The bundle's compression config with its one artifact (query statistics) resolved by hand."""
    data = json.loads((checkpoint / "kv_compression" / "compression.json").read_text())
    data["scorer"]["params"]["stats"] = str(checkpoint / "kv_compression" / data["scorer"]["params"]["stats"])
    return KVCompressionConfig.from_dict(data)


@torch.no_grad()
def greedy(model, ids, cache=None) -> torch.Tensor:
    return greedy_with_logits(model, ids, cache)[0]


@torch.no_grad()
def greedy_with_logits(model, ids, cache=None, generate=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy continuation and the raw logits of each step ([NEW_TOKENS, vocab])."""
    generate = generate or (lambda **kw: model.generate(past_key_values=cache, pad_token_id=0, **kw))
    out = generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                   min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:], torch.cat(out.logits)


def model_by_hand(checkpoint, tiny_base):
    if (checkpoint / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), checkpoint).eval()
    return AutoModelForCausalLM.from_pretrained(checkpoint).eval()


@pytest.mark.parametrize("kind", ["lora", "merged"])
def test_generation_uses_the_checkpoint_compression_token_for_token(kind, request, tiny_base):
    checkpoint = request.getfixturevalue(f"{kind}_checkpoint")
    reference = model_by_hand(checkpoint, tiny_base)
    ids = prompt_ids(AutoTokenizer.from_pretrained(checkpoint))
    cache = CompressedCache.for_model(reference, config_by_hand(checkpoint))
    expected, expected_logits = greedy_with_logits(reference, ids, cache)
    # the compression is active: the cache holds fewer tokens than it saw, and the logits differ from a full
    # cache's (the tiny random model's greedy tokens are a short cycle either way, so tokens alone would not tell)
    assert int(cache.stored_tokens()[0].max()) < cache.get_seq_length()
    assert (greedy_with_logits(reference, ids)[1] - expected_logits).abs().max() > 1e-3

    loaded = kvtrain.from_pretrained(checkpoint)
    assert loaded.config == config_by_hand(checkpoint)
    assert isinstance(loaded.new_cache(), CompressedCache) and loaded.new_cache() is not loaded.new_cache()
    tokens, logits = greedy_with_logits(loaded.model, ids, generate=loaded.generate)  # its default cache
    assert tokens.tolist() == expected.tolist()
    torch.testing.assert_close(logits, expected_logits)
    text = loaded.generate_text(loaded.tokenizer.decode(ids[0]), max_new_tokens=4)
    assert isinstance(text, str) and text


@pytest.mark.parametrize("kind", ["lora", "merged"])
def test_plain_transformers_loads_the_weights(kind, request, tiny_base):
    checkpoint = request.getfixturevalue(f"{kind}_checkpoint")
    ids = prompt_ids(AutoTokenizer.from_pretrained(checkpoint), 16)
    plain = AutoModelForCausalLM.from_pretrained(checkpoint)  # the adapter: its base from adapter_config.json
    loaded = kvtrain.from_pretrained(checkpoint)
    with torch.no_grad():
        logits = plain(input_ids=ids).logits
        assert torch.equal(logits, loaded.model(input_ids=ids).logits)
        # the trained weights, not the base's
        assert not torch.allclose(logits, AutoModelForCausalLM.from_pretrained(tiny_base)(input_ids=ids).logits)


def test_a_newer_schema_version_is_refused(lora_checkpoint, copy_of):
    checkpoint = copy_of(lora_checkpoint)
    rewrite_json(checkpoint / "kv_compression" / "config.json", lambda m: m.update(schema_version=2))
    with pytest.raises(ValueError, match=r"config.json: schema_version 2 was written by a newer kvtrain .*upgrade"):
        kvtrain.from_pretrained(checkpoint)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "kvtrain_training.json"])
def test_a_damaged_or_truncated_file_of_the_checkpoint_is_refused_naming_it(lora_checkpoint, copy_of, name):
    for damage in ("flip", "truncate"):
        checkpoint = copy_of(lora_checkpoint) if damage == "flip" else checkpoint
        path = checkpoint / name
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data if damage == "flip" else data[: len(data) // 2]))
        with pytest.raises(ValueError, match=rf"{name} (does not match the sha256|has \d+ bytes)"):
            kvtrain.load_compressed(checkpoint)


def test_a_missing_artifact_is_refused(lora_checkpoint, copy_of):
    checkpoint = copy_of(lora_checkpoint)
    (checkpoint / OUTPUT_MANIFEST).unlink()  # the bundle's own manifest (the output's is tested above)
    (checkpoint / "kv_compression" / "query_stats.safetensors").unlink()
    with pytest.raises(ValueError, match=r"query_stats.safetensors: listed in config.json but missing"):
        kvtrain.from_pretrained(checkpoint)


def test_an_altered_artifact_is_refused(lora_checkpoint, copy_of):
    checkpoint = copy_of(lora_checkpoint)
    (checkpoint / OUTPUT_MANIFEST).unlink()  # the bundle's own manifest (the output's is tested above)
    path = checkpoint / "kv_compression" / "query_stats.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"query_stats.safetensors: sha256 differs from config.json"):
        kvtrain.from_pretrained(checkpoint)


def test_another_models_artifact_is_refused_even_with_a_consistent_manifest(lora_checkpoint, copy_of, tiny_base):
    """Statistics of a model with another RoPE base, same tensor shapes, the manifest rewritten to match."""
    from transformers import AutoConfig

    from kvtrain.artifacts.format import sha256_file

    checkpoint = copy_of(lora_checkpoint)
    path = checkpoint / "kv_compression" / "query_stats.safetensors"
    query_stats(path, AutoConfig.from_pretrained(tiny_base), rope_theta=500000.0)
    rewrite_json(checkpoint / "kv_compression" / "config.json",
                 lambda m: m["files"].update({"query_stats.safetensors": sha256_file(path)}))
    with pytest.raises(ValueError, match=r"query_stats.safetensors: made for a different model .*rope_theta: "
                                         r"500000.0 in the artifacts, 10000.0 for this model"):
        kvtrain.from_pretrained(checkpoint)


def test_a_lora_base_missing_on_this_machine_is_named(lora_checkpoint, copy_of, tiny_base):
    checkpoint = copy_of(lora_checkpoint)
    rewrite_json(checkpoint / "kvtrain_training.json", lambda m: m.update(base_model="/nowhere/tiny-base"))
    with pytest.raises(ValueError, match=r"kvtrain_training.json: base_model '/nowhere/tiny-base' is a local folder "
                                         r"that does not exist on this machine; pass base_model="):
        kvtrain.from_pretrained(checkpoint)
    assert kvtrain.from_pretrained(checkpoint, base_model=str(tiny_base)).config.budget == 8


def test_names_that_are_neither_folders_nor_repo_ids(tmp_path, lora_checkpoint):
    with pytest.raises(ValueError, match=r"no-such/folder/here: no such checkpoint folder"):
        kvtrain.from_pretrained("no-such/folder/here")
    with pytest.raises(ValueError, match=r"a local folder has no revision"):
        kvtrain.from_pretrained(lora_checkpoint, revision="main")


# --------------------------------------------------------------------------------------------- the Hub
def upload(folder, repo_id: str, revision: str | None = None) -> None:
    """Put a checkpoint folder on the local Hub as it is (huggingface_hub only, not `kvtrain publish`)."""
    from huggingface_hub import HfApi

    api = HfApi(token=TOKEN)
    api.create_repo(repo_id, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision)


@pytest.mark.timeout(120)
def test_a_hub_repo_id_loads_through_huggingface_hub(hub, lora_checkpoint, merged_checkpoint, tiny_base):
    upload(lora_checkpoint, "kvtrain-test/lora", revision="step-2")
    upload(merged_checkpoint, "kvtrain-test/lora")  # main holds other weights than the branch
    ids = prompt_ids(AutoTokenizer.from_pretrained(lora_checkpoint))
    local = kvtrain.from_pretrained(lora_checkpoint)
    expected = greedy(local.model, ids, local.new_cache())

    remote = kvtrain.from_pretrained("kvtrain-test/lora", revision="step-2")
    assert remote.path.is_relative_to(os.environ["HF_HUB_CACHE"]) and type(remote.model).__name__.startswith("Peft")
    assert greedy(remote.model, ids, remote.new_cache()).tolist() == expected.tolist()
    assert "GET /kvtrain-test/lora/resolve" in " ".join(f"{r.method} {r.path}" for r in hub.requests)

    with pytest.raises(ValueError, match=r"kvtrain-test/lora: the Hub repo has no revision 'step-9'"):
        kvtrain.from_pretrained("kvtrain-test/lora", revision="step-9")
    with pytest.raises(ValueError, match=r"kvtrain-test/nothing: not a local folder, and http://127.0.0.1:\d+ has "
                                         r"no such repo"):
        kvtrain.from_pretrained("kvtrain-test/nothing")


@pytest.mark.timeout(180)
def test_hf_hub_offline_loads_from_the_cache(hub, lora_checkpoint, tmp_path):
    """HF_HUB_OFFLINE=1 in a fresh process, the Hub unreachable: a cached repo loads and generates the same
    tokens; one never downloaded is refused with the reason."""
    from huggingface_hub import snapshot_download

    upload(lora_checkpoint, "kvtrain-test/lora")
    snapshot_download("kvtrain-test/lora")  # populate the cache, as a first online load does
    local = kvtrain.from_pretrained(lora_checkpoint)
    ids = prompt_ids(local.tokenizer)
    expected = greedy(local.model, ids, local.new_cache()).tolist()

    code = (
        "import json, torch, kvtrain\n"
        "from tests.hub.test_from_pretrained import greedy, prompt_ids\n"
        "m = kvtrain.from_pretrained('kvtrain-test/lora')\n"
        "print(json.dumps(greedy(m.model, prompt_ids(m.tokenizer), m.new_cache()).tolist()))\n"
        "try:\n"
        "    kvtrain.from_pretrained('kvtrain-test/never-downloaded')\n"
        "except ValueError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HF_TOKEN")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens, error = proc.stdout.strip().splitlines()[-2:]
    assert json.loads(tokens) == expected
    assert error.startswith("kvtrain-test/never-downloaded: not in the Hugging Face cache and HF_HUB_OFFLINE is set (")
    assert TOKEN not in proc.stdout + proc.stderr
