"""Exactness on SmolLM2-135M: the log-probs of a training forward that replays a rollout's recorded keep-sets equal
the log-probs the sampler gave the same tokens while it decoded through the compressed cache, for eviction with
decode-time events inside the completion (G-KV), merging (KeepKV) and eviction + 4-bit values (replayed with the
codes the sampler's cache recorded), at the recipe's sampling temperature 0.7 (at 1.0 a log-prob that forgot the
temperature would pass). The bound is float rounding, not a tuned margin: a batched and a step-by-step fp32 forward
of the same tokens differ in their last bits (~1e-7 relative), which move a log-prob by ~1e-6; one flipped keep
decision or quantisation code moves it by 1e-3 or more. A naive full-attention training forward of the same
rollouts is reported next to it and is far off."""

from __future__ import annotations

import pytest
import torch

from kvtrain.policies.gates import GATES_ATTRIBUTE, attached_gates
from kvtrain.config import KVCompressionConfig, MergeConfig, QuantConfig, ScheduleConfig, ScorerConfig
from kvtrain.runtime.decode import position_ids_from_mask
from kvtrain.runtime.replay import replay_compression
from kvtrain.training.grpo.rollouts import KeepSetBatch, recording_generate
from kvtrain.training.grpo.tasks import task_items

pytestmark = pytest.mark.slow
TEMPERATURE, NEW_TOKENS = 0.7, 16
BOUND = 1e-5  # mean |gap|: float rounding only (see the module docstring)


def gkv(**overrides) -> KVCompressionConfig:
    fields = dict(budget=32, sinks=4, recent=8, query_window=8, scorer=ScorerConfig("gkv", {"alpha": 0.8, "mix_lambda": 0.5}),
                  schedule=ScheduleConfig(interval=4))
    return KVCompressionConfig(**{**fields, **overrides})


CASES = {
    "gkv": gkv(),
    "gkv+keepkv": gkv(merge=MergeConfig()),
    "gkv+4bit-values": gkv(quant=QuantConfig(key_bits=None, value_bits=4, group_size=32), selection="per_layer"),
    # Learned retention gates (random weights here), threshold mode capped by the budget.
    "gate-threshold": gkv(scorer=ScorerConfig("gate", {"mode": "threshold", "window": 8})),
}


@pytest.fixture
def gated(smollm2):
    """SmolLM2 with random retention gates attached for the test (removed after, the fixture is shared)."""
    model, _ = smollm2
    gates = attached_gates(model)
    with torch.no_grad():
        gates.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    yield
    delattr(model, GATES_ATTRIBUTE)


@pytest.fixture(scope="module")
def prompts(smollm2):
    _, tokenizer = smollm2
    items = task_items("passkey", 4, seed=3, params={"filler": 1})
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": it.prompt}], tokenize=False,
                                           add_generation_prompt=True) for it in items]
    texts[1] = texts[1].replace("irrelevant text", "text")  # rows of different lengths: left padding
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def sampled_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, prefill: int) -> torch.Tensor:
    """log softmax(logits / T) of each completion token under the forward running now: [b, S - prefill]."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logprobs = torch.log_softmax(logits[:, prefill - 1 : -1].float() / TEMPERATURE, dim=-1)
    return logprobs.gather(2, ids[:, prefill:, None])[..., 0]


@pytest.mark.parametrize("name", list(CASES))
def test_replayed_logprobs_are_the_samplers(smollm2, prompts, name, request):
    model, tokenizer = smollm2
    if name.startswith("gate"):
        request.getfixturevalue("gated")
    config = CASES[name]
    prefill = prompts["input_ids"].shape[1]
    torch.manual_seed(0)
    with torch.no_grad(), recording_generate(model, model, config, TEMPERATURE) as rollouts:
        ids = model.generate(**prompts, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=TEMPERATURE, top_k=0,
                             top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    rollout = rollouts[0]
    completion = ids[:, prefill:]
    # As TRL masks them: completion tokens up to and including the first EOS.
    eos = (completion == tokenizer.eos_token_id).long()
    keep = (eos.cumsum(dim=1) - eos) == 0
    mask = torch.cat([prompts["attention_mask"], keep.long()], dim=1)
    assert all(len(layer) >= 4 for layer in rollout.records)  # prefill + decode-time events inside the completion
    # The keep-sets and codes travel as batch tensors and come back as records and codes, as in training.
    batch = KeepSetBatch.from_records(rollout.records, ids.shape[0], rollout.codes)
    with torch.no_grad(), replay_compression(model, config, prefill_len=prefill, keep_sets=batch.records(),
                                             codes=batch.layer_codes()):
        replayed = sampled_logprobs(model, ids, mask, prefill)
    with torch.no_grad():
        naive = sampled_logprobs(model, ids, mask, prefill)
    replay_gap = (rollout.logprobs - replayed).abs()[keep]
    naive_gap = (rollout.logprobs - naive).abs()[keep]
    print(f"{name}: replay mean {replay_gap.mean():.2e} max {replay_gap.max():.2e}; "
          f"full attention mean {naive_gap.mean():.2e} max {naive_gap.max():.2e}")
    assert replay_gap.mean().item() <= BOUND
    assert naive_gap.mean().item() > 1e-2
