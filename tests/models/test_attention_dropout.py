"""Attention dropout (a config's `attention_dropout`, applied by transformers in training mode) is refused by name on
the cache and replay paths, which would otherwise drop it silently; in eval mode there is none to refuse."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from kvtrain.config import KVCompressionConfig, ScheduleConfig
from kvtrain.models import tiny_tokenizer, twin_model
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import teacher_forced_decode
from kvtrain.runtime.replay import replay_compression
from kvtrain.training.arguments import DistillationArguments
from kvtrain.training.run import BlockDataset
from kvtrain.training.teacher import FrozenCopyTeacher
from kvtrain.training.trainer import CompressionDistillationTrainer

CONFIG = KVCompressionConfig(budget=8, sinks=2, recent=2, query_window=4, schedule=ScheduleConfig(interval=4))
IDS = torch.randint(4, 128, (1, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def model():
    return twin_model("llama-3.1-8b-instruct", attention_dropout=0.1)


def test_replay_in_training_mode_is_refused_naming_layer_and_field(model):
    model.train()
    with pytest.raises(ValueError, match=r"layer 0: attention dropout 0.1 \(config.attention_dropout\)"):
        with replay_compression(model, CONFIG, prefill_len=12):
            model(input_ids=IDS)


def test_cache_in_training_mode_is_refused(model):
    model.train()
    with pytest.raises(ValueError, match=r"attention dropout 0.1 \(config.attention_dropout\)"):
        teacher_forced_decode(model, CompressedCache.for_model(model, CONFIG), IDS, prefill_len=12)


def test_eval_mode_has_no_dropout_to_refuse(model):
    with torch.no_grad(), replay_compression(model, CONFIG, prefill_len=12):
        replayed = model(input_ids=IDS).logits
    decoded = teacher_forced_decode(model, CompressedCache.for_model(model, CONFIG), IDS, prefill_len=12)
    torch.testing.assert_close(replayed, decoded, rtol=0, atol=1e-4)


def test_the_trainer_refuses_before_the_first_step(model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"attention_dropout=0.1 in the model config"):
        CompressionDistillationTrainer(
            model=model, args=args, train_dataset=BlockDataset(IDS), processing_class=tiny_tokenizer(),
            distill_args=DistillationArguments(block_len=24, prefill_len=12), kv_config=CONFIG,
            teacher=FrozenCopyTeacher(model, offload=False),
        )
