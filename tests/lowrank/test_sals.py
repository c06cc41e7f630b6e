"""SALS: RoPE against a per-pair rotation loop, latent scores against head-summed dot products, and the
decode step at full rank / all tokens against exact attention computed by explicit loops."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvtrain.lowrank.gram import JointKeyGramAccumulator
from kvtrain.lowrank.sals import (
    compress_keys,
    fit_sals_basis,
    latent_queries,
    latent_scores,
    sals_decode_attention,
    select_tokens,
)
from kvtrain.models.rope import apply_rope, rope_cos_sin

H_KV, G, D, THETA = 2, 2, 4, 500.0


def _rope_loop(x: torch.Tensor, pos: int) -> torch.Tensor:
    """Reference for one vector: channel pair (i, i + d/2) rotated by pos * theta^(-2i/d)."""
    half = x.shape[-1] // 2
    out = x.clone()
    for i in range(half):
        angle = pos * THETA ** (-2 * i / x.shape[-1])
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def test_apply_rope_matches_pair_rotation_and_hf():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, H_KV, 5, D, generator=gen, dtype=torch.float64)
    positions = torch.randint(0, 1000, (2, 5), generator=gen)
    cos, sin = rope_cos_sin(positions, D, THETA)
    out = apply_rope(x, cos, sin)
    for bi in range(2):
        for h in range(H_KV):
            for t in range(5):
                torch.testing.assert_close(out[bi, h, t], _rope_loop(x[bi, h, t], int(positions[bi, t])))
    hf, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(out, hf)


def _fit(keys: torch.Tensor, rank: int):
    acc = JointKeyGramAccumulator(H_KV, D, layer_idx=3)
    acc.update(keys)
    return fit_sals_basis(acc, rank)


def test_joint_basis_spectrum_and_joint_beats_per_head():
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(H_KV * D, H_KV * D, generator=gen, dtype=torch.float64)
    joint = torch.randn(60, H_KV * D, generator=gen, dtype=torch.float64) @ mix  # correlated heads
    keys = joint.reshape(1, 60, H_KV, D).transpose(1, 2)
    rank = 4
    basis = _fit(keys, rank)
    torch.testing.assert_close(basis.basis.T @ basis.basis, torch.eye(rank, dtype=torch.float64))
    torch.testing.assert_close(basis.eigenvalues, torch.linalg.eigvalsh(joint.T @ joint).flip(0))
    captured = (joint @ basis.basis).pow(2).sum()
    per_head = 0.0  # Lemma 1: block-diagonal projections with the same total rank capture no more energy
    for h in range(H_KV):
        _, _, vh = torch.linalg.svd(joint[:, h * D : (h + 1) * D], full_matrices=False)
        per_head += (joint[:, h * D : (h + 1) * D] @ vh[: rank // H_KV].T).pow(2).sum()
    assert captured >= per_head * (1 - 1e-12)
    with pytest.raises(ValueError, match=r"layer 3: rank=9 must be in \[1, h_kv\*d=8\]"):
        _fit(keys, H_KV * D + 1)


def test_too_few_tokens_for_rank():
    keys = torch.randn(1, H_KV, 2, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer 3: rank=3 exceeds the number of calibration tokens \(2\)"):
        _fit(keys, 3)


def test_full_rank_latent_score_is_group_averaged_head_summed_dot():
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(2, H_KV, 7, D, generator=gen, dtype=torch.float64)
    queries = torch.randn(2, H_KV * G, 3, D, generator=gen, dtype=torch.float64)
    basis = _fit(keys, H_KV * D)
    scores = latent_scores(latent_queries(queries, basis), compress_keys(keys, basis), H_KV * D)
    for bi in range(2):
        for m in range(3):
            for n in range(7):
                ref = sum(queries[bi, j, m] @ keys[bi, j // G, n] for j in range(H_KV * G)) / G
                assert scores[bi, m, n].item() == pytest.approx(ref.item(), abs=1e-10)


def _select_reference(scores: list[float], valid: list[bool], top_k: int, sinks: int, recent: int) -> set[int]:
    idx = [i for i, v in enumerate(valid) if v]
    always = set(idx[:sinks]) | set(idx[len(idx) - recent:] if recent else [])
    rest = sorted((i for i in idx if i not in always), key=lambda i: -scores[i])
    return always | set(rest[:top_k])


def test_select_tokens_matches_reference():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        n = int(torch.randint(1, 15, (1,), generator=gen))
        scores = torch.randn(3, n, generator=gen)
        valid = torch.rand(3, n, generator=gen) > 0.3
        sinks, recent, top_k = (int(x) for x in torch.randint(0, 4, (3,), generator=gen))
        indices, kept = select_tokens(scores, top_k, sinks, recent, valid)
        assert indices.shape[1] == min(n, sinks + recent + top_k)
        for bi in range(3):
            got = {int(i) for i, k in zip(indices[bi], kept[bi]) if k}
            assert got == _select_reference(scores[bi].tolist(), valid[bi].tolist(), top_k, sinks, recent)
            assert indices[bi].tolist() == sorted(indices[bi].tolist())


def test_decode_full_rank_all_tokens_is_exact_attention():
    gen = torch.Generator().manual_seed(4)
    b, n = 2, 9
    keys = torch.randn(b, H_KV, n, D, generator=gen, dtype=torch.float64)
    values = torch.randn(b, H_KV, n, D, generator=gen, dtype=torch.float64)
    query = torch.randn(b, H_KV * G, 1, D, generator=gen, dtype=torch.float64)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :3] = False  # left padding in row 1
    key_pos = (torch.arange(n)[None] - torch.tensor([[0], [3]])).clamp_min(0)
    query_pos = torch.tensor([n, n - 3])
    basis = _fit(keys, H_KV * D)
    scaling = D**-0.5
    out, _, kept = sals_decode_attention(
        query, query_pos, compress_keys(keys, basis), values, key_pos, basis, scaling, top_k=n,
        selection_rank=H_KV * D // 2, rope=partial(rope_cos_sin, head_dim=D, theta=THETA), num_sinks=1,
        num_recent=2, valid=valid,
    )
    for bi in range(b):
        assert int(kept[bi].sum()) == int(valid[bi].sum())
        for j in range(H_KV * G):
            q = _rope_loop(query[bi, j, 0], int(query_pos[bi]))
            toks = [t for t in range(n) if valid[bi, t]]
            logits = torch.stack([q @ _rope_loop(keys[bi, j // G, t], int(key_pos[bi, t])) * scaling for t in toks])
            ref = torch.softmax(logits, 0) @ values[bi, j // G, toks]
            torch.testing.assert_close(out[bi, j, 0], ref)


def test_decode_low_rank_attends_reconstructions_of_selected_tokens_only():
    gen = torch.Generator().manual_seed(5)
    b, n, rank, top_k = 1, 12, 5, 3
    keys = torch.randn(b, H_KV, n, D, generator=gen, dtype=torch.float64)
    values = torch.randn(b, H_KV, n, D, generator=gen, dtype=torch.float64)
    query = torch.randn(b, H_KV * G, 1, D, generator=gen, dtype=torch.float64)
    basis = _fit(torch.randn(1, H_KV, 50, D, generator=gen, dtype=torch.float64), rank)
    u = basis.basis
    out, indices, _ = sals_decode_attention(
        query, torch.tensor([n]), compress_keys(keys, basis), values, torch.arange(n)[None], basis, 0.5,
        top_k=top_k, selection_rank=2, rope=partial(rope_cos_sin, head_dim=D, theta=THETA), num_sinks=1,
        num_recent=2,
    )
    joint_k = [torch.cat([keys[0, h, t] for h in range(H_KV)]) for t in range(n)]
    q_avg = torch.cat([query[0, h * G : (h + 1) * G, 0].mean(0) for h in range(H_KV)])
    scores = [float((q_avg @ u[:, :2]) @ (joint_k[t] @ u[:, :2])) for t in range(n)]
    chosen = sorted(_select_reference(scores, [True] * n, top_k, 1, 2))
    assert indices[0].tolist() == chosen
    for j in range(H_KV * G):
        h = j // G
        q = _rope_loop(query[0, j, 0], n)
        recon = [(u @ (u.T @ joint_k[t]))[h * D : (h + 1) * D] for t in chosen]
        logits = torch.stack([q @ _rope_loop(k, t) * 0.5 for k, t in zip(recon, chosen)])
        torch.testing.assert_close(out[0, j, 0], torch.softmax(logits, 0) @ values[0, h, chosen])
