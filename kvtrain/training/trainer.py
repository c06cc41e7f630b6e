"""`CompressionDistillationTrainer`: HF `Trainer` whose loss distils the full-cache teacher into the student
running under replayed KV compression.

Per step: (optionally, with probability `on_policy_fraction`) the student samples the continuation of the
prompt through a `CompressedCache`; the teacher runs a full-attention forward (no grad); the student runs
the same tokens inside `replay_compression`, which reproduces exactly what the compressed cache would
attend to after prefilling `prefill_len` tokens and decoding the rest (a training step holds the replay
over forward and backward, so that gradient checkpointing recomputes layers under it too); the divergence
between the two next-token distributions is computed from hidden states in chunks
(`kvtrain.training.losses`) over the continuation only (prompt and padding are masked). Only what `Trainer` lacks is written here: the loss,
metric logging, loyalty evaluation and atomic checkpoints.

With `train_projections`, the low-rank projections are parameters of the student (`TrainableProjections`,
attached as a submodule): the replay computes with them, the optimizer updates them (with their own peak
learning rate if asked), and every checkpoint holds them next to the HF weights, which never contain them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch
from peft import PeftModel
from torch import Tensor
from transformers import Trainer

from kvtrain.config import KVCompressionConfig
from kvtrain.errors import NonFiniteError
from kvtrain.eval.loyalty import evaluate_loyalty
from kvtrain.io import atomic_write_text
from kvtrain.models.generation import eos_token_ids
from kvtrain.runtime.compressor import LayerPairs
from kvtrain.runtime.decode import position_ids_from_mask
from kvtrain.runtime.replay import Replay, replay_compression, replay_disabled
from kvtrain.training import checkpoints
from kvtrain.training.arguments import DistillationArguments
from kvtrain.training.losses import distillation_loss
from kvtrain.training.numerics import check_finite_gradients, first_nonfinite_layer
from kvtrain.training.on_policy import generate_continuations, step_generator
from kvtrain.training.projections import CHECKPOINT_FILE, TrainableProjections
from kvtrain.training.resume import RUN_FILE
from kvtrain.training.teacher import AdapterDisabledTeacher, FrozenCopyTeacher, final_hidden_states

_ON_POLICY_SALT = 1
# Each checkpoint records the loyalty measured so far, so that a resumed run whose untrained model can no
# longer be measured (ZeRO-3, see run.LoyaltyAtTrainBegin) still reports its loyalty before training.
LOYALTY_FILE = "kvtrain_loyalty.json"


def causal_lm(model):
    """The transformers causal LM inside a (PEFT-wrapped) model: where attention and the lm_head live."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


class CompressionDistillationTrainer(checkpoints.AtomicCheckpoints, Trainer):
    def __init__(
        self,
        *args,
        distill_args: DistillationArguments,
        kv_config: KVCompressionConfig,
        teacher: AdapterDisabledTeacher | FrozenCopyTeacher,
        loyalty_blocks: Tensor | None = None,
        projections: TrainableProjections | None = None,
        run_record: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-micro-batch mean; let Trainer divide by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.distill_args = distill_args
        self.kv_config = kv_config
        self.teacher = teacher
        self.loss_spec = distill_args.loss_spec()
        self.loyalty_blocks = loyalty_blocks
        self.loyalty: dict[str, dict] = {}
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._step_replay: Replay | None = None
        self.projections = projections
        self.run_record = run_record
        _check_head_supported(causal_lm(self.model))
        _check_no_attention_dropout(causal_lm(self.model))

    def training_step(self, model, inputs, num_items_in_batch=None):
        """`Trainer.training_step` with the replay bound over forward *and* backward: under gradient
        checkpointing the backward pass recomputes each layer, which must attend as the forward did."""
        base = causal_lm(self.accelerator.unwrap_model(model))
        with self._replay(base) as replay:
            self._step_replay = replay
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._step_replay = None
        if not self.is_deepspeed_enabled:  # DeepSpeed partitions the gradients; the loss check still holds
            check_finite_gradients(model, self.state.global_step)
        return loss

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`inputs["input_ids"]` [b, block_len] (+ optional attention_mask); returns the scalar loss."""
        ids: Tensor = inputs["input_ids"]
        mask: Tensor = inputs.get("attention_mask", torch.ones_like(ids))
        prefill = self.distill_args.prefill_len
        base = causal_lm(self.accelerator.unwrap_model(model))
        on_policy = self._is_on_policy_step()
        if on_policy:
            with replay_disabled(base):
                ids, mask = generate_continuations(
                    self.accelerator.unwrap_model(model),
                    base,
                    self.kv_config,
                    ids[:, :prefill],
                    ids.shape[1],
                    temperature=self.distill_args.on_policy_temperature,
                    seed=self.args.seed + 7919 * self.state.global_step + self.accelerator.process_index,
                    pad_token_id=_pad_id(base, self.processing_class),
                    eos_token_ids=eos_token_ids(base),
                    projections=self._current_pairs(),
                )
        positions = position_ids_from_mask(mask)
        # Logit at position i predicts token i + 1: supervise continuation tokens (i + 1 >= prefill) that are real.
        supervised = mask[:, 1:].bool() & mask[:, :-1].bool()
        supervised[:, : prefill - 1] = False
        targets = ids[:, 1:][supervised]
        spec = self.loss_spec
        if on_policy:  # sampled tokens are not ground truth: no cross-entropy on them
            spec = dataclasses.replace(spec, ce_weight=0.0)
        with self.teacher.on_device(ids.device) as teacher:
            with replay_disabled(base):  # an adapter-disabled teacher runs the student's own modules
                t_hidden = teacher.hidden_states(ids, mask, positions)[:, :-1][supervised]
            with self._student_replay(base):
                s_hidden = final_hidden_states(model, ids, mask, positions)[:, :-1][supervised]
            s_head, t_head = base.get_output_embeddings().weight, teacher.head_weight()
            with _gathered(s_head, t_head):
                parts = distillation_loss(s_hidden, s_head, t_hidden, t_head, targets, spec)
        if not torch.isfinite(parts.loss):
            source = "the teacher's" if not torch.isfinite(t_hidden).all() else "the student's"
            where = first_nonfinite_layer(base, ids, mask, positions)
            raise NonFiniteError(f"step {self.state.global_step}: the distillation loss is {parts.loss.item()} "
                                 f"({source} hidden states are not finite; {where}); training stopped")
        self._metrics["distill_loss"].append(parts.loss.item())
        self._metrics["divergence"].append(parts.divergence.item())
        self._metrics["ce"].append(parts.ce.item())
        self._metrics["on_policy"].append(float(on_policy))
        self._metrics["supervised_tokens"].append(float(targets.numel()))
        return (parts.loss, None) if return_outputs else parts.loss

    def _student_replay(self, base) -> contextlib.AbstractContextManager:
        """The replay for the student forward: the step's own (bound by `training_step`), or, outside a
        training step (evaluation), one for this forward alone."""
        if self._step_replay is not None:
            return contextlib.nullcontext(self._step_replay)
        return self._replay(base)

    def _replay(self, base) -> contextlib.AbstractContextManager:
        if self.distill_args.student_cache == "full":  # the domain-fit control: same run, no compression seen
            return replay_disabled(base)
        pairs = self.projections.layer_pairs() if self.projections is not None else None
        return replay_compression(base, self.kv_config, prefill_len=self.distill_args.prefill_len, projections=pairs)

    def _current_pairs(self) -> LayerPairs | None:
        """The projections being learned, for what runs the compressed cache outside the replay (sampling,
        loyalty): the cache computes with these tensors, no file in between."""
        return self.projections.layer_pairs() if self.projections is not None else None

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        """`Trainer.create_optimizer`, with the trained projections in a group of their own: peak learning
        rate `projection_learning_rate` (the scheduler scales every group alike) and no weight decay, which
        would pull them towards zero rather than towards the calibrated solution."""
        optimizer = super().create_optimizer(model)
        if self.projections is None:
            return optimizer
        own = list(self.projections.parameters())
        ids = {id(p) for p in own}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        lr = self.distill_args.projection_learning_rate or self.args.learning_rate
        optimizer.add_param_group({"params": own, "lr": lr, "weight_decay": 0.0})
        return optimizer

    def _is_on_policy_step(self) -> bool:
        fraction = self.distill_args.on_policy_fraction
        if fraction <= 0.0 or not self.model.training:
            return False
        # Same draw on every rank (all ranks generate together, as ZeRO-3 needs) and after a resume.
        coin = torch.rand((), generator=step_generator(self.args.seed, self.state.global_step, _ON_POLICY_SALT))
        return bool(coin < fraction)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the means (this rank, since the last log) of the distillation metrics, unrounded."""
        for name, values in self._metrics.items():
            if values:
                logs[name] = sum(values) / len(values)
        self._metrics.clear()
        super().log(logs, start_time)

    def log_loyalty(self, tag: str) -> dict | None:
        """Loyalty of the current model under the compressed cache to the full-cache teacher (the original
        model), on held-out blocks, logged as `loyalty/<tag>/*`. Measured by replay (equal to decoding)."""
        if self.loyalty_blocks is None:
            return None
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()

        def teacher_logits(ids: Tensor) -> Tensor:
            ones = torch.ones_like(ids)
            with self.teacher.on_device(ids.device):
                hidden = self.teacher.hidden_states(ids, ones, position_ids_from_mask(ones))
                head = self.teacher.head_weight()
                with _gathered(head):
                    return hidden @ head.T

        try:
            result = evaluate_loyalty(
                causal_lm(model),
                [self.kv_config],
                self.loyalty_blocks.to(self.args.device),
                context_len=self.distill_args.prefill_len,
                reference=teacher_logits,
                method="replay",
                progress=False,
                projections=self._current_pairs(),
            )[0].to_dict()
        finally:
            model.train(was_training)
        self._record_loyalty(tag, result)
        return result

    def _record_loyalty(self, tag: str, result: dict) -> None:
        self.loyalty[tag] = result
        self.log({f"loyalty/{tag}/{k}": float(v) for k, v in result.items() if v is not None})

    # ------------------------------------------------------------------ checkpoints
    def save_extra_files(self, staging: Path) -> None:
        """The trained projections, the loyalty so far and the run's arguments (for the resume check), next to
        the Trainer's files (see AtomicCheckpoints)."""
        if self.projections is not None:
            self.projections.save(staging / CHECKPOINT_FILE)
        if self.loyalty:
            atomic_write_text(staging / LOYALTY_FILE, json.dumps(self.loyalty, indent=1))
        if self.run_record is not None:
            atomic_write_text(staging / RUN_FILE, json.dumps(self.run_record, indent=1, default=str))

    def restore_loyalty(self, checkpoint: str | Path, tag: str) -> bool:
        """Take the loyalty `tag` recorded in `checkpoint` (and log it again); False if it holds none."""
        path = Path(checkpoint) / LOYALTY_FILE
        recorded = json.loads(path.read_text()) if path.is_file() else {}
        if tag not in recorded:
            return False
        self._record_loyalty(tag, recorded[tag])
        return True

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """`Trainer._save` without the trained projections: the HF weights load into a plain model (or
        adapter), and the projections are saved in the calibration format instead."""
        if self.projections is not None:
            state_dict = self.model.state_dict() if state_dict is None else state_dict
            state_dict = {k: v for k, v in state_dict.items() if not TrainableProjections.is_own(k)}
        super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.projections is not None:
            self.projections.load(Path(resume_from_checkpoint) / CHECKPOINT_FILE)

    def _issue_warnings_after_load(self, load_result) -> None:
        """The checkpoint's weights lack the projections by design (`_load_from_checkpoint` restores them)."""
        missing = [k for k in load_result.missing_keys if not TrainableProjections.is_own(k)]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))


def _pad_id(model, tokenizer) -> int:
    eos = eos_token_ids(model)
    for source in (getattr(tokenizer, "pad_token_id", None), model.config.pad_token_id, eos[0] if eos else None):
        if isinstance(source, int):
            return source
    raise ValueError("on-policy generation needs a pad token: the tokenizer and the model config define none")


@contextlib.contextmanager
def _gathered(*weights: Tensor):
    """Under DeepSpeed ZeRO-3 the (frozen) lm_head weights are partitioned: gather them for the loss."""
    partitioned = [w for w in weights if hasattr(w, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        yield


def _check_no_attention_dropout(model) -> None:
    """Refused here, before loyalty and the first step, what the attention function would refuse in training."""
    dropout = float(getattr(model.config, "attention_dropout", 0.0) or 0.0)
    if dropout:
        raise ValueError(f"{type(model).__name__}: attention_dropout={dropout} in the model config: attention dropout "
                         "is not supported by kvtrain's compressed cache and replay; set it to 0 in config.json")


def _check_head_supported(model) -> None:
    """The chunked loss reads the lm_head weight directly: refuse what would make that wrong."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: an lm_head with a bias is not supported by the chunked loss")
    weight = head.weight
    if hasattr(weight, "ds_id") and weight.requires_grad:
        raise ValueError(
            "DeepSpeed ZeRO-3 with a trainable lm_head is not supported by the chunked loss (the weight is "
            "partitioned); use LoRA (use_peft) or ZeRO-2"
        )
