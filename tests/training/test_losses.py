"""The chunked distillation loss against explicit-loop references and the divergences' identities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvtrain.training.losses import LossSpec, distillation_loss

N, H, V = 11, 6, 29


def _inputs(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g, dtype=dtype)
    ws = torch.randn(V, H, generator=g, dtype=dtype)
    ht = torch.randn(N, H, generator=g, dtype=dtype)
    wt = torch.randn(V, H, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    return hs, ws, ht, wt, targets


def _loop_reference(hs, ws, ht, wt, targets, spec: LossSpec) -> float:
    """The loss written out with Python loops over tokens and vocabulary entries (float64 math)."""
    total = 0.0
    for i in range(N):
        zs = [sum(hs[i, k].item() * ws[v, k].item() for k in range(H)) for v in range(V)]
        zt = [sum(ht[i, k].item() * wt[v, k].item() for k in range(H)) for v in range(V)]
        es = [math.exp(z / spec.temperature) for z in zs]
        et = [math.exp(z / spec.temperature) for z in zt]
        ps = [e / sum(es) for e in es]
        pt = [e / sum(et) for e in et]
        if spec.divergence == "forward_kl":
            d = sum(pt[v] * math.log(pt[v] / ps[v]) for v in range(V))
        elif spec.divergence == "reverse_kl":
            d = sum(ps[v] * math.log(ps[v] / pt[v]) for v in range(V))
        else:
            b = spec.beta
            m = [b * pt[v] + (1 - b) * ps[v] for v in range(V)]
            d = sum(b * pt[v] * math.log(pt[v] / m[v]) + (1 - b) * ps[v] * math.log(ps[v] / m[v]) for v in range(V))
        ce = math.log(sum(math.exp(z) for z in zs)) - zs[targets[i].item()]
        total += spec.temperature**2 * d + spec.ce_weight * ce
    return total / N


def _torch_reference(hs, ws, ht, wt, targets, spec: LossSpec) -> torch.Tensor:
    """Unchunked, differentiable: full logits through autograd."""
    t = spec.temperature
    ls = F.log_softmax(hs @ ws.T / t, dim=-1)
    lt = F.log_softmax(ht @ wt.T / t, dim=-1)
    if spec.divergence == "forward_kl":
        d = (lt.exp() * (lt - ls)).sum(-1)
    elif spec.divergence == "reverse_kl":
        d = (ls.exp() * (ls - lt)).sum(-1)
    else:
        b = spec.beta
        lm = torch.log(b * lt.exp() + (1 - b) * ls.exp())
        d = b * (lt.exp() * (lt - lm)).sum(-1) + (1 - b) * (ls.exp() * (ls - lm)).sum(-1)
    ce = F.cross_entropy(hs @ ws.T, targets, reduction="none")
    return (t**2 * d + spec.ce_weight * ce).mean()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature,ce_weight,beta", [(1.0, 0.0, 0.5), (0.7, 0.3, 0.2), (2.0, 1.0, 0.9)])
def test_value_matches_explicit_loops(divergence, temperature, ce_weight, beta):
    hs, ws, ht, wt, targets = _inputs()
    spec = LossSpec(divergence, beta=beta, temperature=temperature, ce_weight=ce_weight, chunk_tokens=4, vocab_chunk=7)
    got = distillation_loss(hs, ws, ht, wt, targets, spec).loss.item()
    assert got == pytest.approx(_loop_reference(hs, ws, ht, wt, targets, spec), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_tokens,vocab_chunk", [(1, 1), (4, 7), (3, 29), (100, 1000)])
def test_chunked_equals_unchunked_value_and_gradients(divergence, chunk_tokens, vocab_chunk):
    hs, ws, ht, wt, targets = _inputs(1)
    spec = LossSpec(divergence, beta=0.3, temperature=1.5, ce_weight=0.5, chunk_tokens=chunk_tokens, vocab_chunk=vocab_chunk)
    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss = distillation_loss(hs1, ws1, ht, wt, targets, spec).loss
    loss.backward()
    hs2, ws2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = _torch_reference(hs2, ws2, ht, wt, targets, spec)
    ref.backward()
    torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs1.grad, hs2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ws1.grad, ws2.grad, rtol=1e-4, atol=1e-6)


def test_frozen_head_gets_no_gradient_and_scaling_by_upstream_gradient():
    hs, ws, ht, wt, targets = _inputs(2)
    spec = LossSpec("forward_kl", chunk_tokens=3, vocab_chunk=5)
    h = hs.clone().requires_grad_()
    (3.0 * distillation_loss(h, ws, ht, wt, targets, spec).loss).backward()
    h2 = hs.clone().requires_grad_()
    _torch_reference(h2, ws, ht, wt, targets, spec).backward()
    assert ws.grad is None
    torch.testing.assert_close(h.grad, 3.0 * h2.grad, rtol=1e-4, atol=1e-6)


def test_direction_identities():
    hs, ws, ht, wt, targets = _inputs(3)
    hs, ht = 0.3 * hs, 0.3 * ht  # moderate divergences (~0.5 nats), so the beta -> 0/1 limits converge fast

    def div(kind, a, wa, b, wb, beta=0.5):
        return distillation_loss(a, wa, b, wb, targets, LossSpec(kind, beta=beta, vocab_chunk=8)).divergence.item()

    # forward KL(teacher || student) is reverse KL with the roles swapped
    assert div("forward_kl", hs, ws, ht, wt) == pytest.approx(div("reverse_kl", ht, wt, hs, ws), rel=1e-5)
    assert div("forward_kl", hs, ws, ht, wt) != pytest.approx(div("reverse_kl", hs, ws, ht, wt), rel=1e-2)
    # JSD_beta(t, s) = JSD_{1-beta}(s, t); plain JSD is symmetric and bounded by ln 2
    assert div("jsd", hs, ws, ht, wt, 0.2) == pytest.approx(div("jsd", ht, wt, hs, ws, 0.8), rel=1e-5)
    assert 0.0 < div("jsd", hs, ws, ht, wt) <= math.log(2)
    # the JSD interpolates: JSD_beta / beta -> KL(t || s) as beta -> 0, JSD_beta / (1 - beta) -> KL(s || t) as beta -> 1
    eps = 1e-3  # the error of both limits is O(eps); float32 noise stays below 1e-4 relative
    assert div("jsd", hs, ws, ht, wt, eps) / eps == pytest.approx(div("forward_kl", hs, ws, ht, wt), rel=5e-3)
    assert div("jsd", hs, ws, ht, wt, 1 - eps) / eps == pytest.approx(div("reverse_kl", hs, ws, ht, wt), rel=5e-3)
    # every divergence vanishes when the student is the teacher
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert abs(div(kind, hs, ws, hs, ws)) < 1e-6


def test_empty_selection_is_zero_and_differentiable():
    _, ws, _, wt, _ = _inputs()
    hs = torch.zeros(0, H, dtype=torch.float64, requires_grad=True)
    parts = distillation_loss(hs, ws, torch.zeros(0, H, dtype=torch.float64), wt, torch.zeros(0, dtype=torch.long), LossSpec())
    parts.loss.backward()
    assert parts.loss.item() == 0.0 and hs.grad.shape == (0, H)


@pytest.mark.parametrize(
    "kwargs,field",
    [({"divergence": "kl"}, "divergence"), ({"divergence": "jsd", "beta": 0.0}, "beta"), ({"temperature": 0.0}, "temperature"),
     ({"ce_weight": -1.0}, "ce_weight"), ({"vocab_chunk": 0}, "vocab_chunk"), ({"chunk_tokens": 0}, "chunk_tokens")],
)
def test_bad_spec_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LossSpec(**kwargs)
