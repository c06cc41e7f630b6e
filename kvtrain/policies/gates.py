"""Learned retention gates (DMS-style): per layer and KV head, a keep logit for each token when it is written.

The gate reads the token's own key (un-rotated, so that the decision does not depend on where the token sits)
and value, which every compression event already has in `ScoreInputs`: the runtime needs no access to hidden
states. Its parameters live in one small `RetentionGates` module attached to the model as ``kvtrain_gates``, so
that PEFT, DDP and checkpoints carry them like any other weight. They start at zero: an untrained gate gives every
token the logit 0, which means "keep" in threshold mode (the cache is the full cache, capped by the budget) and a
tie in budget mode (selection then keeps the oldest tokens, its tie rule).

Two inference modes (`GateScorer.mode`):

* ``budget``: the keep logit is the score; selection keeps the top-k at each event, so per-layer budgets,
  head-adaptive selection, KeepKV merging, TaDA and low rank compose with it like with any scorer.
* ``threshold``: a token whose keep logit is negative is evicted at the first event at which it is at least
  ``window`` tokens old (``tokens_seen - 1 - position >= window``); the cache size varies with the text, and the
  config's budget still caps it (top-k by keep logit among the survivors). Sinks and recent tokens are never
  evicted.

The logit is computed once, at the first event that sees the token (before the codecs archive it), and carried as
scorer state, so a quantised or low-rank archive never changes a decision already made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from kvtrain.models.rope import unrotate
from kvtrain.policies.base import ScoreInputs, Scorer, register_scorer

GATES_ATTRIBUTE = "kvtrain_gates"
GATE_MODES = ("budget", "threshold")


class RetentionGates(nn.Module):
    """Keep logits ``[b, h_kv, n]`` of layer ``l``: ``w[l, h] . [k_pre; v] + bias[l, h]`` (zero-initialised)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_layers, num_kv_heads, 2 * head_dim))
        self.bias = nn.Parameter(torch.zeros(num_layers, num_kv_heads))

    @classmethod
    def for_model(cls, model_config) -> "RetentionGates":
        head_dim = getattr(model_config, "head_dim", None) or (
            model_config.hidden_size // model_config.num_attention_heads
        )
        return cls(model_config.num_hidden_layers, model_config.num_key_value_heads, head_dim)

    def logits(self, layer_idx: int, keys: Tensor, values: Tensor) -> Tensor:
        """Keep logits of pre-RoPE `keys` and `values` ``[b, h_kv, n, d]`` of layer `layer_idx`: ``[b, h_kv, n]``."""
        features = torch.cat([keys, values], dim=-1).to(self.weight.dtype)
        return torch.einsum("bhnf,hf->bhn", features, self.weight[layer_idx]) + self.bias[layer_idx][None, :, None]


def attached_gates(model, weights: str | None = None) -> RetentionGates:
    """The model's gates: the attached module, else one loaded from `weights` (a safetensors file holding
    ``weight`` and ``bias``) or zero-initialised, attached as ``model.kvtrain_gates``."""
    gates = getattr(model, GATES_ATTRIBUTE, None)
    if gates is not None:
        return gates
    gates = RetentionGates.for_model(model.config)
    if weights is not None:
        from safetensors.torch import load_file

        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"gate weights {path}: no such file")
        tensors = load_file(str(path))
        for name, param in gates.named_parameters():
            if name not in tensors or tensors[name].shape != param.shape:
                got = tuple(tensors[name].shape) if name in tensors else "missing"
                raise ValueError(f"gate weights {path}: {name} is {got}, this model needs {tuple(param.shape)}")
        gates.load_state_dict(tensors)
    model_param = next(model.parameters())
    gates = gates.to(device=model_param.device)
    setattr(model, GATES_ATTRIBUTE, gates)
    return gates


@register_scorer
@dataclass
class GateScorer(Scorer):
    """Score = the token's learned keep logit (see the module docstring for the two modes)."""

    name = "gate"
    mode: str = "budget"
    window: int = 64  # threshold mode: a token may be evicted once it is this many tokens old
    weights: str | None = None  # safetensors of trained gates, used when the model carries none

    def __post_init__(self) -> None:
        if self.mode not in GATE_MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {GATE_MODES}")
        if self.window < 0:
            raise ValueError(f"window={self.window} must be >= 0")
        self.gates: RetentionGates | None = None

    def bind(self, model) -> None:
        self.gates = attached_gates(model, self.weights)

    def __call__(self, inputs: ScoreInputs, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if self.gates is None:
            raise ValueError("the gate scorer has no gates: build it through build_compressors(config, model)")
        logit = self.logits(self.gates, inputs)
        if "logit" in state:
            logit = torch.where(inputs.has_history, state["logit"].to(logit.dtype), logit)
        logit = logit.masked_fill(~inputs.valid, 0.0)
        return logit, {"logit": logit}

    @staticmethod
    def logits(gates: RetentionGates, inputs: ScoreInputs) -> Tensor:
        """Keep logits ``[b, h_kv, n]`` of the candidates from their un-rotated keys and their values."""
        b, h, n, d = inputs.keys.shape
        rope_positions = (inputs.positions - inputs.rope_offset[:, None, None]).clamp(min=0).reshape(b, h * n)
        cos, sin = inputs.rope_tables(rope_positions)
        pre = unrotate(inputs.keys.float().reshape(b, 1, h * n, d), cos, sin).reshape(b, h, n, d)
        return gates.logits(inputs.layer_idx, pre, inputs.values.float())

    def discards(self, inputs: ScoreInputs, scores: Tensor) -> Tensor | None:
        if self.mode != "threshold":
            return None
        age = inputs.query_positions[-1] - inputs.positions
        return inputs.valid & (age >= self.window) & (scores < 0)
