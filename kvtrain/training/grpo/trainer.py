"""`CompressedGRPOTrainer`: TRL's `GRPOTrainer` whose rollouts sample through a `CompressedCache` and whose every
log-prob forward (policy, old, reference) replays exactly the keep-sets each rollout recorded.

The hooks it overrides, and why each is the smallest that works:

* `_generate_single_turn`: TRL's own generation (padding, DDP/DeepSpeed unwrapping, ZeRO-3 gathering, EOS
  masking) runs unchanged inside `recording_generate`, which makes the policy's `generate` sample through a
  recording cache and note each sampled token's log-probability; those are returned to TRL as the rollout's
  log-probs (its `sampling_per_token_logps`).
* `_generate_and_score_completions`: adds the rows' keep-sets and codes (`KeepSetBatch` tensors, row first) and
  the optimizer step they were sampled at to the batch dict, which TRL then shuffles and splits with the rest.
* `_get_per_token_logps_and_entropies`: TRL's forward, run per chunk of rows inside
  `replay_compression(..., keep_sets=<those rows' records>, codes=<their codes>)`. A forward with gradient binds its
  replay until the end of the training step, so that backward (gradient checkpointing recomputes layers) attends as the forward did.
* `_compute_loss`: tells the forward which rows it scores, and on a micro-batch sampled by the current weights
  logs the mismatch: mean |logp_rollout - logp_training| over completion tokens (`logp_gap/replay`) and, for
  comparison, the gap a full-attention training forward of the same rollouts has (`logp_gap/full_attention`).
  With old log-probs it logs mean |log ratio| (`importance/abs_log_ratio`): 0 on a fresh batch, the weights'
  move on a reused one.

Old log-probs (when a generation serves several updates, `num_iterations > 1`) are computed by TRL through the
same hook right after generation, i.e. the replay of the rollout's keep-sets with the weights that sampled it:
the importance ratio then measures only the change of the weights. With `rollout_cache: full` (RL-Full) nothing
is replayed: rollouts and training use the full cache.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor
from trl import GRPOTrainer

from kvtrain.config import KVCompressionConfig
from kvtrain.errors import NonFiniteError
from kvtrain.io import atomic_write_text
from kvtrain.runtime.replay import replay_compression, replay_disabled
from kvtrain.training import checkpoints
from kvtrain.training.grpo.arguments import GRPOTaskArguments
from kvtrain.training.grpo.rollouts import POLICY_STEP, KeepSetBatch, recording_generate
from kvtrain.training.numerics import check_finite_gradients
from kvtrain.training.resume import RUN_FILE
from kvtrain.training.trainer import causal_lm


class CompressedGRPOTrainer(checkpoints.AtomicCheckpoints, GRPOTrainer):
    def __init__(self, *args, kv_config: KVCompressionConfig, task_args: GRPOTaskArguments,
                 run_record: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kv_config = kv_config
        self.task_args = task_args
        self.run_record = run_record
        self.compressed = task_args.rollout_cache == "compressed"
        unsupported = {
            "use_vllm": self.use_vllm,
            "use_transformers_continuous_batching": self.use_transformers_continuous_batching,
            "tools": bool(self.tools),
            "rollout_func": self.rollout_func is not None,
        }
        named = [name for name, used in unsupported.items() if used]
        if named:
            raise ValueError(f"{', '.join(named)}: not supported by compressed GRPO, whose rollouts are sampled by "
                             "transformers' generate through the compressed cache, one turn per prompt")
        self._rows: KeepSetBatch | None = None  # keep-sets of the rows the next log-prob forward scores
        self._step_stack: contextlib.ExitStack | None = None  # replays held until the training step's backward
        self._loss_logps: Tensor | None = None

    # ------------------------------------------------------------------ rollouts
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        model = self.accelerator.unwrap_model(self.model_wrapped)
        config = self.kv_config if self.compressed else None
        with recording_generate(model, causal_lm(model), config, self.temperature) as rollouts:
            completion_ids, _ = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if len(rollouts) != 1:
            raise RuntimeError(f"expected one generate call per generation step, saw {len(rollouts)}")
        rollout = rollouts[0]
        if self.compressed:
            self._rows = KeepSetBatch.from_records(rollout.records, len(completion_ids), rollout.codes)
        logprobs = [row[: len(ids)].tolist() for row, ids in zip(rollout.logprobs.cpu(), completion_ids, strict=True)]
        return completion_ids, logprobs

    def _generate_and_score_completions(self, inputs):
        self._rows = None
        try:
            output = super()._generate_and_score_completions(inputs)
            rows = self._rows
        finally:
            self._rows = None
        n = output["prompt_ids"].shape[0]
        if self.compressed:
            output.update(rows.fields(output["prompt_ids"].device))
        output[POLICY_STEP] = torch.full((n,), self.state.global_step, device=output["prompt_ids"].device)
        return output

    # ------------------------------------------------------------------ log-prob forwards
    def training_step(self, model, inputs, num_items_in_batch):
        with contextlib.ExitStack() as stack:
            self._step_stack = stack
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._step_stack = None
        if not self.is_deepspeed_enabled:  # DeepSpeed partitions the gradients; the loss check still holds
            check_finite_gradients(model, self.state.global_step)
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        forward = super()._get_per_token_logps_and_entropies
        if any(value is not None for value in multimodal.values()):
            raise ValueError(f"compressed GRPO trains text models; got {sorted(k for k, v in multimodal.items() if v is not None)}")
        base = causal_lm(self.accelerator.unwrap_model(model))
        if not self.compressed or (self.task_args.reference_cache == "full" and _adapters_disabled(base)):
            with replay_disabled(base):
                out = forward(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                              compute_aux_loss)
            if torch.is_grad_enabled():
                self._loss_logps = out[0].detach()
            return out
        rows = self._rows
        n = input_ids.shape[0]
        if rows is None or rows.rows != n:
            raise RuntimeError(f"a log-prob forward of {n} rows without their recorded keep-sets "
                               f"({'none' if rows is None else rows.rows} set)")
        batch_size = batch_size or n
        grad = torch.is_grad_enabled()
        if grad and batch_size < n:
            raise ValueError("a forward with gradient must score its rows in one chunk (its replay is held until backward)")
        prefill = input_ids.shape[1] - logits_to_keep
        chunks = []
        for start in range(0, n, batch_size):
            end = min(start + batch_size, n)
            chunk = rows.slice(start, end)
            replay = replay_compression(base, self.kv_config, prefill_len=prefill,
                                        keep_sets=chunk.records(input_ids.device), codes=chunk.layer_codes(input_ids.device))
            with contextlib.ExitStack() as local:
                (self._step_stack if grad and self._step_stack is not None else local).enter_context(replay)
                chunks.append(forward(model, input_ids[start:end], attention_mask[start:end], logits_to_keep,
                                      end - start, compute_entropy, compute_aux_loss))
        logps = torch.cat([c[0] for c in chunks])
        entropies = torch.cat([c[1] for c in chunks]) if compute_entropy else None
        aux = torch.stack([c[2] for c in chunks]).mean() if compute_aux_loss else None
        if grad:
            self._loss_logps = logps.detach()
        return logps, entropies, aux

    # ------------------------------------------------------------------ loss and the mismatch it is computed with
    def _compute_loss(self, model, inputs):
        self._rows = KeepSetBatch.from_fields(inputs) if self.compressed else None
        self._loss_logps = None
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._rows = None
        if not torch.isfinite(loss):
            raise NonFiniteError(f"step {self.state.global_step}: the GRPO loss is {loss.item()} (log-probs or "
                                 "advantages not finite); training stopped")
        if not self.model.training:
            return loss
        mask = self._loss_mask(inputs)
        if "old_per_token_logps" in inputs:
            # 0 while the weights are those that sampled the batch; the weights' move once it is reused.
            log_ratio = (self._loss_logps - inputs["old_per_token_logps"]).abs()
            self._metrics["train"]["importance/abs_log_ratio"].append(self._masked_mean(log_ratio, mask))
        if bool((inputs[POLICY_STEP] == self.state.global_step).all()):
            self._log_rollout_gaps(model, inputs, mask)
        return loss

    @staticmethod
    def _loss_mask(inputs) -> Tensor:
        mask = inputs["completion_mask"]
        return (mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]).bool()

    def _log_rollout_gaps(self, model, inputs, mask: Tensor) -> None:
        """The rollout's own log-probs against the training forward's (weights unchanged since sampling)."""
        rollout = inputs["sampling_per_token_logps"]
        metrics = self._metrics["train"]
        gap = (rollout - self._loss_logps).abs()
        if self.compressed:
            metrics["logp_gap/replay"].append(self._masked_mean(gap, mask))
            metrics["logp_gap/replay_max"].append(self._masked_max(gap, mask))
            if not self.task_args.log_naive_gap:
                return
            input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            base = causal_lm(self.accelerator.unwrap_model(model))
            with torch.no_grad(), replay_disabled(base):
                naive, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                    self, model, input_ids, attention, inputs["completion_ids"].shape[1]
                )
            gap = (rollout - naive).abs()
        metrics["logp_gap/full_attention"].append(self._masked_mean(gap, mask))
        metrics["logp_gap/full_attention_max"].append(self._masked_max(gap, mask))

    def _masked_mean(self, x: Tensor, mask: Tensor) -> float:
        totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum().float()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _masked_max(self, x: Tensor, mask: Tensor) -> float:
        local = x.masked_fill(~mask, 0.0).max() if mask.any() else x.new_zeros(())
        return self.accelerator.gather(local.reshape(1)).max().item()


    # ------------------------------------------------------------------ checkpoints
    def save_extra_files(self, staging: Path) -> None:
        """The run's arguments, next to the Trainer's files, for the resume check (see `kvtrain.training.resume`)."""
        if self.run_record is not None:
            atomic_write_text(staging / RUN_FILE, json.dumps(self.run_record, indent=1, default=str))


def _adapters_disabled(model) -> bool:
    """True inside PEFT's `disable_adapter()` (how TRL runs the KL reference of a LoRA policy)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return bool(layers) and all(m.disable_adapters for m in layers)
