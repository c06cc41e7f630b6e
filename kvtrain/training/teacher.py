"""The full-cache teacher: the student's own base weights with LoRA adapters disabled, or a frozen copy."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor

# An empty index tensor as `logits_to_keep`: the forward computes no logits, only hidden states.
NO_LOGITS = torch.zeros(0, dtype=torch.long)


def final_hidden_states(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
    """Normed last-layer hidden states [b, S, H] of a causal LM forward that skips the lm_head."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=NO_LOGITS.to(input_ids.device),
    )
    return out.hidden_states[-1]


class AdapterDisabledTeacher:
    """LoRA: the teacher is the same module with its adapters switched off; no second copy of the weights."""

    def __init__(self, peft_model):
        self.model = peft_model

    @contextlib.contextmanager
    def on_device(self, device: torch.device):
        yield self

    @torch.no_grad()
    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        with self.model.disable_adapter():
            return final_hidden_states(self.model, input_ids, attention_mask, position_ids)

    def head_weight(self) -> Tensor:
        return self.model.get_output_embeddings().weight


class FrozenCopyTeacher:
    """Full fine-tuning: a frozen deep copy of the initial model, optionally parked on CPU between steps.

    With `offload`, the copy lives on CPU and `on_device` moves it to the student's device for the
    teacher forward and the loss, then back, so device memory holds the teacher only during that time
    (at the cost of two host<->device copies of its weights per step).
    """

    def __init__(self, model, *, offload: bool):
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self.offload = offload
        if offload:
            self.model.to("cpu")

    @contextlib.contextmanager
    def on_device(self, device: torch.device):
        self.model.to(device)
        try:
            yield self
        finally:
            if self.offload:
                self.model.to("cpu")

    @torch.no_grad()
    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        return final_hidden_states(self.model, input_ids, attention_mask, position_ids)

    def head_weight(self) -> Tensor:
        return self.model.get_output_embeddings().weight
