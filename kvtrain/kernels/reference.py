"""Plain-PyTorch references for the kernels in this package (also the CPU implementation).

They compute in float32 from the given inputs and cast the result back to the input dtype, which is what the
Triton kernels do too. A query row with nothing to attend (every logit -inf) gets a zero output and zero
attention, where a plain softmax would give NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kvtrain.kernels.formats import MeanCentredKV
from kvtrain.quant import packing
from kvtrain.quant.packing import PackedTensor


def masked_softmax(logits: Tensor, valid: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``valid``; rows with no valid entry come out all zero."""
    any_valid = valid.any(dim=-1, keepdim=True)
    # Replacing a dead row's logits by zeros keeps softmax (and its gradient) finite; the row is zeroed after.
    logits = torch.where(valid, logits, float("-inf"))
    logits = torch.where(any_valid, logits, torch.zeros_like(logits))
    return torch.softmax(logits, dim=-1) * any_valid


def dense(x: Tensor | MeanCentredKV) -> Tensor:
    """A K/V operand as a float32 ``[b, h_kv, n, d]`` tensor."""
    return x.dequantize(torch.float32) if isinstance(x, MeanCentredKV) else x.float()


def decode_attention_reference(
    q: Tensor,
    k: Tensor | MeanCentredKV,
    v: Tensor | MeanCentredKV,
    bias: Tensor | None,
    scaling: float,
    return_key_scores: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """One-query-per-head attention over a (possibly compressed) cache.

    q ``[b, h_q, dk]``, k ``[b, h_kv, n, dk]``, v ``[b, h_kv, n, dv]``, bias ``[b, h_kv, n]`` (additive, -inf =
    empty slot). Returns out ``[b, h_q, dv]`` and, when asked, key_scores ``[b, h_kv, n]``: each key's
    attention probability summed over the query heads of its group.
    """
    keys, values = dense(k), dense(v)
    b, h_q, _ = q.shape
    h_kv = keys.shape[1]
    group = h_q // h_kv
    qg = q.float().view(b, h_kv, group, -1)
    logits = torch.einsum("bhgd,bhnd->bhgn", qg, keys) * scaling
    if bias is not None:
        bias = bias.float()[:, :, None, :]
        valid = (bias > float("-inf")).expand_as(logits)
        logits = logits + torch.where(valid, bias, torch.zeros_like(bias))
    else:
        valid = torch.ones_like(logits, dtype=torch.bool)
    probs = masked_softmax(logits, valid)
    out = torch.einsum("bhgn,bhnd->bhgd", probs, values).reshape(b, h_q, -1).to(q.dtype)
    if return_key_scores:
        return out, probs.sum(dim=2)
    return out


def interval_bounds(starts: Sequence[int] | Tensor, seq_len: int) -> list[tuple[int, int]]:
    """``[(start_e, end_e)]`` for each event: interval e covers rows ``[starts[e], starts[e+1])``, the last to S."""
    values = [int(s) for s in (starts.tolist() if isinstance(starts, Tensor) else starts)]
    if not values or values[0] != 0:
        raise ValueError(f"starts must begin with 0, got {values[:4]}")
    if any(a > b for a, b in zip(values, values[1:])) or values[-1] > seq_len:
        raise ValueError(f"starts must be non-decreasing and <= S={seq_len}, got {values}")
    return list(zip(values, values[1:] + [seq_len]))


def keyset_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kept_k: Tensor,
    kept_v: Tensor,
    kept_bias: Tensor,
    starts: Sequence[int] | Tensor,
    scaling: float,
    key_padding: Tensor | None = None,
) -> Tensor:
    """Attention of each query row to its event's kept entries plus the causal block of its own interval.

    q ``[b, h_q, S, d]``, k/v ``[b, h_kv, S, d]``, kept_k/kept_v ``[E, b, h_kv, K, d]``, kept_bias
    ``[E, b, h_kv, K]`` (-inf = empty slot), key_padding ``[b, S]`` (False = never attended). Row i in
    interval e sees the K kept entries of e and keys j with ``starts[e] <= j <= i``. Returns ``[b, h_q, S, d]``.
    Differentiable in every float input but kept_bias.
    """
    b, h_q, seq_len, _ = q.shape
    group = h_q // k.shape[1]
    outs = []
    for e, (lo, hi) in enumerate(interval_bounds(starts, seq_len)):
        if hi == lo:
            continue
        rows = hi - lo
        qe = q[:, :, lo:hi].float()
        kept_keys = kept_k[e].float().repeat_interleave(group, dim=1)
        local_keys = k[:, :, lo:hi].float().repeat_interleave(group, dim=1)
        values = torch.cat([kept_v[e], v[:, :, lo:hi]], dim=2).float().repeat_interleave(group, dim=1)
        bias = kept_bias[e].float().repeat_interleave(group, dim=1)[:, :, None, :].expand(b, h_q, rows, -1)
        kept_valid = bias > float("-inf")
        kept_logits = qe @ kept_keys.transpose(-1, -2) * scaling + torch.where(kept_valid, bias, torch.zeros_like(bias))
        local_logits = qe @ local_keys.transpose(-1, -2) * scaling
        local_valid = torch.ones(rows, rows, dtype=torch.bool, device=q.device).tril()[None, None]
        if key_padding is not None:
            local_valid = local_valid & key_padding[:, None, None, lo:hi]
        valid = torch.cat([kept_valid, local_valid.expand(b, h_q, rows, rows)], dim=-1)
        probs = masked_softmax(torch.cat([kept_logits, local_logits], dim=-1), valid)
        outs.append(probs @ values)
    return torch.cat(outs, dim=2).to(q.dtype)


def quantize_reference(x: Tensor, bits: int, group_size: int) -> PackedTensor:
    """Group-wise quantise-and-pack; the layout contract lives in ``kvtrain.quant.packing``."""
    return packing.quantize(x, bits, group_size)


def dequantize_reference(p: PackedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return packing.dequantize(p, dtype)
