"""The distillation pipeline behind `train/distill.py`: `main` = `build` (parse and check the arguments, load
the student and its teacher, cut the data, make the trainer) -> `train` (loyalty before, the loop, loyalty
after) -> `save` (weights, `kv_compression/` bundle, metadata). Sharding rules live in `check_sharding`.

Launch: `accelerate launch --config_file configs/accelerate/<cfg>.yaml train/distill.py --config
recipes/<model>/distill/<name>.yaml [--field value ...]`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import TrainerCallback, TrainingArguments
from trl import ModelConfig, get_peft_config

from kvtrain.arguments import KVCompressionArguments
from kvtrain.config import KVCompressionConfig
from kvtrain.data import load_texts, texts_fingerprint, token_blocks
from kvtrain.eval.heldout import heldout_blocks
from kvtrain.io import OutputLock, permissions_as_created
from kvtrain.models import load_model, model_fingerprint
from kvtrain.runtime.routing import use_kvtrain_attention
from kvtrain.training.arguments import DistillationArguments
from kvtrain.training.launch import (
    check_length_before_loading,
    check_output_dir,
    check_training_length,
    init_cpu_distributed,
    lock_output,
    parse_recipe_args,
)
from kvtrain.training.model_options import load_options
from kvtrain.training.output import write_artifacts, write_output_manifest
from kvtrain.training.projections import TrainableProjections
from kvtrain.training.resume import check_resume, resolve_resume, run_record
from kvtrain.training.teacher import AdapterDisabledTeacher, FrozenCopyTeacher
from kvtrain.training.trainer import CompressionDistillationTrainer

logger = logging.getLogger(__name__)

ARGUMENT_TYPES = (DistillationArguments, KVCompressionArguments, TrainingArguments, ModelConfig)


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks [n, block_len] as `{"input_ids": [block_len]}` items."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


class LoyaltyAtTrainBegin(TrainerCallback):
    """Under ZeRO-3 the weights are partitioned as the model loads and only run inside the DeepSpeed engine,
    which exists from `on_train_begin`; a fresh LoRA adapter is still the identity there. A resumed run has
    no untrained model left to measure: it takes `before` from the checkpoint it resumes."""

    def __init__(self, trainer: CompressionDistillationTrainer, resume: str | None):
        self.trainer = trainer
        self.resume = resume

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.trainer.log_loyalty("before")
        elif not self.trainer.restore_loyalty(self.resume, "before"):
            logger.warning("resumed at step %d under ZeRO-3 from %s, which records no loyalty before training: "
                           "it is not in this run's metadata", state.global_step, self.resume)


def parse_args(argv: list[str] | None = None):
    """(DistillationArguments, KVCompressionArguments, TrainingArguments, ModelConfig) from
    `--config recipe.yaml` (checked by `load_recipe`) overridden by `--field value` flags."""
    return parse_recipe_args(ARGUMENT_TYPES, argv)


def is_zero3(trainer: CompressionDistillationTrainer) -> bool:
    return trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3


def check_sharding(trainer: CompressionDistillationTrainer, distill_args: DistillationArguments) -> None:
    """Every set-up that sharded training (DeepSpeed ZeRO-3, FSDP) cannot do as asked, refused in one place."""
    if is_zero3(trainer) and distill_args.merge_adapter:
        raise ValueError("merge_adapter is not supported under DeepSpeed ZeRO-3 (weights are partitioned); save the adapter")
    if not distill_args.train_projections:
        return
    if is_zero3(trainer):
        raise ValueError(
            "train_projections is not supported under DeepSpeed ZeRO-3: a partitioned parameter is gathered only "
            "inside its own module's forward, and the replay reads the projections from the attention layers; "
            "use ZeRO-2 or DDP"
        )
    if trainer.is_fsdp_enabled:
        raise ValueError(
            "train_projections is not supported under FSDP (sharded parameters read outside their unit's "
            "forward, not verified); use DDP or DeepSpeed ZeRO-2"
        )
    if trainer.is_deepspeed_enabled and distill_args.projection_learning_rate is not None:
        if "optimizer" in trainer.accelerator.state.deepspeed_plugin.deepspeed_config:
            raise ValueError(
                "projection_learning_rate needs the Trainer's optimizer, but the DeepSpeed config defines its "
                "own `optimizer` section; remove it or drop projection_learning_rate"
            )


@dataclass
class Run:
    """One distillation, built and ready to train: its arguments, the trainer and what the output records."""

    lock: OutputLock
    distill_args: DistillationArguments
    kv_args: KVCompressionArguments
    training_args: TrainingArguments
    model_args: ModelConfig
    kv_config: KVCompressionConfig
    trainer: CompressionDistillationTrainer
    tokenizer: object
    fingerprint: dict
    resume: str | None
    resume_changes: list[str]
    projections: TrainableProjections | None


def build(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> Run:
    """Parse and check the arguments, load the student and its teacher, cut the data, make the trainer."""
    distill_args, kv_args, training_args, model_args = parse_args(argv)
    kv_config = kv_args.to_config()
    check_training_length(training_args)
    if distill_args.train_projections:
        TrainableProjections.check_config(kv_config)
    check_output_dir(training_args.output_dir)
    # Every input is checked before the output folder is taken (and so created): a bad one leaves nothing behind.
    options = load_options(model_args)
    check_length_before_loading(model_args, distill_args.block_len, "block_len", options["revision"])
    texts = load_texts(distill_args.dataset_name, distill_args.dataset_train_split, text_field=distill_args.dataset_text_field)
    # Resolving before the lock is safe: a job writing checkpoints there holds the lock, so ours is then refused.
    resume = resolve_resume(distill_args.resume or training_args.resume_from_checkpoint, training_args.output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=training_args.get_process_log_level())
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    with lock_output(training_args.output_dir, "train/distill.py", argv) as lock:
        transformers.set_seed(training_args.seed)
        record = run_record(distill_args, kv_config, training_args, model_args, data=texts_fingerprint(texts))
        resume_changes = check_resume(resume, record, distill_args.allow_resume_changes) if resume else []

        model, tokenizer = load_model(model_args.model_name_or_path, **options)
        fingerprint = model_fingerprint(model.config)
        use_kvtrain_attention(model)
        if model_args.use_peft:
            if "quantization_config" in options:
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.gradient_checkpointing)
            model = get_peft_model(model, get_peft_config(model_args))
            teacher = AdapterDisabledTeacher(model)
        else:
            teacher = FrozenCopyTeacher(model, offload=distill_args.teacher_offload)
        projections = None
        if distill_args.train_projections:
            # Attached after PEFT (which freezes every parameter it did not add) and after the teacher copy.
            projections = TrainableProjections.from_config(kv_config, model.config)
            projections.attach(model)
        model.train()

        train_blocks = token_blocks(tokenizer, texts, distill_args.block_len, distill_args.max_blocks, distill_args.block_stride)
        loyalty_blocks = None
        if distill_args.loyalty_blocks:
            loyalty_blocks = heldout_blocks(
                tokenizer,
                distill_args.loyalty_dataset_name or distill_args.dataset_name,
                distill_args.loyalty_split,
                distill_args.block_len,
                distill_args.loyalty_blocks,
                text_field=distill_args.dataset_text_field,
            )

        trainer = CompressionDistillationTrainer(
            model=model,
            args=training_args,
            train_dataset=BlockDataset(train_blocks),
            processing_class=tokenizer,
            callbacks=callbacks,
            distill_args=distill_args,
            kv_config=kv_config,
            teacher=teacher,
            loyalty_blocks=loyalty_blocks,
            projections=projections,
            run_record=record,
        )
        check_sharding(trainer, distill_args)
        run = Run(lock, distill_args, kv_args, training_args, model_args, kv_config, trainer, tokenizer, fingerprint,
                  resume, resume_changes, projections)
    return run


def train(run: Run):
    """Loyalty before, the training loop (resumed if asked), loyalty after; returns the Trainer's result.

    Under ZeRO-3 the untrained model can only be measured once the DeepSpeed engine exists (`LoyaltyAtTrainBegin`).
    """
    trainer = run.trainer
    if is_zero3(trainer):
        trainer.add_callback(LoyaltyAtTrainBegin(trainer, run.resume))
    else:
        trainer.log_loyalty("before")
    result = trainer.train(resume_from_checkpoint=run.resume)
    trainer.log_loyalty("after")
    return result


def save(run: Run, result) -> Path:
    """The weights (adapter, merged or full), the tokenizer, the `kv_compression/` bundle and the metadata."""
    trainer, model_args, distill_args = run.trainer, run.model_args, run.distill_args
    output_dir = Path(run.training_args.output_dir)
    merged = model_args.use_peft and distill_args.merge_adapter
    if merged:
        if trainer.accelerator.is_main_process:
            causal = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            causal.save_pretrained(output_dir)
            run.tokenizer.save_pretrained(output_dir)
        trainer.accelerator.wait_for_everyone()
    else:
        trainer.save_model(str(output_dir))
    if trainer.accelerator.is_main_process:
        write_artifacts(
            output_dir,
            run.kv_config,
            {
                "format": "adapter" if model_args.use_peft and not merged else "full",
                "base_model": model_args.model_name_or_path,
                "model_fingerprint": run.fingerprint,
                "arguments": {
                    "distillation": dataclasses.asdict(distill_args),
                    "compression": dataclasses.asdict(run.kv_args),
                    "model": dataclasses.asdict(model_args),
                    "training": run.training_args.to_dict(),
                },
                "resumed_from": run.resume,
                "resume_changes": run.resume_changes,
                "projections": run.projections.metadata() if run.projections is not None else {"trained": False},
                "metrics": {
                    "train": result.metrics,
                    "loyalty": trainer.loyalty,
                    "log_history": trainer.state.log_history,
                },
            },
            projections=run.projections,
        )
        permissions_as_created(output_dir.glob("*.safetensors"))  # the weights: private as safetensors writes them
        write_output_manifest(output_dir)
    trainer.accelerator.wait_for_everyone()
    return output_dir


def main(argv: list[str] | None = None, *, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Run one distillation; returns the output folder (weights + kv_compression/ + kvtrain_training.json)."""
    init_cpu_distributed()
    run = build(argv, callbacks)
    try:
        return save(run, train(run))
    finally:
        run.lock.release()  # every process holds the lock: each lets go, the last removes the file
