"""The GRPO pipeline behind `train/grpo.py`: `main` = `build` (parse and check the arguments, build the rewards and
the task's prompts, load the policy, make the trainer) -> `train` -> `save` (weights, `kv_compression/` bundle,
metadata), the layout of distillation (`kvtrain.training.run`).

Launch: `accelerate launch --config_file configs/accelerate/<cfg>.yaml train/grpo.py --config
recipes/<model>/grpo/<name>.yaml [--field value ...]`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import transformers
from datasets import Dataset
from peft import prepare_model_for_kbit_training
from transformers import TrainerCallback
from trl import GRPOConfig, ModelConfig, get_peft_config

from kvtrain.arguments import KVCompressionArguments
from kvtrain.config import KVCompressionConfig
from kvtrain.data import texts_fingerprint
from kvtrain.errors import UserError
from kvtrain.io import OutputLock, permissions_as_created
from kvtrain.models import check_positions, load_model, model_fingerprint
from kvtrain.models.shape import check_window, sliding_windows
from kvtrain.runtime.routing import use_kvtrain_attention
from kvtrain.training.grpo.arguments import GRPOTaskArguments
from kvtrain.training.grpo.rewards import build_rewards
from kvtrain.training.grpo.tasks import TRAIN, TaskItem, gsm8k_items, task_items
from kvtrain.training.grpo.trainer import CompressedGRPOTrainer
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
from kvtrain.training.resume import check_resume, resolve_resume, run_record

logger = logging.getLogger(__name__)

ARGUMENT_TYPES = (GRPOTaskArguments, KVCompressionArguments, GRPOConfig, ModelConfig)


def parse_args(argv: list[str] | None = None) -> tuple[GRPOTaskArguments, KVCompressionArguments, GRPOConfig, ModelConfig]:
    """(GRPOTaskArguments, KVCompressionArguments, GRPOConfig, ModelConfig) from `--config recipe.yaml` (checked
    by `load_recipe`) overridden by `--field value` flags."""
    return parse_recipe_args(ARGUMENT_TYPES, argv)


def check_options(config: GRPOConfig, model_args: ModelConfig) -> None:
    """Set-ups compressed GRPO cannot run as asked, refused before any model loads."""
    if config.beta != 0.0 and not model_args.use_peft:
        raise UserError(f"beta={config.beta}: the KL reference is the policy's weights with its adapters disabled, "
                         "so it needs use_peft: true (or beta: 0)")
    if config.cache_implementation is not None:
        raise UserError(f"cache_implementation={config.cache_implementation!r}: rollouts use kvtrain's cache "
                         "(rollout_cache), leave cache_implementation unset")
    if config.use_vllm:
        raise UserError("use_vllm: compressed rollouts are sampled by transformers' generate through the compressed cache")
    if model_args.use_peft and model_args.lora_dropout > 0 and not config.disable_dropout:
        logger.warning("lora_dropout=%s with disable_dropout false: the training forward drops what the sampler kept, "
                       "so it is not the sampling policy (logp_gap/replay will show it); set disable_dropout: true",
                       model_args.lora_dropout)


def prompt_rows(items: list[TaskItem], task: str, prompt_format: str, tokenizer) -> list[dict]:
    """Dataset rows; a chat prompt is one user message (TRL applies the chat template and the generation prompt)."""
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("prompt_format=chat, but the tokenizer has no chat template; use prompt_format: plain")
    rows = [item.row(task) for item in items]
    if prompt_format == "chat":
        for row in rows:
            row["prompt"] = [{"role": "user", "content": row["prompt"]}]
    return rows


def check_sequence_length(model_config, dataset: Dataset, tokenizer, config: GRPOConfig, name: str) -> None:
    """Refuse the longest prompt plus `max_completion_length` beyond the model's positions or a sliding window."""
    rows = dataset["prompt"]
    if rows and not isinstance(rows[0], str):
        rows = [tokenizer.apply_chat_template(row, tokenize=False, add_generation_prompt=True) for row in rows]
    longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in rows)
    where = f"the longest prompt ({longest} tokens) + max_completion_length"
    check_positions(model_config, longest + config.max_completion_length, where)
    for layer, window in enumerate(sliding_windows(model_config)):
        check_window(window, layer, longest + config.max_completion_length, f"{name} with {where}")


def train_items(task_args: GRPOTaskArguments) -> list[TaskItem]:
    if task_args.task == "gsm8k":
        return gsm8k_items(task_args.dataset_name, task_args.dataset_train_split, task_args.train_items)
    return task_items(task_args.task, task_args.train_items, seed=task_args.task_seed, split=TRAIN,
                      params=task_args.task_params())


def task_dataset(items: list[TaskItem], task_args: GRPOTaskArguments, tokenizer) -> Dataset:
    return Dataset.from_list(prompt_rows(items, task_args.task, task_args.prompt_format, tokenizer))


@dataclass
class GRPORun:
    """One GRPO run, built and ready to train: its arguments, the trainer and what the output records."""

    lock: OutputLock
    task_args: GRPOTaskArguments
    kv_args: KVCompressionArguments
    config: GRPOConfig
    model_args: ModelConfig
    kv_config: KVCompressionConfig
    trainer: CompressedGRPOTrainer
    tokenizer: object
    fingerprint: dict
    resume: str | None
    resume_changes: list[str]


def build(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> GRPORun:
    """Parse and check the arguments, build the rewards and the prompts, load the policy, make the trainer."""
    task_args, kv_args, config, model_args = parse_args(argv)
    kv_config = kv_args.to_config()
    check_training_length(config)
    rewards = build_rewards(task_args.rewards)
    check_options(config, model_args)
    check_output_dir(config.output_dir)
    # Inputs are checked before the output folder is taken (and so created), as in distillation.
    options = load_options(model_args)
    # The prompts' length is known once the tokenizer is: the completions alone are checked before the weights load.
    check_length_before_loading(model_args, config.max_completion_length, "max_completion_length", options["revision"])
    items = train_items(task_args)
    resume = resolve_resume(task_args.resume or config.resume_from_checkpoint, config.output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=config.get_process_log_level())
    transformers.utils.logging.set_verbosity(config.get_process_log_level())
    with lock_output(config.output_dir, "train/grpo.py", argv) as lock:
        transformers.set_seed(config.seed)
        record = run_record(task_args, kv_config, config, model_args, section="task",
                            data=texts_fingerprint(json.dumps(item.row(task_args.task), sort_keys=True) for item in items))
        resume_changes = check_resume(resume, record, task_args.allow_resume_changes) if resume else []

        model, tokenizer = load_model(model_args.model_name_or_path, **options)
        fingerprint = model_fingerprint(model.config)
        use_kvtrain_attention(model)
        if "quantization_config" in options:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
        dataset = task_dataset(items, task_args, tokenizer)
        check_sequence_length(model.config, dataset, tokenizer, config, model_args.model_name_or_path)
        trainer = CompressedGRPOTrainer(
            model=model,
            reward_funcs=rewards,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args) if model_args.use_peft else None,
            callbacks=callbacks,
            kv_config=kv_config,
            task_args=task_args,
            run_record=record,
        )
        zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
        if zero3 and task_args.merge_adapter:
            raise UserError("merge_adapter is not supported under DeepSpeed ZeRO-3 (weights are partitioned); save the adapter")
        run = GRPORun(lock, task_args, kv_args, config, model_args, kv_config, trainer, tokenizer, fingerprint, resume,
                      resume_changes)
    return run


def train(run: GRPORun):
    return run.trainer.train(resume_from_checkpoint=run.resume)


def save(run: GRPORun, result) -> Path:
    """The weights (adapter, merged or full), the tokenizer, the `kv_compression/` bundle and the metadata."""
    trainer, model_args, task_args = run.trainer, run.model_args, run.task_args
    output_dir = Path(run.config.output_dir)
    merged = model_args.use_peft and task_args.merge_adapter
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
                "trainer": "grpo",
                "rollout_cache": task_args.rollout_cache,
                "arguments": {
                    "task": dataclasses.asdict(task_args),
                    "compression": dataclasses.asdict(run.kv_args),
                    "model": dataclasses.asdict(model_args),
                    "training": run.config.to_dict(),
                },
                "resumed_from": run.resume,
                "resume_changes": run.resume_changes,
                "metrics": {"train": result.metrics, "log_history": trainer.state.log_history},
            },
        )
        permissions_as_created(output_dir.glob("*.safetensors"))  # the weights: private as safetensors writes them
        write_output_manifest(output_dir)
    trainer.accelerator.wait_for_everyone()
    return output_dir


def main(argv: list[str] | None = None, *, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Run one GRPO training; returns the output folder (weights + kv_compression/ + kvtrain_training.json)."""
    init_cpu_distributed()
    run = build(argv, callbacks)
    try:
        return save(run, train(run))
    finally:
        run.lock.release()  # every process holds the lock: each lets go, the last removes the file
