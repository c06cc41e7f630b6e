"""`compute_loss` against an independent reference: the full-attention teacher's logits and the student's
logits decoded token by token through a real `CompressedCache` (not replay), with explicit masking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from kvtrain.config import KVCompressionConfig, ScheduleConfig
from kvtrain.models import tiny_model, tiny_tokenizer
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import teacher_forced_decode
from kvtrain.runtime.routing import use_kvtrain_attention
from kvtrain.training.arguments import DistillationArguments
from kvtrain.training.run import BlockDataset
from kvtrain.training.teacher import AdapterDisabledTeacher, FrozenCopyTeacher
from kvtrain.training.trainer import CompressionDistillationTrainer

BLOCK, PREFILL = 24, 10
CONFIG = KVCompressionConfig(budget=6, sinks=1, recent=2, query_window=3, schedule=ScheduleConfig(interval=3))


def _reference_loss(t_logits, student_model, ids, *, divergence="forward_kl", temperature=1.0, ce_weight=0.0):
    """Explicit loops over rows and continuation positions; `t_logits` [b, S, V] of the full-attention teacher."""
    with torch.no_grad():
        s_logits = teacher_forced_decode(student_model, CompressedCache.for_model(student_model, CONFIG), ids, prefill_len=PREFILL)
    total, count = 0.0, 0
    for row in range(ids.shape[0]):
        for pos in range(PREFILL - 1, BLOCK - 1):  # logits at pos predict the continuation token pos + 1
            lt = F.log_softmax(t_logits[row, pos] / temperature, -1)
            ls = F.log_softmax(s_logits[row, pos] / temperature, -1)
            kl = (lt.exp() * (lt - ls)).sum() if divergence == "forward_kl" else (ls.exp() * (ls - lt)).sum()
            ce = -F.log_softmax(s_logits[row, pos], -1)[ids[row, pos + 1]]
            total += temperature**2 * kl.item() + ce_weight * ce.item()
            count += 1
    return total / count


def _trainer(tmp_path, model, teacher, **distill):
    blocks = torch.randint(4, 128, (4, BLOCK), generator=torch.Generator().manual_seed(1))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=2)
    distill_args = DistillationArguments(block_len=BLOCK, prefill_len=PREFILL, loss_chunk_tokens=5, vocab_chunk=50, **distill)
    trainer = CompressionDistillationTrainer(
        model=model, args=args, train_dataset=BlockDataset(blocks), processing_class=tiny_tokenizer(),
        distill_args=distill_args, kv_config=CONFIG, teacher=teacher,
    )
    return trainer, blocks[:2]


def test_lora_student_under_compression_vs_adapter_free_teacher(tmp_path):
    base = tiny_model("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2)
    use_kvtrain_attention(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # non-zero adapters, so the student differs from the teacher beyond compression
        lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
        for seed, p in enumerate(lora_b):  # named_parameters has a fixed order; str hashes change per process
            p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    trainer, ids = _trainer(tmp_path, model, AdapterDisabledTeacher(model))
    loss = trainer.compute_loss(trainer.model, {"input_ids": ids})
    with model.disable_adapter(), torch.no_grad():
        t_logits = base(input_ids=ids).logits
    ref = _reference_loss(t_logits, base, ids)  # `base` carries the (enabled) LoRA layers here
    assert loss.item() > 1e-3  # the adapters and eviction really change the student
    assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_full_finetune_student_vs_frozen_copy_with_ce_and_temperature(tmp_path):
    student = tiny_model("qwen2", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2)
    use_kvtrain_attention(student)
    teacher = FrozenCopyTeacher(student, offload=True)
    with torch.no_grad():
        student.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    trainer, ids = _trainer(tmp_path, student, teacher, loss="reverse_kl", temperature=2.0, ce_weight=0.5)
    loss = trainer.compute_loss(trainer.model, {"input_ids": ids})
    with torch.no_grad():
        t_logits = teacher.model(input_ids=ids).logits
    ref = _reference_loss(t_logits, student, ids, divergence="reverse_kl", temperature=2.0, ce_weight=0.5)
    assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert next(teacher.model.parameters()).device.type == "cpu"  # offloaded again after the step
