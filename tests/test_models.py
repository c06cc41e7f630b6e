"""kvtrain.models: tiny model factory, architecture check, fingerprints, loading, atomic writes, SmolLM2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from kvtrain.data import embedded_text
from kvtrain.io import write_folder_atomically as write_atomically
from kvtrain.models import (
    SUPPORTED_MODEL_TYPES,
    check_supported,
    embedded_model_dir,
    load_model,
    model_fingerprint,
    prepare_model,
    resolve_model,
    tiny_model,
    tiny_tokenizer,
)

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_shapes_follow_the_arguments(arch: str) -> None:
    model = tiny_model(arch, num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=96)
    assert model.config.model_type == arch
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(model.model.layers) == 3
    attn = model.model.layers[0].self_attn
    # GQA: 4 query heads share 2 KV heads of dim 64 / 4 = 16.
    assert attn.q_proj.out_features == 4 * 16
    assert attn.k_proj.out_features == 2 * 16
    assert attn.v_proj.out_features == 2 * 16
    assert attn.num_key_value_groups == 2
    logits = model(torch.randint(0, 96, (2, 7))).logits
    assert logits.shape == (2, 7, 96)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_explicit_head_dim(arch: str) -> None:
    model = tiny_model(arch, hidden_size=64, num_heads=4, num_kv_heads=1, head_dim=32)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 4 * 32
    assert attn.k_proj.out_features == 1 * 32
    assert model_fingerprint(model.config)["head_dim"] == 32


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_is_causal(arch: str) -> None:
    """A causal LM's logits at positions < t cannot depend on the token at t."""
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 128
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_mistral_tiny_model_has_no_sliding_window() -> None:
    assert tiny_model("mistral").config.sliding_window is None


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_is_deterministic_for_a_seed(arch: str) -> None:
    first, again, other = tiny_model(arch, seed=3), tiny_model(arch, seed=3), tiny_model(arch, seed=4)
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dtype.is_floating_point and a[k].numel() > 1)


def test_tiny_model_leaves_the_callers_random_stream_alone() -> None:
    torch.manual_seed(11)
    expected = torch.rand(5)
    torch.manual_seed(11)
    tiny_model(seed=99)
    assert torch.equal(torch.rand(5), expected)


def test_tiny_model_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="gpt2"):
        tiny_model("gpt2")
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        tiny_model(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="hidden_size=66"):
        tiny_model(hidden_size=66, num_heads=4)


def test_check_supported_accepts_the_supported_types() -> None:
    for arch in SUPPORTED_MODEL_TYPES:
        check_supported(tiny_model(arch).config)


def test_check_supported_names_the_unsupported_architecture() -> None:
    config = GPT2Config()
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError) as err:
        check_supported(config)
    message = str(err.value)
    for expected in ("gpt2", "GPT2LMHeadModel", *SUPPORTED_MODEL_TYPES):
        assert expected in message


def test_load_model_rejects_an_unsupported_checkpoint(tmp_path: Path) -> None:
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gpt2"):
        load_model(str(tmp_path))


def _tokenizer_without_pad() -> PreTrainedTokenizerFast:
    backend = tiny_tokenizer().backend_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_load_model_round_trips_a_local_checkpoint(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path)
    tokenizer = _tokenizer_without_pad()
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(tmp_path)

    loaded, loaded_tok = load_model(str(tmp_path), attn_implementation="eager")
    assert not loaded.training
    assert loaded.config._attn_implementation == "eager"
    assert loaded_tok.pad_token == loaded_tok.eos_token == "</s>"
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)

    half, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_resolve_model(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    # Not a local folder and not embedded: a Hub id, left for transformers to download.
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_prepare_model_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="'nope'.*smollm2-135m"):
        prepare_model("nope")


def test_write_atomically_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    write_atomically(target, lambda d: (d / "a.txt").write_text("one"))
    assert (target / "a.txt").read_text() == "one"
    write_atomically(target, lambda d: (d / "b.txt").write_text("two"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folders left behind


def test_write_atomically_keeps_the_old_content_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    write_atomically(target, lambda d: (d / "a.txt").write_text("one"))

    def half_write(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. the user stops a long conversion

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, half_write)
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "fresh", half_write)
    assert not (tmp_path / "fresh").exists()


def _config(**overrides) -> LlamaConfig:
    fields = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64,
                  vocab_size=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    fields.update(overrides)
    return LlamaConfig(**fields)


def test_fingerprint_fields_and_hash() -> None:
    fp = model_fingerprint(_config())
    fields = {k: v for k, v in fp.items() if k != "hash"}
    assert fields == {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "head_dim": 16, "hidden_size": 64, "vocab_size": 128, "rope_theta": 10000.0}
    assert fp["hash"] == hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def test_fingerprint_is_stable_across_instances_and_save_load(tmp_path: Path) -> None:
    config = _config()
    assert model_fingerprint(config) == model_fingerprint(_config())
    config.save_pretrained(tmp_path)
    assert model_fingerprint(AutoConfig.from_pretrained(tmp_path)) == model_fingerprint(config)
    # Fields outside the fingerprint (here the MLP width) do not change it.
    assert model_fingerprint(_config(intermediate_size=999)) == model_fingerprint(config)


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_hidden_layers": 3},
        {"num_attention_heads": 8, "num_key_value_heads": 2},
        {"num_key_value_heads": 1},
        {"head_dim": 32},
        {"hidden_size": 128},
        {"vocab_size": 256},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    ],
)
def test_fingerprint_changes_with_each_field(overrides: dict) -> None:
    assert model_fingerprint(_config(**overrides))["hash"] != model_fingerprint(_config())["hash"]


def test_fingerprint_distinguishes_model_types_and_derives_head_dim() -> None:
    qwen2 = Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, vocab_size=128)
    fp = model_fingerprint(qwen2)
    assert fp["head_dim"] == 64 // 4
    llama = _config()
    assert {k: v for k, v in fp.items() if k not in ("hash", "model_type")} == {
        k: v for k, v in model_fingerprint(llama).items() if k not in ("hash", "model_type")
    }
    assert fp["hash"] != model_fingerprint(llama)["hash"]


def test_tiny_tokenizer_matches_the_tiny_model() -> None:
    tokenizer, model = tiny_tokenizer(), tiny_model()
    assert len(tokenizer) == model.config.vocab_size == 128
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id)
    ids = tokenizer(embedded_text()[:20000])["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert max(ids) < 128
    assert tokenizer.unk_token_id in ids  # the vocabulary is capped, rare words are unknown
    prompt = tokenizer("The assignment statement", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)


def test_tiny_tokenizer_round_trips_known_words_and_is_deterministic() -> None:
    tokenizer = tiny_tokenizer(vocab_size=200)
    assert tokenizer.get_vocab() == tiny_tokenizer(vocab_size=200).get_vocab()
    words = [w for w in tokenizer.get_vocab() if w.isalpha()][:30]
    text = " ".join(words)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    # The most frequent word in the text, counted independently, must be in the vocabulary.
    counts: dict[str, int] = {}
    for word in embedded_text().split():
        if word.isalpha():
            counts[word] = counts.get(word, 0) + 1
    assert max(counts, key=counts.get) in tokenizer.get_vocab()
    with pytest.raises(ValueError, match="vocab_size=4"):
        tiny_tokenizer(vocab_size=4)


@pytest.mark.slow
def test_smollm2_is_prepared_and_answers(smollm2) -> None:
    model, tokenizer = smollm2
    folder = embedded_model_dir("smollm2-135m")
    assert resolve_model("smollm2-135m") == str(folder)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()
    assert not list(folder.parent.glob(".smollm2-135m.tmp-*"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    fp = model_fingerprint(model.config)
    assert (fp["model_type"], fp["num_hidden_layers"], fp["num_attention_heads"], fp["num_key_value_heads"]) == (
        "llama", 30, 9, 3)
    assert (fp["head_dim"], fp["hidden_size"], fp["vocab_size"], fp["rope_theta"]) == (64, 576, 49152, 100000.0)
    assert tokenizer.pad_token is not None and not model.training

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
