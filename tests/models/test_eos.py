"""On-policy samples stop at any of a model's EOS ids, and nothing after a row's first EOS is trained on.

Llama-3.1-Instruct lists three EOS ids in its config; Qwen2.5-Instruct and Qwen3 have one in config.json and two
in generation_config.json. The reference is closed form: the same seeded sample drawn without any EOS (`generate`
samples every row at every step, so the rows' tokens do not depend on where the others stop), cut after each
row's first token from the EOS list. The EOS list is the model's real ids plus two tokens the sample really
draws (a random twin draws the real ids with probability ~1e-5 per step), in config.json for Llama and only in
generation_config.json for the others, as the real models have them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from kvtrain.config import KVCompressionConfig, ScheduleConfig
from kvtrain.models import eos_token_ids, tiny_tokenizer, twin_model
from kvtrain.runtime.cache import CompressedCache
from kvtrain.training.arguments import DistillationArguments
from kvtrain.training.on_policy import generate_continuations, seeded_rng
from kvtrain.training.run import BlockDataset
from kvtrain.training.teacher import FrozenCopyTeacher
from kvtrain.training.trainer import CompressionDistillationTrainer

SEQ, PREFILL, SEED, PAD = 24, 8, 5, 0
CONFIG = KVCompressionConfig(budget=6, sinks=1, recent=2, query_window=3, schedule=ScheduleConfig(interval=3))
# Qwen2.5-0.5B's EOS ids are those of Qwen2.5-7B.
TWINS = ["llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "qwen3-0.6b", "mistral-7b-instruct-v0.3"]


def blocks() -> torch.Tensor:
    return torch.randint(4, 128, (3, SEQ), generator=torch.Generator().manual_seed(1))


def sample_without_eos(model, prompts: torch.Tensor) -> torch.Tensor:
    """``[b, SEQ]``: the on-policy sample of seed `SEED` with no EOS anywhere, drawn by `generate` itself."""
    saved = model.config.eos_token_id, model.generation_config.eos_token_id
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    try:
        with torch.no_grad(), seeded_rng(SEED, prompts.device):
            return model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts),
                past_key_values=CompressedCache.for_model(model, CONFIG), max_new_tokens=SEQ - PREFILL,
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=PAD,
            )
    finally:
        model.config.eos_token_id, model.generation_config.eos_token_id = saved


def cut_after_eos(free: torch.Tensor, eos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed form: per row, the continuation up to and including its first EOS, padding after."""
    ids, mask = free.clone(), torch.ones_like(free)
    for row in range(free.shape[0]):
        hits = [j for j in range(PREFILL, SEQ) if int(free[row, j]) in eos]
        if hits:
            ids[row, hits[0] + 1 :], mask[row, hits[0] + 1 :] = PAD, 0
    return ids, mask


def with_sampled_eos(name: str) -> tuple[torch.nn.Module, list[int], torch.Tensor]:
    """The twin with two sampled tokens added to its EOS ids (row 0's 3rd and row 1's 6th continuation token), its
    whole EOS list, and its sample without EOS."""
    model = twin_model(name, seed=4)
    free = sample_without_eos(model, blocks()[:, :PREFILL])
    extra = [int(free[0, PREFILL + 2]), int(free[1, PREFILL + 5])]
    if isinstance(model.config.eos_token_id, list):  # Llama-3.1: the list is in config.json
        model.config.eos_token_id = model.config.eos_token_id + extra
    generation = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = (generation if isinstance(generation, list) else [generation]) + extra
    config_eos = model.config.eos_token_id
    config_eos = [config_eos] if isinstance(config_eos, int) else config_eos
    return model, list(dict.fromkeys(model.generation_config.eos_token_id + config_eos)), free


def on_policy_trainer(model, tmp_path) -> CompressionDistillationTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=3,
                             seed=SEED)
    distill = DistillationArguments(block_len=SEQ, prefill_len=PREFILL, on_policy_fraction=1.0, loss_chunk_tokens=16,
                                    vocab_chunk=4096)
    trainer = CompressionDistillationTrainer(
        model=model, args=args, train_dataset=BlockDataset(blocks()), processing_class=tiny_tokenizer(),
        distill_args=distill, kv_config=CONFIG, teacher=FrozenCopyTeacher(model, offload=False),
    )
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def sampled():
    """Per twin, `with_sampled_eos` once for both tests (neither changes the weights; the twin has no dropout)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = with_sampled_eos(name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", TWINS)
def test_on_policy_loss_supervises_nothing_after_any_eos(sampled, name, tmp_path):
    model, eos, free = sampled(name)
    _, mask = cut_after_eos(free, eos)
    assert (mask == 0).any(), "the sampled EOS ids did not end any row"
    trainer = on_policy_trainer(model, tmp_path)
    trainer.compute_loss(trainer.model, {"input_ids": blocks()})
    # Targets are continuation tokens whose position and predecessor are real: up to each row's first EOS.
    expected = int((mask[:, PREFILL:]).sum())
    assert trainer._metrics["supervised_tokens"] == [float(expected)]


@pytest.mark.parametrize("name", TWINS)
def test_sampling_stops_at_each_eos_id(sampled, name):
    model, eos, free = sampled(name)
    assert eos_token_ids(model) == eos
    prompts = blocks()[:, :PREFILL]
    ids, mask = generate_continuations(model, model, CONFIG, prompts, SEQ, temperature=1.0, seed=SEED,
                                       pad_token_id=PAD, eos_token_ids=eos)
    want_ids, want_mask = cut_after_eos(free, eos)
    assert torch.equal(mask, want_mask) and torch.equal(ids, want_ids)
    stops = {int(ids[row, mask[row].sum() - 1]) for row in range(ids.shape[0]) if mask[row, -1] == 0}
    assert stops and stops <= set(eos) and stops - {eos[0]}  # stopped at ids other than the first one
