"""`GRPOTaskArguments`: what GRPO under compression reads besides the compression flags, TRL's `GRPOConfig`
(generation, loss, `num_iterations`, `beta`, ...) and `trl.ModelConfig` (LoRA fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from kvtrain.arguments import parse_key_values

CACHES = ("compressed", "full")
PROMPT_FORMATS = ("chat", "plain")


@dataclass
class GRPOTaskArguments:
    task: str = field(default="passkey", metadata={"help": "built-in task (passkey, arithmetic, copy, format) or gsm8k (with dataset_name)"})
    task_param: list[str] = field(default_factory=list, metadata={"help": "task parameter KEY=VALUE (repeatable), e.g. filler=8"})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "gsm8k: a .jsonl file or a datasets name ('name' or 'name:config')"})
    dataset_train_split: str = field(default="train", metadata={"help": "split of dataset_name used for training"})
    train_items: int = field(default=512, metadata={"help": "built-in tasks: training items generated (gsm8k: at most this many records)"})
    task_seed: int = field(default=0, metadata={"help": "seed of the built-in task's items (held-out items use another stream)"})
    prompt_format: str = field(default="chat", metadata={"help": "chat (a user message, the tokenizer's chat template) or plain (the text as is)"})
    rewards: list[str] = field(default_factory=lambda: ["task"], metadata={"help": "reward names (kvtrain.training.grpo.rewards), weighted by reward_weights"})
    rollout_cache: str = field(default="compressed", metadata={"help": "compressed: sample under the compression config and train on the replay of each rollout's keep-sets (RL-Sparse); full: sample and train with the full cache (RL-Full)"})
    reference_cache: str = field(default="compressed", metadata={"help": "with beta > 0, the KL reference (the weights with adapters disabled) runs under the rollout's keep-sets (compressed) or with full attention (full)"})
    log_naive_gap: bool = field(default=True, metadata={"help": "log the rollout log-prob gap a full-attention training forward would have (one extra forward per fresh micro-batch)"})
    resume: Optional[str] = field(default=None, metadata={"help": "'latest' (newest intact checkpoint in output_dir, fresh start if none) or a checkpoint path"})
    allow_resume_changes: bool = field(default=False, metadata={"help": "resume even though run-defining arguments (learning rate, compression, task, ...) differ from the checkpoint's run; the changes are recorded"})
    merge_adapter: bool = field(default=False, metadata={"help": "LoRA: save merged full weights instead of the adapter"})

    def __post_init__(self) -> None:
        if self.rollout_cache not in CACHES:
            raise ValueError(f"rollout_cache={self.rollout_cache!r} must be one of {CACHES}")
        if self.reference_cache not in CACHES:
            raise ValueError(f"reference_cache={self.reference_cache!r} must be one of {CACHES}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format={self.prompt_format!r} must be one of {PROMPT_FORMATS}")
        if self.train_items < 1:
            raise ValueError(f"train_items={self.train_items} must be >= 1")
        if self.task == "gsm8k" and not self.dataset_name:
            raise ValueError("task=gsm8k needs dataset_name (a .jsonl file or a datasets name)")
        self.task_params()  # KEY=VALUE syntax

    def task_params(self) -> dict[str, Any]:
        return parse_key_values(self.task_param, "task_param")
