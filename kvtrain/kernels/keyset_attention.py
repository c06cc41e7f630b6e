"""Training attention over replayed keep-sets: each query row sees its event's kept entries plus a causal block.

Row i in interval e (rows ``[starts[e], starts[e+1])``) attends the K kept entries of event e (with an additive
bias: 0 or log votes, -inf = empty slot) and the local keys ``starts[e] <= j <= i`` (minus padded keys).
FlashAttention-2 structure, never an S x S mask:
* ``_keyset_fwd_kernel``, grid (query blocks, b * h_q): online softmax over the kept entries of every event
  the block touches (rows of other events masked) then over the local keys; saves the log-sum-exp per row.
* ``_keyset_bwd_dq_kernel``, same grid: recomputes P from the saved log-sum-exp and accumulates dQ.
* ``_keyset_bwd_local_dkdv_kernel``, grid (key blocks, b * h_kv): dK/dV of local keys, looping over the query
  rows that can see them (from the key up to the end of its interval) and over the query heads of the group.
* ``_keyset_bwd_kept_dkdv_kernel``, grid (events x kept blocks, b * h_kv): dK/dV of kept entries, over the
  rows of their event.
Every gradient element is owned by one program, so no atomics. Extra memory: log-sum-exp and
``delta = rowsum(dO * O)``, both ``[b, h_q, S]`` float32.

Precision: float32 inputs use IEEE float32 dots. Half inputs use half dots with float32 accumulation on a GPU
(P and dS are rounded to the input dtype first, as FlashAttention does); on CPU (the Triton interpreter, which
mishandles bf16 arithmetic) every tile is upcast to float32 right after loading.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvtrain.kernels.dispatch import padded, use_triton
from kvtrain.kernels.reference import interval_bounds, keyset_attention_reference


@triton.jit
def _tile(ptr, offs_r, mask_r, stride_r, offs_d, D: tl.constexpr, UPCAST: tl.constexpr):
    """A [rows, D_PAD] tile with unit stride along d."""
    x = tl.load(ptr + offs_r[:, None] * stride_r + offs_d[None, :], mask=mask_r[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _online_update(m_i, l_i, acc, s, v, UPCAST: tl.constexpr):
    """One online-softmax step over logits ``s`` [M, N] (-inf = masked) and values ``v`` [N, D]."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Rows that have seen only masked keys keep max -inf; shifting them by 0 avoids exp(-inf + inf).
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_shift[:, None])
    alpha = tl.exp(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if UPCAST:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _scores(a, b, UPCAST: tl.constexpr):
    """a @ b^T in float32."""
    if UPCAST:
        return tl.dot(a, tl.trans(b), input_precision="ieee")
    return tl.dot(a, tl.trans(b))


@triton.jit
def _matmul(a, b, UPCAST: tl.constexpr):
    """a @ b in float32, rounding a (probabilities or their gradients) to b's dtype for half dots."""
    if UPCAST:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _keyset_fwd_kernel(
    Q, K, V, KK, KV, KB, PAD, ROW_EVENT, ROW_START, O, LSE,
    seq_len, kept, scaling,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, skk_e, skk_b, skk_h, skk_k, skb_e, skb_b, skb_h,
    H_Q: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    hk = h // G
    m0 = tl.program_id(0) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seq_len
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    q = _tile(Q + b * sq_b + h * sq_h, offs_m, mask_m, sq_s, offs_d, D, UPCAST)
    row_event = tl.load(ROW_EVENT + offs_m, mask=mask_m, other=-1)
    row_start = tl.load(ROW_START + offs_m, mask=mask_m, other=seq_len)
    m_hi = tl.minimum(m0 + BLOCK_M, seq_len)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for e in range(tl.load(ROW_EVENT + m0), tl.load(ROW_EVENT + m_hi - 1) + 1):
        kk_base = e * skk_e + b * skk_b + hk * skk_h
        for k0 in range(0, kept, BLOCK_N):
            mask_k = k0 + offs_n < kept
            kk = _tile(KK + kk_base, k0 + offs_n, mask_k, skk_k, offs_d, D, UPCAST)
            kv = _tile(KV + kk_base, k0 + offs_n, mask_k, skk_k, offs_d, D, UPCAST)
            bias = tl.load(KB + e * skb_e + b * skb_b + hk * skb_h + k0 + offs_n, mask=mask_k, other=float("-inf"))
            s = _scores(q, kk, UPCAST) * scaling + bias[None, :]
            s = tl.where(row_event[:, None] == e, s, float("-inf"))
            m_i, l_i, acc = _online_update(m_i, l_i, acc, s, kv, UPCAST)
    kv_base = b * sk_b + hk * sk_h
    for n0 in range(tl.load(ROW_START + m0), m_hi, BLOCK_N):
        cols = n0 + offs_n
        mask_n = cols < m_hi
        if HAS_PAD:
            mask_n = mask_n & (tl.load(PAD + b * seq_len + cols, mask=mask_n, other=0) != 0)
        k = _tile(K + kv_base, cols, mask_n, sk_s, offs_d, D, UPCAST)
        v = _tile(V + kv_base, cols, mask_n, sk_s, offs_d, D, UPCAST)
        valid = mask_n[None, :] & (cols[None, :] <= offs_m[:, None]) & (cols[None, :] >= row_start[:, None])
        s = tl.where(valid, _scores(q, k, UPCAST) * scaling, float("-inf"))
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, v, UPCAST)

    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = tl.where(has_keys[:, None], acc / l_safe[:, None], 0.0)
    tl.store(O + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mask_m[:, None] & (offs_d[None, :] < D))
    # +inf for rows with nothing to attend makes the recomputed P exactly 0 in the backward.
    lse = tl.where(has_keys, m_i + tl.log(l_safe), float("inf"))
    tl.store(LSE + pid_bh * seq_len + offs_m, lse, mask=mask_m)


@triton.jit
def _keyset_bwd_dq_kernel(
    Q, K, V, KK, KV, KB, PAD, ROW_EVENT, ROW_START, DO, LSE, DELTA, DQ,
    seq_len, kept, scaling,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, skk_e, skk_b, skk_h, skk_k, skb_e, skb_b, skb_h,
    H_Q: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    hk = h // G
    m0 = tl.program_id(0) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seq_len
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    q = _tile(Q + b * sq_b + h * sq_h, offs_m, mask_m, sq_s, offs_d, D, UPCAST)
    do = _tile(DO + b * sq_b + h * sq_h, offs_m, mask_m, sq_s, offs_d, D, UPCAST)
    lse = tl.load(LSE + pid_bh * seq_len + offs_m, mask=mask_m, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * seq_len + offs_m, mask=mask_m, other=0.0)
    row_event = tl.load(ROW_EVENT + offs_m, mask=mask_m, other=-1)
    row_start = tl.load(ROW_START + offs_m, mask=mask_m, other=seq_len)
    m_hi = tl.minimum(m0 + BLOCK_M, seq_len)

    dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for e in range(tl.load(ROW_EVENT + m0), tl.load(ROW_EVENT + m_hi - 1) + 1):
        kk_base = e * skk_e + b * skk_b + hk * skk_h
        for k0 in range(0, kept, BLOCK_N):
            mask_k = k0 + offs_n < kept
            kk = _tile(KK + kk_base, k0 + offs_n, mask_k, skk_k, offs_d, D, UPCAST)
            kv = _tile(KV + kk_base, k0 + offs_n, mask_k, skk_k, offs_d, D, UPCAST)
            bias = tl.load(KB + e * skb_e + b * skb_b + hk * skb_h + k0 + offs_n, mask=mask_k, other=float("-inf"))
            s = _scores(q, kk, UPCAST) * scaling + bias[None, :]
            p = tl.where(row_event[:, None] == e, tl.exp(s - lse[:, None]), 0.0)
            ds = p * (_scores(do, kv, UPCAST) - delta[:, None])
            dq += _matmul(ds, kk, UPCAST)
    kv_base = b * sk_b + hk * sk_h
    for n0 in range(tl.load(ROW_START + m0), m_hi, BLOCK_N):
        cols = n0 + offs_n
        mask_n = cols < m_hi
        if HAS_PAD:
            mask_n = mask_n & (tl.load(PAD + b * seq_len + cols, mask=mask_n, other=0) != 0)
        k = _tile(K + kv_base, cols, mask_n, sk_s, offs_d, D, UPCAST)
        v = _tile(V + kv_base, cols, mask_n, sk_s, offs_d, D, UPCAST)
        valid = mask_n[None, :] & (cols[None, :] <= offs_m[:, None]) & (cols[None, :] >= row_start[:, None])
        p = tl.where(valid, tl.exp(_scores(q, k, UPCAST) * scaling - lse[:, None]), 0.0)
        ds = p * (_scores(do, v, UPCAST) - delta[:, None])
        dq += _matmul(ds, k, UPCAST)
    tl.store(DQ + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :], (dq * scaling).to(DQ.dtype.element_ty),
             mask=mask_m[:, None] & (offs_d[None, :] < D))


@triton.jit
def _keyset_bwd_local_dkdv_kernel(
    Q, K, V, PAD, ROW_START, ROW_END, DO, LSE, DELTA, DK, DV,
    seq_len, scaling,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s,
    H_KV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    n0 = tl.program_id(0) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    mask_n = cols < seq_len
    if HAS_PAD:
        mask_n = mask_n & (tl.load(PAD + b * seq_len + cols, mask=mask_n, other=0) != 0)
    offs_d = tl.arange(0, D_PAD)
    offs_m = tl.arange(0, BLOCK_M)
    kv_base = b * sk_b + hk * sk_h
    k = _tile(K + kv_base, cols, mask_n, sk_s, offs_d, D, UPCAST)
    v = _tile(V + kv_base, cols, mask_n, sk_s, offs_d, D, UPCAST)
    # Rows that can see this block: from its first key to the end of the last key's interval.
    rows_hi = tl.load(ROW_END + tl.minimum(n0 + BLOCK_N, seq_len) - 1)
    dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    for g in range(0, G):
        h = hk * G + g
        q_base = b * sq_b + h * sq_h
        stat_base = (b * H_KV * G + h) * seq_len
        for m0 in range(n0, rows_hi, BLOCK_M):
            rows = m0 + offs_m
            mask_m = rows < rows_hi
            q = _tile(Q + q_base, rows, mask_m, sq_s, offs_d, D, UPCAST)
            do = _tile(DO + q_base, rows, mask_m, sq_s, offs_d, D, UPCAST)
            lse = tl.load(LSE + stat_base + rows, mask=mask_m, other=float("inf"))
            delta = tl.load(DELTA + stat_base + rows, mask=mask_m, other=0.0)
            row_start = tl.load(ROW_START + rows, mask=mask_m, other=seq_len)
            valid = mask_n[None, :] & (cols[None, :] <= rows[:, None]) & (cols[None, :] >= row_start[:, None])
            p = tl.where(valid, tl.exp(_scores(q, k, UPCAST) * scaling - lse[:, None]), 0.0)
            dv += _matmul(tl.trans(p), do, UPCAST)
            ds = p * (_scores(do, v, UPCAST) - delta[:, None])
            dk += _matmul(tl.trans(ds), q, UPCAST)
    out_off = kv_base + cols[:, None] * sk_s + offs_d[None, :]
    out_mask = (cols < seq_len)[:, None] & (offs_d[None, :] < D)
    tl.store(DK + out_off, (dk * scaling).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _keyset_bwd_kept_dkdv_kernel(
    Q, KK, KV, KB, EV_START, EV_END, DO, LSE, DELTA, DKK, DKV,
    seq_len, kept, scaling,
    sq_b, sq_h, sq_s, skk_e, skk_b, skk_h, skk_k, skb_e, skb_b, skb_h,
    H_KV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    blocks_per_event = tl.cdiv(kept, BLOCK_N)
    e = tl.program_id(0) // blocks_per_event
    slots = (tl.program_id(0) % blocks_per_event) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = slots < kept
    offs_d = tl.arange(0, D_PAD)
    offs_m = tl.arange(0, BLOCK_M)
    kk_base = e * skk_e + b * skk_b + hk * skk_h
    kk = _tile(KK + kk_base, slots, mask_k, skk_k, offs_d, D, UPCAST)
    kv = _tile(KV + kk_base, slots, mask_k, skk_k, offs_d, D, UPCAST)
    bias = tl.load(KB + e * skb_e + b * skb_b + hk * skb_h + slots, mask=mask_k, other=float("-inf"))
    rows_lo = tl.load(EV_START + e)
    rows_hi = tl.load(EV_END + e)
    dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    for g in range(0, G):
        h = hk * G + g
        q_base = b * sq_b + h * sq_h
        stat_base = (b * H_KV * G + h) * seq_len
        for m0 in range(rows_lo, rows_hi, BLOCK_M):
            rows = m0 + offs_m
            mask_m = rows < rows_hi
            q = _tile(Q + q_base, rows, mask_m, sq_s, offs_d, D, UPCAST)
            do = _tile(DO + q_base, rows, mask_m, sq_s, offs_d, D, UPCAST)
            lse = tl.load(LSE + stat_base + rows, mask=mask_m, other=float("inf"))
            delta = tl.load(DELTA + stat_base + rows, mask=mask_m, other=0.0)
            s = _scores(q, kk, UPCAST) * scaling + bias[None, :]
            p = tl.where(mask_m[:, None], tl.exp(s - lse[:, None]), 0.0)
            dv += _matmul(tl.trans(p), do, UPCAST)
            ds = p * (_scores(do, kv, UPCAST) - delta[:, None])
            dk += _matmul(tl.trans(ds), q, UPCAST)
    out_off = kk_base + slots[:, None] * skk_k + offs_d[None, :]
    out_mask = mask_k[:, None] & (offs_d[None, :] < D)
    tl.store(DKK + out_off, (dk * scaling).to(DKK.dtype.element_ty), mask=out_mask)
    tl.store(DKV + out_off, dv.to(DKV.dtype.element_ty), mask=out_mask)


def _row_tables(starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """int32 per-row event, start and end of the row's interval, and per-event start/end (all on device)."""
    ev_start = starts.to(torch.int64)
    ev_end = torch.cat([ev_start[1:], ev_start.new_full((1,), seq_len)])
    rows = torch.arange(seq_len, device=starts.device)
    # The last event starting at or before the row (empty intervals repeat a start and are skipped).
    row_event = torch.searchsorted(ev_start, rows, right=True) - 1
    tables = (row_event, ev_start[row_event], ev_end[row_event], ev_start, ev_end)
    return tuple(t.to(torch.int32).contiguous() for t in tables)  # type: ignore[return-value]


class KeysetAttentionFunction(torch.autograd.Function):
    """out = softmax over (kept entries of the row's event + causal local block) of q k^T * scaling + bias, @ v.

    Gradients flow to q, k, v, kept_k and kept_v; kept_bias, the tables and key_padding are constants.
    """

    @staticmethod
    def forward(ctx, q, k, v, kept_k, kept_v, kept_bias, tables, key_padding, scaling, block_m, block_n):  # noqa: ANN001, ANN205
        q, k, v, kept_k, kept_v = (t.contiguous() for t in (q, k, v, kept_k, kept_v))
        kept_bias = kept_bias.float().contiguous()
        b, h_q, seq_len, d = q.shape
        h_kv = k.shape[1]
        row_event, row_start, row_end, ev_start, ev_end = tables
        pad = key_padding.to(torch.int8).contiguous() if key_padding is not None else row_event
        out = torch.empty_like(q)
        lse = torch.empty(b, h_q, seq_len, device=q.device, dtype=torch.float32)
        meta = dict(G=h_q // h_kv, D=d, D_PAD=padded(d), BLOCK_M=block_m, BLOCK_N=block_n,
                    HAS_PAD=key_padding is not None, UPCAST=q.dtype == torch.float32 or q.device.type != "cuda")
        _keyset_fwd_kernel[(triton.cdiv(seq_len, block_m), b * h_q)](
            q, k, v, kept_k, kept_v, kept_bias, pad, row_event, row_start, out, lse,
            seq_len, kept_k.shape[3], scaling, *_qk_strides(q, k, kept_k, kept_bias), H_Q=h_q, **meta,
        )
        ctx.save_for_backward(q, k, v, kept_k, kept_v, kept_bias, pad, *tables, out, lse)
        ctx.scaling = scaling
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, kept_k, kept_v, kept_bias, pad, row_event, row_start, row_end, ev_start, ev_end, out, lse = ctx.saved_tensors
        meta = ctx.meta
        b, h_q, seq_len, _ = q.shape
        h_kv, n_events, kept = k.shape[1], kept_k.shape[0], kept_k.shape[3]
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(dim=-1)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dkk, dkv = torch.empty_like(kept_k), torch.empty_like(kept_v)
        strides = _qk_strides(q, k, kept_k, kept_bias)
        _keyset_bwd_dq_kernel[(triton.cdiv(seq_len, meta["BLOCK_M"]), b * h_q)](
            q, k, v, kept_k, kept_v, kept_bias, pad, row_event, row_start, grad_out, lse, delta, dq,
            seq_len, kept, ctx.scaling, *strides, H_Q=h_q, **meta,
        )
        _keyset_bwd_local_dkdv_kernel[(triton.cdiv(seq_len, meta["BLOCK_N"]), b * h_kv)](
            q, k, v, pad, row_start, row_end, grad_out, lse, delta, dk, dv,
            seq_len, ctx.scaling, *strides[:6], H_KV=h_kv, **meta,
        )
        if kept > 0:
            kept_meta = {key: val for key, val in meta.items() if key != "HAS_PAD"}
            _keyset_bwd_kept_dkdv_kernel[(n_events * triton.cdiv(kept, meta["BLOCK_N"]), b * h_kv)](
                q, kept_k, kept_v, kept_bias, ev_start, ev_end, grad_out, lse, delta, dkk, dkv,
                seq_len, kept, ctx.scaling, *strides[:3], *strides[6:], H_KV=h_kv, **kept_meta,
            )
        else:
            dkk.zero_()
            dkv.zero_()
        return dq, dk, dv, dkk, dkv, None, None, None, None, None, None


def _qk_strides(q: Tensor, k: Tensor, kept_k: Tensor, kept_bias: Tensor) -> list[int]:
    """Strides of the contiguous q/out/dO, k/v and kept tensors, in the kernels' argument order."""
    return [*q.stride()[:3], *k.stride()[:3], *kept_k.stride()[:4], *kept_bias.stride()[:3]]


def _check_inputs(
    q: Tensor, k: Tensor, v: Tensor, kept_k: Tensor, kept_v: Tensor, kept_bias: Tensor, n_events: int,
    key_padding: Tensor | None,
) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [b, h_q, S, d], got shape {tuple(q.shape)}")
    b, h_q, seq_len, d = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[2:] != (seq_len, d):
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    h_kv = k.shape[1]
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"h_q={h_q} must be a multiple of h_kv={h_kv}")
    if kept_k.dim() != 5 or kept_k.shape[:3] != (n_events, b, h_kv) or kept_k.shape[4] != d:
        raise ValueError(f"kept_k shape {tuple(kept_k.shape)} must be [E={n_events}, b={b}, h_kv={h_kv}, K, d={d}]")
    if kept_v.shape != kept_k.shape:
        raise ValueError(f"kept_v shape {tuple(kept_v.shape)} != kept_k shape {tuple(kept_k.shape)}")
    if kept_bias.shape != kept_k.shape[:4]:
        raise ValueError(f"kept_bias shape {tuple(kept_bias.shape)} != {tuple(kept_k.shape[:4])}")
    if kept_bias.requires_grad:
        raise ValueError("kept_bias requires grad, but keyset_attention treats it as a constant")
    if key_padding is not None and (key_padding.dtype != torch.bool or key_padding.shape != (b, seq_len)):
        raise ValueError(f"key_padding must be a bool [b={b}, S={seq_len}] tensor, got {key_padding.dtype} {tuple(key_padding.shape)}")


def keyset_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kept_k: Tensor,
    kept_v: Tensor,
    kept_bias: Tensor,
    starts: Sequence[int] | Tensor,
    scaling: float,
    *,
    key_padding: Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    force: str | None = None,
) -> Tensor:
    """Attention over replayed keep-sets plus a causal local block, differentiable (FlashAttention-2 style).

    q ``[b, h_q, S, d]``; k, v ``[b, h_kv, S, d]``; kept_k, kept_v ``[E, b, h_kv, K, d]``; kept_bias
    ``[E, b, h_kv, K]`` (0 or log votes, -inf = empty slot; not differentiated); starts: E interval starts
    (list or LongTensor, ``starts[0] == 0``, non-decreasing): interval e covers rows ``[starts[e],
    starts[e+1])``, the last ends at S. Row i of interval e attends the kept entries of e and the keys
    ``starts[e] <= j <= i`` with ``key_padding[b, j]`` True (default: all). Rows with nothing to attend give
    zeros. Returns ``[b, h_q, S, d]``. Which runs, the Triton kernels or the PyTorch
    reference, is the kernel switch's choice (`kvtrain.kernels.dispatch`; ``force`` overrides it for this call).
    """
    starts_t = starts if isinstance(starts, Tensor) else torch.tensor(list(starts), dtype=torch.int64)
    if starts_t.dim() != 1:
        raise ValueError(f"starts must be one-dimensional, got shape {tuple(starts_t.shape)}")
    _check_inputs(q, k, v, kept_k, kept_v, kept_bias, starts_t.shape[0], key_padding)
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name}={block} must be a power of two >= 16")
    if not use_triton(force, q.device):
        return keyset_attention_reference(q, k, v, kept_k, kept_v, kept_bias, starts, scaling, key_padding)
    if starts_t.device.type == "cpu":
        interval_bounds(starts_t, q.shape[2])  # validated on the host only where that costs no device sync
    tables = _row_tables(starts_t.to(q.device), q.shape[2])
    return KeysetAttentionFunction.apply(q, k, v, kept_k, kept_v, kept_bias, tables, key_padding, scaling, block_m, block_n)
