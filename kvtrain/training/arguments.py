"""`DistillationArguments`: what compression-aware distillation reads besides the compression and trainer flags.

Parsed together with `KVCompressionArguments`, `transformers.TrainingArguments` and `trl.ModelConfig`
(LoRA vs full fine-tuning is `ModelConfig.use_peft` with its `lora_*` fields, not repeated here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kvtrain.training.losses import DIVERGENCES, LossSpec

# What the student attends to while training: the compression it is evaluated with, or the full cache (control).
STUDENT_CACHES = ("compressed", "full")


@dataclass
class DistillationArguments:
    dataset_name: str = field(default="embedded", metadata={"help": "text source for kvtrain.data.load_texts: 'embedded', a .txt/.jsonl file or a datasets name"})
    dataset_train_split: str = field(default="train", metadata={"help": "split of dataset_name used for training"})
    dataset_text_field: str = field(default="text", metadata={"help": "field holding the text in .jsonl / datasets sources"})
    block_len: int = field(default=512, metadata={"help": "tokens per training sequence (prompt + continuation)"})
    block_stride: Optional[int] = field(default=None, metadata={"help": "tokens between the starts of consecutive training blocks (default block_len: disjoint; smaller: overlapping windows, more distinct prompt/continuation splits of the same text)"})
    max_blocks: Optional[int] = field(default=None, metadata={"help": "use at most this many training blocks (default: all)"})
    prefill_len: int = field(default=256, metadata={"help": "leading tokens treated as the prompt: prefilled by the cache, masked in the loss"})
    loss: str = field(default="forward_kl", metadata={"help": f"divergence: one of {DIVERGENCES}; forward_kl = KL(teacher || student)"})
    beta: float = field(default=0.5, metadata={"help": "jsd interpolation weight in (0, 1)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of both models in the divergence (loss scaled by T^2)"})
    ce_weight: float = field(default=0.0, metadata={"help": "weight of the next-token cross-entropy on real text (0 = pure distillation)"})
    loss_chunk_tokens: int = field(default=256, metadata={"help": "supervised tokens per loss chunk (memory ~ chunk x vocab chunk)"})
    vocab_chunk: int = field(default=8192, metadata={"help": "vocabulary rows per loss chunk"})
    teacher_offload: bool = field(default=False, metadata={"help": "full fine-tuning: keep the frozen teacher copy on CPU between steps"})
    merge_adapter: bool = field(default=False, metadata={"help": "LoRA: save merged full weights instead of the adapter"})
    on_policy_fraction: float = field(default=0.0, metadata={"help": "probability per step that the student generates the continuation under the compressed cache (GKD)"})
    on_policy_temperature: float = field(default=1.0, metadata={"help": "sampling temperature of on-policy generation"})
    loyalty_dataset_name: Optional[str] = field(default=None, metadata={"help": "held-out text for loyalty (default: dataset_name)"})
    loyalty_split: str = field(default="heldout", metadata={"help": "split of the loyalty text"})
    loyalty_blocks: int = field(default=4, metadata={"help": "held-out blocks for loyalty before/after training (0 = skip)"})
    resume: Optional[str] = field(default=None, metadata={"help": "'latest' (newest intact checkpoint in output_dir, fresh start if none) or a checkpoint path"})
    allow_resume_changes: bool = field(default=False, metadata={"help": "resume even though run-defining arguments (learning rate, compression, ...) differ from the checkpoint's run; the changes are recorded"})
    train_projections: bool = field(default=False, metadata={"help": "train the low-rank projections of the compression config (lowrank.projections) jointly with the student and save the trained ones as the output's artifacts"})
    projection_learning_rate: Optional[float] = field(default=None, metadata={"help": "peak learning rate of the trained projections, same schedule (default: learning_rate)"})
    student_cache: str = field(default="compressed", metadata={"help": "'compressed': the student trains under the replayed compression; 'full': the domain-fit control, the same run (data, steps, lr, loss) with the student's forward uncompressed, recording the compression config it is evaluated with"})

    def __post_init__(self) -> None:
        if self.block_len < 2:
            raise ValueError(f"block_len={self.block_len} must be >= 2")
        if not 0 < self.prefill_len < self.block_len:
            raise ValueError(f"prefill_len={self.prefill_len} must be in [1, block_len={self.block_len})")
        if self.block_stride is not None and not 1 <= self.block_stride <= self.block_len:
            raise ValueError(f"block_stride={self.block_stride} must be in [1, block_len={self.block_len}]")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise ValueError(f"max_blocks={self.max_blocks} must be >= 1")
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ValueError(f"on_policy_fraction={self.on_policy_fraction} must be in [0, 1]")
        if not self.on_policy_temperature > 0.0:
            raise ValueError(f"on_policy_temperature={self.on_policy_temperature} must be > 0")
        if self.loyalty_blocks < 0:
            raise ValueError(f"loyalty_blocks={self.loyalty_blocks} must be >= 0")
        if self.projection_learning_rate is not None:
            if not self.train_projections:
                raise ValueError(f"projection_learning_rate={self.projection_learning_rate} is set but train_projections is false")
            if not self.projection_learning_rate > 0.0:
                raise ValueError(f"projection_learning_rate={self.projection_learning_rate} must be > 0")
        if self.student_cache not in STUDENT_CACHES:
            raise ValueError(f"student_cache={self.student_cache!r} must be one of {STUDENT_CACHES}")
        if self.student_cache == "full" and (self.on_policy_fraction > 0.0 or self.train_projections):
            # Both would run the compressed cache during training, which the control must not see.
            raise ValueError("student_cache='full' (the full-cache control) needs on_policy_fraction=0 and "
                             "train_projections=false")
        self.loss_spec()  # validates loss, beta, temperature, ce_weight and the chunk sizes

    def loss_spec(self) -> LossSpec:
        return LossSpec(
            divergence=self.loss,
            beta=self.beta,
            temperature=self.temperature,
            ce_weight=self.ce_weight,
            chunk_tokens=self.loss_chunk_tokens,
            vocab_chunk=self.vocab_chunk,
        )
