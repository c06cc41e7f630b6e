"""The full-cache control arm (`student_cache="full"`): the same training run as the compressed arm with only the
student's forward uncompressed. Reference: the loss computed by hand from two plain full-attention forwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from kvtrain.config import KVCompressionConfig, ScheduleConfig
from kvtrain.models import tiny_model, tiny_tokenizer
from kvtrain.runtime.routing import use_kvtrain_attention
from kvtrain.training.arguments import DistillationArguments
from kvtrain.training.run import BlockDataset
from kvtrain.training.teacher import AdapterDisabledTeacher
from kvtrain.training.trainer import CompressionDistillationTrainer

BLOCK, PREFILL = 24, 10
CONFIG = KVCompressionConfig(budget=6, sinks=1, recent=2, query_window=3, schedule=ScheduleConfig(interval=3))


class _Recording(CompressionDistillationTrainer):
    """Records the blocks each step trained on."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen.append(inputs["input_ids"].clone())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _lora_student():
    torch.manual_seed(0)
    base = tiny_model("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2)
    use_kvtrain_attention(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # non-zero adapters: the student differs from the teacher before any step
        for seed, p in enumerate(p for name, p in model.named_parameters() if "lora_B" in name):
            p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model


def _trainer(tmp_path, student_cache, max_steps=1):
    model = _lora_student()
    blocks = torch.randint(4, 128, (6, BLOCK), generator=torch.Generator().manual_seed(1))
    args = TrainingArguments(output_dir=str(tmp_path / student_cache), report_to="none", use_cpu=True, seed=7,
                             per_device_train_batch_size=2, max_steps=max_steps, learning_rate=1e-2,
                             lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1, save_strategy="no",
                             disable_tqdm=True)
    distill_args = DistillationArguments(block_len=BLOCK, prefill_len=PREFILL, loss_chunk_tokens=5, vocab_chunk=50,
                                         student_cache=student_cache)
    trainer = _Recording(model=model, args=args, train_dataset=BlockDataset(blocks), processing_class=tiny_tokenizer(),
                         distill_args=distill_args, kv_config=CONFIG, teacher=AdapterDisabledTeacher(model))
    trainer.seen = []
    return trainer, model, blocks[:2]


def _full_attention_kl(model, ids):
    """KL(teacher || student) per continuation token, both plain full-attention forwards, averaged by hand."""
    with torch.no_grad():
        s_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            t_logits = model(input_ids=ids).logits
    total = []
    for row in range(ids.shape[0]):
        for pos in range(PREFILL - 1, BLOCK - 1):
            lt, ls = F.log_softmax(t_logits[row, pos], -1), F.log_softmax(s_logits[row, pos], -1)
            total.append((lt.exp() * (lt - ls)).sum().item())
    return sum(total) / len(total)


def test_control_student_forward_is_uncompressed(tmp_path):
    control, model, ids = _trainer(tmp_path, "full")
    loss = control.compute_loss(control.model, {"input_ids": ids}).item()
    assert loss == pytest.approx(_full_attention_kl(model, ids), rel=1e-4, abs=1e-7)
    compressed, _, _ = _trainer(tmp_path, "compressed")  # the same student under compression: another loss
    assert abs(compressed.compute_loss(compressed.model, {"input_ids": ids}).item() - loss) > 1e-4


def test_control_is_the_compressed_run_but_for_the_student_cache(tmp_path):
    runs = {}
    for cache in ("compressed", "full"):
        trainer, _, _ = _trainer(tmp_path, cache, max_steps=3)
        trainer.train()
        lrs = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
        runs[cache] = (trainer.seen, lrs, trainer.state.global_step, trainer)
    (seen_c, lr_c, steps_c, _), (seen_f, lr_f, steps_f, _) = runs["compressed"], runs["full"]
    assert steps_c == steps_f == 3 and len(seen_c) == len(seen_f) == 3
    assert all(torch.equal(a, b) for a, b in zip(seen_c, seen_f))  # the same blocks in the same order
    assert lr_c == lr_f and len(lr_c) == 3
    weights = [{n: p.detach() for n, p in runs[c][3].model.named_parameters() if "lora_" in n} for c in runs]
    assert any(not torch.equal(weights[0][n], weights[1][n]) for n in weights[0])  # only the forward differed


def test_control_refuses_what_would_run_the_compressed_cache():
    for extra in ({"on_policy_fraction": 0.5}, {"train_projections": True}):
        with pytest.raises(ValueError, match="student_cache='full'"):
            DistillationArguments(student_cache="full", **extra)
    with pytest.raises(ValueError, match="student_cache='none'"):
        DistillationArguments(student_cache="none")
