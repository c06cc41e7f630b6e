"""Teacher -> student divergences computed in token and vocabulary chunks straight from hidden states.

Memory behaviour: neither the student's nor the teacher's full logits ([N, V]) ever exist. For each chunk
of `chunk_tokens` supervised tokens and `vocab_chunk` vocabulary rows, the logits [C, V_c] of both models
are recomputed from the hidden states and the lm_head weights, three times (log-normalisers, divergence,
gradient), so the peak extra memory is a few [C, V_c] float32 blocks plus the gradient of the hidden
states [N, H] (and of the lm_head weight when it is trained). The gradient is computed during the forward
(Liger's fused-linear idea) and only scaled in `backward`; the cost is three lm_head matmuls per direction
instead of one, unless `vocab_chunk` covers the whole vocabulary: then each token chunk's logits are
computed once and shared by the passes (a few [C, V] float32 blocks, bounded by `chunk_tokens`).

Conventions (nats, per supervised token, softened by temperature T: p = softmax(z / T)):
* ``forward_kl``: KL(p_teacher || p_student), mass-covering, the default (G-KV's distillation loss);
* ``reverse_kl``: KL(p_student || p_teacher), mode-seeking (what DMS computes);
* ``jsd``: beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) with m = beta * p_t + (1 - beta) * p_s, 0 < beta < 1;
  jsd / beta -> forward KL as beta -> 0 and jsd / (1 - beta) -> reverse KL as beta -> 1.
The divergence is multiplied by T^2 (Hinton et al.) so that gradient magnitudes do not shrink with T.
An optional cross-entropy of the real next token (at temperature 1) is added with weight `ce_weight`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class LossSpec:
    """What is minimised and how it is chunked (see the module docstring)."""

    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 0.0
    chunk_tokens: int = 256
    vocab_chunk: int = 8192

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r}: choose one of {DIVERGENCES}")
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta={self.beta}: the jsd interpolation weight must be in (0, 1)")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.ce_weight < 0.0:
            raise ValueError(f"ce_weight={self.ce_weight} must be >= 0")
        for name in ("chunk_tokens", "vocab_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass
class LossParts:
    """The scalar to minimise and its detached components (means over supervised tokens)."""

    loss: Tensor
    divergence: Tensor
    ce: Tensor


def distillation_loss(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    targets: Tensor,
    spec: LossSpec,
) -> LossParts:
    """Mean over N supervised tokens of ``T^2 * D(p_t, p_s) + ce_weight * CE(target)``.

    student_hidden / teacher_hidden: [N, H_s] / [N, H_t], final (normed) hidden states at positions whose
    next token is supervised; student_head / teacher_head: lm_head weights [V, H_s] / [V, H_t] (may be the
    same tensor); targets: [N] next-token ids (only read when ce_weight > 0). Gradients flow to
    student_hidden and, if it requires grad, student_head; never to the teacher.
    """
    n = student_hidden.shape[0]
    if teacher_hidden.shape[0] != n or targets.shape != (n,):
        raise ValueError(
            f"token counts differ: student {tuple(student_hidden.shape)}, teacher {tuple(teacher_hidden.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(f"vocabularies differ: student {student_head.shape[0]}, teacher {teacher_head.shape[0]}")
    if n == 0:
        zero = student_hidden.sum() * 0.0  # keeps the graph connected (DDP expects every step to backprop)
        return LossParts(zero, zero.detach(), zero.detach())
    total, div, ce = _ChunkedDistillation.apply(
        student_hidden, student_head, teacher_hidden.detach(), teacher_head.detach(), targets, spec
    )
    return LossParts(total / n, div / n, ce / n)


class _ChunkedDistillation(torch.autograd.Function):
    """Sums over tokens; gradients are computed in `forward` chunk by chunk and scaled in `backward`."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, targets, spec: LossSpec):  # type: ignore[override]
        need_w = ctx.needs_input_grad[1]
        grad_h = torch.zeros(hs.shape, dtype=torch.float32, device=hs.device)
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need_w else None
        total_div = torch.zeros((), dtype=torch.float32, device=hs.device)
        total_ce = torch.zeros((), dtype=torch.float32, device=hs.device)
        for r0 in range(0, hs.shape[0], spec.chunk_tokens):
            rows = slice(r0, r0 + spec.chunk_tokens)
            div, ce = _chunk(hs[rows], ws, ht[rows], wt, targets[rows], spec, grad_h[rows], grad_w)
            total_div += div
            total_ce += ce
        ctx.save_for_backward(grad_h, grad_w if need_w else torch.empty(0))
        ctx.dtypes = (hs.dtype, ws.dtype)
        ctx.mark_non_differentiable(total_div, total_ce)
        total = spec.temperature**2 * total_div + spec.ce_weight * total_ce
        return total, total_div, total_ce

    @staticmethod
    def backward(ctx, grad_total, _grad_div, _grad_ce):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        dh = (grad_h * grad_total).to(h_dtype)
        dw = (grad_w * grad_total).to(w_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None


def _vocab_slices(vocab: int, size: int) -> list[slice]:
    return [slice(v0, min(v0 + size, vocab)) for v0 in range(0, vocab, size)]


def _chunk(
    hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, targets: Tensor, spec: LossSpec, grad_h: Tensor, grad_w: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One token chunk [C]: returns (sum of D, sum of CE) and adds d(T^2 D + w CE)/d(hs, ws) into grad_h/grad_w."""
    t = spec.temperature
    hs32, ht32 = hs.float(), ht.float()
    slices = _vocab_slices(ws.shape[0], spec.vocab_chunk)

    def once_if_single(fn):
        """With a single vocabulary chunk its tensors are held anyway: the passes share one computation."""
        memo: list = []

        def shared(v: slice):
            if memo:
                return memo[0]
            out = fn(v)
            if len(slices) == 1:
                memo.append(out)
            return out

        return shared

    @once_if_single
    def logits(v: slice) -> tuple[Tensor, Tensor]:
        return hs32 @ ws[v].float().T, ht32 @ wt[v].float().T  # raw student / teacher logits [C, V_c]

    @once_if_single
    def terms(v: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        zs, zt = logits(v)
        return zs, *_divergence_terms(zs / t - lse_s[:, None], zt / t - lse_t[:, None], spec)

    # Pass 1: log-normalisers over the whole vocabulary, accumulated chunk by chunk.
    lse_s = lse_t = lse_1 = None
    for v in slices:
        zs, zt = logits(v)
        lse_s = _logaddexp(lse_s, torch.logsumexp(zs / t, dim=-1))
        lse_t = _logaddexp(lse_t, torch.logsumexp(zt / t, dim=-1))
        if spec.ce_weight > 0.0:
            lse_1 = _logaddexp(lse_1, torch.logsumexp(zs, dim=-1))

    # Pass 2: the divergence, and <p_s, q> where q = p_s * dD/dp_s (needed by the softmax Jacobian).
    div = torch.zeros(hs.shape[0], dtype=torch.float32, device=hs.device)
    q_sum = torch.zeros_like(div)
    for v in slices:
        _, d, q, _ = terms(v)
        div += d.sum(-1)
        q_sum += q.sum(-1)

    # Pass 3: dL/dz_raw = T^2 * (1/T) * (q - p_s * sum q)  [+ ce_weight * (softmax(z) - onehot)].
    for v in slices:
        zs, _, q, log_ps = terms(v)
        dz = t * (q - log_ps.exp() * q_sum[:, None])
        if spec.ce_weight > 0.0:
            dz += spec.ce_weight * (zs - lse_1[:, None]).exp()
        grad_h += dz @ ws[v].float()
        if grad_w is not None:
            grad_w[v] += dz.T @ hs32

    ce = torch.zeros((), dtype=torch.float32, device=hs.device)
    if spec.ce_weight > 0.0:
        target_logit = (hs32 * ws[targets].float()).sum(-1)
        ce = (lse_1 - target_logit).sum()
        grad_h -= spec.ce_weight * ws[targets].float()
        if grad_w is not None:
            grad_w.index_add_(0, targets, -spec.ce_weight * hs32)
    return div.sum(), ce


def _divergence_terms(log_ps: Tensor, log_pt: Tensor, spec: LossSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Per-entry divergence d, q = p_s * dD/dp_s (both [C, V_c]) and log p_s, from log-probabilities."""
    ps, pt = log_ps.exp(), log_pt.exp()
    if spec.divergence == "forward_kl":
        return pt * (log_pt - log_ps), -pt, log_ps
    if spec.divergence == "reverse_kl":
        return ps * (log_ps - log_pt), ps * (log_ps - log_pt + 1.0), log_ps
    beta = spec.beta
    log_m = torch.logaddexp(math.log(beta) + log_pt, math.log1p(-beta) + log_ps)
    d = beta * pt * (log_pt - log_m) + (1.0 - beta) * ps * (log_ps - log_m)
    # dD/dp_s = (1 - beta) * log(p_s / m): the terms from differentiating m cancel entry by entry.
    return d, (1.0 - beta) * ps * (log_ps - log_m), log_ps


def _logaddexp(acc: Tensor | None, new: Tensor) -> Tensor:
    return new if acc is None else torch.logaddexp(acc, new)
