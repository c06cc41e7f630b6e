"""Split-K (flash-decoding) attention of one new query per head over a dense or TaDA-packed KV cache.

Kernels:
* ``_decode_split_kernel``: grid (b * h_kv, splits). One program takes a whole GQA group (its ``g`` query
  heads stacked as the rows of a ``tl.dot``) over one contiguous split of the keys, so each K/V byte is read
  once per group. Packed operands are dequantised in registers (``mean - codes * scale - zero``). It writes
  the split's running max ``m``, sum ``l`` and unnormalised output ``acc``; with key scores it also writes the
  logits (``4 * g`` bytes per key, far below the K/V bytes it read) so that K is never read a second time.
* ``_decode_combine_kernel``: grid (b * h_kv,). Merges the splits into the output and the log-normaliser.
* ``_key_scores_kernel``: grid (b * h_kv, key blocks). ``sum_g exp(logit - lse_g)`` from the stored logits.

The math is float32 throughout (decode is bandwidth-bound, so the upcast costs nothing that matters).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvtrain.kernels.dispatch import padded, use_triton
from kvtrain.kernels.formats import MeanCentredKV
from kvtrain.kernels.reference import decode_attention_reference

KV_FORMATS = ("dense", "tada")
# Programs the split heuristic aims for: a few waves on a ~100-SM GPU.
_TARGET_PROGRAMS = 256


@triton.jit
def _load_kv_block(
    X, MEAN, SCALE, ZERO, b, h, offs_n, mask_n, offs_d,
    sx_b, sx_h, sx_n, sm_b, sm_n, ss_b, ss_h, ss_n,
    D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
):
    """A [BLOCK_N, D_PAD] float32 tile of keys or values; BITS == 0 means dense."""
    mask = mask_n[:, None] & (offs_d[None, :] < D)
    if BITS == 0:
        x = tl.load(X + b * sx_b + h * sx_h + offs_n[:, None] * sx_n + offs_d[None, :], mask=mask, other=0.0)
        return x.to(tl.float32)
    per_byte: tl.constexpr = 8 // BITS
    byte = tl.load(X + b * sx_b + h * sx_h + offs_n[:, None] * sx_n + (offs_d // per_byte)[None, :], mask=mask, other=0)
    code = (byte.to(tl.int32) >> ((offs_d % per_byte) * BITS)[None, :]) & ((1 << BITS) - 1)
    group_off = offs_n[:, None] * ss_n + (offs_d // GROUP)[None, :]
    scale = tl.load(SCALE + b * ss_b + h * ss_h + group_off, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(ZERO + b * ss_b + h * ss_h + group_off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + b * sm_b + offs_n[:, None] * sm_n + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    return mean - (code.to(tl.float32) * scale + zero)


@triton.jit
def _decode_split_kernel(
    Q, K, KM, KS, KZ, V, VM, VS, VZ, BIAS, M_OUT, L_OUT, ACC_OUT, LOGITS,
    n_keys, split_len, num_splits, scaling,
    sk_b, sk_h, sk_n, skm_b, skm_n, sks_b, sks_h, sks_n,
    sv_b, sv_h, sv_n, svm_b, svm_n, svs_b, svs_h, svs_n,
    H_KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
    DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    K_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_LOGITS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)  # b * H_KV + h
    split = tl.program_id(1)
    b = row // H_KV
    h = row % H_KV
    offs_g = tl.arange(0, G_PAD)
    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q_mask = (offs_g[:, None] < G) & (offs_dk[None, :] < DK)
    # q is contiguous [b, h_q, DK] and query head h * G + g belongs to KV head h.
    q = tl.load(Q + (row * G + offs_g[:, None]) * DK + offs_dk[None, :], mask=q_mask, other=0.0).to(tl.float32)

    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, DV_PAD), tl.float32)
    begin = split * split_len
    end = tl.minimum(begin + split_len, n_keys)
    for start in range(begin, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        k = _load_kv_block(K, KM, KS, KZ, b, h, offs_n, mask_n, offs_dk, sk_b, sk_h, sk_n, skm_b, skm_n,
                           sks_b, sks_h, sks_n, DK, K_BITS, K_GROUP)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
        if HAS_BIAS:
            bias = tl.load(BIAS + row * n_keys + offs_n, mask=mask_n, other=float("-inf"))
            s = s + bias[None, :]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        if STORE_LOGITS:
            tl.store(LOGITS + (row * G + offs_g[:, None]) * n_keys + offs_n[None, :], s,
                     mask=(offs_g[:, None] < G) & mask_n[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row whose keys so far are all empty keeps max -inf; shifting by 0 then avoids exp(-inf + inf).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_shift[:, None])
        alpha = tl.exp(m_i - m_shift)
        v = _load_kv_block(V, VM, VS, VZ, b, h, offs_n, mask_n, offs_dv, sv_b, sv_h, sv_n, svm_b, svm_n,
                           svs_b, svs_h, svs_n, DV, V_BITS, V_GROUP)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    part = row * num_splits + split
    tl.store(M_OUT + part * G_PAD + offs_g, m_i)
    tl.store(L_OUT + part * G_PAD + offs_g, l_i)
    tl.store(ACC_OUT + (part * G_PAD + offs_g[:, None]) * DV_PAD + offs_dv[None, :], acc)


@triton.jit
def _decode_combine_kernel(
    M_IN, L_IN, ACC_IN, OUT, LSE, num_splits,
    G: tl.constexpr, G_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    offs_g = tl.arange(0, G_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, DV_PAD), tl.float32)
    for split in range(0, num_splits):
        part = row * num_splits + split
        m_s = tl.load(M_IN + part * G_PAD + offs_g)
        l_s = tl.load(L_IN + part * G_PAD + offs_g)
        acc_s = tl.load(ACC_IN + (part * G_PAD + offs_g[:, None]) * DV_PAD + offs_dv[None, :])
        m_new = tl.maximum(m, m_s)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp(m - m_shift)
        c = tl.exp(m_s - m_shift)
        l = l * a + l_s * c
        acc = acc * a[:, None] + acc_s * c[:, None]
        m = m_new
    has_keys = l > 0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l, 1.0)[:, None], 0.0)
    out_mask = (offs_g[:, None] < G) & (offs_dv[None, :] < DV)
    tl.store(OUT + (row * G + offs_g[:, None]) * DV + offs_dv[None, :], out.to(OUT.dtype.element_ty), mask=out_mask)
    # +inf for a group row with no keys makes every exp(logit - lse) exactly 0 downstream.
    lse = tl.where(has_keys, m + tl.log(tl.where(has_keys, l, 1.0)), float("inf"))
    tl.store(LSE + row * G_PAD + offs_g, lse)


@triton.jit
def _key_scores_kernel(
    LOGITS, LSE, SCORES, n_keys,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, G_PAD)
    mask = (offs_g[:, None] < G) & (offs_n[None, :] < n_keys)
    logits = tl.load(LOGITS + (row * G + offs_g[:, None]) * n_keys + offs_n[None, :], mask=mask, other=float("-inf"))
    lse = tl.load(LSE + row * G_PAD + offs_g)
    probs = tl.where(mask, tl.exp(logits - lse[:, None]), 0.0)
    tl.store(SCORES + row * n_keys + offs_n, tl.sum(probs, axis=0), mask=offs_n < n_keys)


def _validate_format(x: Tensor | MeanCentredKV, fmt: str, name: str) -> None:
    if fmt not in KV_FORMATS:
        raise ValueError(f"{name}_format={fmt!r} must be one of {KV_FORMATS}")
    if fmt == "dense":
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: {name}_format='dense' needs a [b, h_kv, n, d] tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name}: dense dtype {x.dtype} is not float16/bfloat16/float32")
        return
    if not isinstance(x, MeanCentredKV):
        raise ValueError(f"{name}: {name}_format='tada' needs a MeanCentredKV, got {type(x).__name__}")
    x.validate(name)


def _operand(x: Tensor | MeanCentredKV, fmt: str, name: str) -> tuple[list, list[int], int, int]:
    """Kernel pointers ``[x, mean, scale, zero]``, strides (b, h, n of x; b, n of mean; b, h, n of scale),
    bits (0 = dense) and group size for one K/V operand."""
    _validate_format(x, fmt, name)
    if isinstance(x, Tensor):
        if x.stride(-1) != 1:
            x = x.contiguous()
        return [x, x, x, x], [x.stride(0), x.stride(1), x.stride(2), 0, 0, 0, 0, 0], 0, 1
    dev = x.deviation
    codes, scale, zero, mean = (t if t.stride(-1) == 1 else t.contiguous() for t in (dev.codes, dev.scale, dev.zero, x.mean))
    if scale.stride() != zero.stride():
        scale, zero = scale.contiguous(), zero.contiguous()
    strides = [codes.stride(0), codes.stride(1), codes.stride(2), mean.stride(0), mean.stride(1),
               scale.stride(0), scale.stride(1), scale.stride(2)]
    return [codes, mean, scale, zero], strides, dev.bits, dev.group_size


def _num_splits(requested: int | None, rows: int, n_keys: int, block_n: int) -> tuple[int, int]:
    """(split length, number of splits): splits cover whole key blocks."""
    blocks = triton.cdiv(n_keys, block_n)
    if requested is None:
        requested = max(1, _TARGET_PROGRAMS // rows)
    elif requested < 1:
        raise ValueError(f"num_splits={requested} must be >= 1")
    split_len = triton.cdiv(blocks, min(requested, blocks)) * block_n
    return split_len, triton.cdiv(n_keys, split_len)


def _decode_triton(
    q: Tensor, k: Tensor | MeanCentredKV, v: Tensor | MeanCentredKV, bias: Tensor | None, scaling: float,
    k_format: str, v_format: str, num_splits: int | None, return_key_scores: bool, block_n: int,
) -> Tensor | tuple[Tensor, Tensor]:
    b, h_q, dk = q.shape
    k_ptrs, k_strides, k_bits, k_group = _operand(k, k_format, "k")
    v_ptrs, v_strides, v_bits, v_group = _operand(v, v_format, "v")
    _, h_kv, n_keys, _ = k.shape
    dv = v.shape[-1]
    group = h_q // h_kv
    g_pad, dk_pad, dv_pad = padded(group), padded(dk), padded(dv)
    rows = b * h_kv
    split_len, splits = _num_splits(num_splits, rows, n_keys, block_n)
    dev = q.device
    q = q.contiguous()
    bias_arg = bias.float().contiguous() if bias is not None else q
    m_part = torch.empty(rows, splits, g_pad, device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(rows, splits, g_pad, dv_pad, device=dev, dtype=torch.float32)
    logits = torch.empty(rows, group, n_keys, device=dev, dtype=torch.float32) if return_key_scores else m_part
    _decode_split_kernel[(rows, splits)](
        q, *k_ptrs, *v_ptrs, bias_arg, m_part, l_part, acc_part, logits,
        n_keys, split_len, splits, scaling, *k_strides, *v_strides,
        H_KV=h_kv, G=group, G_PAD=g_pad, DK=dk, DK_PAD=dk_pad, DV=dv, DV_PAD=dv_pad,
        K_BITS=k_bits, K_GROUP=k_group, V_BITS=v_bits, V_GROUP=v_group,
        HAS_BIAS=bias is not None, STORE_LOGITS=return_key_scores, BLOCK_N=block_n,
    )
    out = torch.empty(b, h_q, dv, device=dev, dtype=q.dtype)
    lse = torch.empty(rows, g_pad, device=dev, dtype=torch.float32)
    _decode_combine_kernel[(rows,)](m_part, l_part, acc_part, out, lse, splits, G=group, G_PAD=g_pad, DV=dv, DV_PAD=dv_pad)
    if not return_key_scores:
        return out
    scores = torch.empty(b, h_kv, n_keys, device=dev, dtype=torch.float32)
    _key_scores_kernel[(rows, triton.cdiv(n_keys, block_n))](logits, lse, scores, n_keys, G=group, G_PAD=g_pad, BLOCK_N=block_n)
    return out, scores


def _check_shapes(q: Tensor, k: Tensor | MeanCentredKV, v: Tensor | MeanCentredKV, bias: Tensor | None) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [b, h_q, dk], got shape {tuple(q.shape)}")
    b, h_q, dk = q.shape
    kb, h_kv, n_keys, kd = k.shape
    vb, vh, vn, _ = v.shape
    if (kb, kd) != (b, dk):
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} (batch, dk)")
    if (vb, vh, vn) != (b, h_kv, n_keys):
        raise ValueError(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)}")
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"h_q={h_q} must be a multiple of h_kv={h_kv}")
    if n_keys == 0:
        raise ValueError("the cache holds no keys (n=0)")
    if bias is not None and tuple(bias.shape) != (b, h_kv, n_keys):
        raise ValueError(f"bias shape {tuple(bias.shape)} != {(b, h_kv, n_keys)}")


def decode_attention(
    q: Tensor,
    k: Tensor | MeanCentredKV,
    v: Tensor | MeanCentredKV,
    *,
    bias: Tensor | None = None,
    scaling: float,
    k_format: str = "dense",
    v_format: str = "dense",
    num_splits: int | None = None,
    return_key_scores: bool = False,
    block_n: int = 64,
    force: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of one query per head over a dense or TaDA-packed cache, GQA-aware.

    q ``[b, h_q, dk]`` (query head j reads KV head ``j // (h_q // h_kv)``); k ``[b, h_kv, n, dk]`` and v
    ``[b, h_kv, n, dv]`` as dense fp16/bf16/fp32 tensors (``*_format="dense"``) or ``MeanCentredKV``
    (``"tada"``); bias ``[b, h_kv, n]`` float, added to the logits (log votes; -inf = empty slot, which is
    also how per-head kept lengths are expressed). ``num_splits`` caps the split-K factor (default: enough
    programs to fill a GPU). Returns out ``[b, h_q, dv]`` in q's dtype and, with ``return_key_scores``,
    key_scores ``[b, h_kv, n]`` float32 (softmax attention summed over the query group). A head whose keys
    are all empty gets a zero output. Which runs, the Triton kernels or the PyTorch
    reference, is the kernel switch's choice (`kvtrain.kernels.dispatch`; ``force`` overrides it for this call).
    """
    _validate_format(k, k_format, "k")
    _validate_format(v, v_format, "v")
    _check_shapes(q, k, v, bias)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n} must be a power of two >= 16")
    if use_triton(force, q.device):
        return _decode_triton(q, k, v, bias, scaling, k_format, v_format, num_splits, return_key_scores, block_n)
    return decode_attention_reference(q, k, v, bias, scaling, return_key_scores)
