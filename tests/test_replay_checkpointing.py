"""Gradient checkpointing under replay: the backward pass recomputes each layer, and the recomputation must
attend through the same keep-sets as the forward, so gradients equal those without checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from kvtrain.config import KVCompressionConfig, ScheduleConfig
from kvtrain.models import tiny_model, tiny_tokenizer
from kvtrain.runtime.decode import position_ids_from_mask
from kvtrain.runtime.replay import replay_compression, replay_disabled
from kvtrain.runtime.routing import observe_attention, use_kvtrain_attention
from kvtrain.training.arguments import DistillationArguments
from kvtrain.training.teacher import AdapterDisabledTeacher
from kvtrain.training.trainer import CompressionDistillationTrainer

SEQ, PREFILL, LAYERS = 32, 12, 2
CONFIG = KVCompressionConfig(budget=6, sinks=1, recent=2, query_window=3, schedule=ScheduleConfig(interval=3))


def _model(checkpointing: bool, use_reentrant: bool = False):
    model = tiny_model("llama", num_layers=LAYERS, hidden_size=32, num_heads=4, num_kv_heads=2, vocab_size=53, seed=3)
    use_kvtrain_attention(model)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    return model.train()  # transformers checkpoints only in training mode


def _batch():
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 53, (2, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask, torch.randint(0, 53, (2, SEQ), generator=gen)


def _attention_calls(model):
    """A counter of attention calls (forward and recomputation alike) while the returned context is open."""
    count = [0]

    def observer(module, query, key, value, attention_mask):
        count[0] += 1

    return count, observe_attention(model, observer)


def _grads(model, *, replay: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of a cross-entropy loss on real tokens, with backward inside the replay block."""
    ids, mask, targets = _batch()
    model.zero_grad()
    count, observing = _attention_calls(model)
    with observing:
        with replay_compression(model, CONFIG, prefill_len=PREFILL) if replay else replay_disabled(model):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
            F.cross_entropy(logits[mask.bool()], targets[mask.bool()]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, count[0]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_replay_gradients_equal_plain_replay_gradients(use_reentrant):
    plain, plain_calls = _grads(_model(False), replay=True)
    checkpointed, checkpointed_calls = _grads(_model(True, use_reentrant), replay=True)
    full, _ = _grads(_model(False), replay=False)
    # Every layer really ran twice (forward, then recomputation in backward) under checkpointing.
    assert (plain_calls, checkpointed_calls) == (LAYERS, 2 * LAYERS)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    # Compression really shapes the gradients: full attention gives different ones.
    assert max((full[n] - g).abs().max().item() for n, g in plain.items()) > 1e-3


def test_replay_disabled_restores_the_enclosing_replay():
    model = _model(False)
    ids, mask, _ = _batch()
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        with replay_compression(model, CONFIG, prefill_len=PREFILL):
            replayed = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            with replay_disabled(model):
                suspended = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            again = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        after = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (replayed - full)[mask.bool()].abs().max() > 1e-3
    assert torch.equal(suspended, full) and torch.equal(after, full)
    assert torch.equal(again, replayed)


def _lora_trainer(tmp_path, checkpointing: bool):
    base = _model(False)
    torch.manual_seed(0)  # lora_A's random init: identical across the trainers compared
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # non-zero adapters, so the student differs from its adapter-disabled teacher
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=2)
    distill_args = DistillationArguments(block_len=SEQ, prefill_len=PREFILL, loss_chunk_tokens=7, vocab_chunk=20)
    trainer = CompressionDistillationTrainer(
        model=model, args=args, train_dataset=[], processing_class=tiny_tokenizer(),
        distill_args=distill_args, kv_config=CONFIG, teacher=AdapterDisabledTeacher(model),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test does not run
    return trainer, model


def test_trainer_step_with_checkpointing_matches_without(tmp_path):
    """A training step (forward + backward) with checkpointing gives the loss and LoRA gradients of one without;
    the adapter-disabled teacher (the same modules) still runs full attention inside the step."""
    ids, _, _ = _batch()
    inputs = {"input_ids": ids}
    results = []
    for checkpointing in (False, True):
        trainer, model = _lora_trainer(tmp_path / str(checkpointing), checkpointing)
        count, observing = _attention_calls(model)
        with observing:
            loss = trainer.training_step(trainer.model, dict(inputs))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():  # outside a step: teacher and student each bind (or not) their own replay
            standalone = trainer.compute_loss(trainer.model, dict(inputs))
        results.append((loss, grads, count[0], standalone))
    (loss, grads, calls, standalone), (ck_loss, ck_grads, ck_calls, _) = results
    assert (calls, ck_calls) == (2 * LAYERS, 3 * LAYERS)  # teacher + student; + recomputation
    assert loss.item() > 1e-3
    assert loss.item() == pytest.approx(standalone.item(), rel=1e-6)
    assert ck_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert grads.keys() == ck_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(ck_grads[name], grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
