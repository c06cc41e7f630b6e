"""The cache and replay run the Triton kernels (``KVTRAIN_KERNELS=triton``; the interpreter without a GPU) and
give what their PyTorch paths give, which `test_cache_replay.py` checks against dense-mask references."""

from __future__ import annotations

import pytest
import torch

import kvtrain.kernels
from kvtrain.config import KVCompressionConfig, MergeConfig, ScheduleConfig, ScorerConfig
from kvtrain.kernels.dispatch import KERNELS_ENV, use_kernels
from kvtrain.models import tiny_model
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import position_ids_from_mask, teacher_forced_decode
from kvtrain.runtime.replay import replay_compression

pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SEQ, PREFILL, PAD = 36, 16, 5
LAYERS = 2
FP32_TOL = dict(atol=2e-5, rtol=1e-5)

CONFIGS = {
    "snapkv": KVCompressionConfig(
        budget=8, sinks=1, recent=2, query_window=4, scorer=ScorerConfig("snapkv"), schedule=ScheduleConfig(interval=4)
    ),
    # Log votes as a non-zero bias, and a dense layer (an empty keep-set for the keyset kernel).
    "keepkv-dense0": KVCompressionConfig(
        budget=8, sinks=1, recent=2, query_window=4, scorer=ScorerConfig("h2o"), schedule=ScheduleConfig(interval=4),
        merge=MergeConfig(threshold=0.0), dense_layers=[0],
    ),
}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=LAYERS, hidden_size=32, num_heads=4, num_kv_heads=2, vocab_size=61, seed=4).to(DEVICE)


@pytest.fixture(scope="module")
def batch():
    """Three rows, the second left-padded (queries that see nothing), the third right-padded (decode steps of
    padding tokens, as after an EOS in on-policy rollouts): padding goes through both paths."""
    ids = torch.randint(1, 61, (3, SEQ), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0
    mask[2, -PAD:] = 0
    return ids.masked_fill(mask == 0, 0).to(DEVICE), mask.to(DEVICE)


@pytest.fixture
def calls(monkeypatch):
    """Counts the kernel entry points the attention paths call (they look them up in `kvtrain.kernels`)."""
    counts = {"decode_attention": 0, "keyset_attention": 0}
    for name in counts:
        original = getattr(kvtrain.kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            assert kwargs.get("force") == "triton"
            return _original(*args, **kwargs)

        monkeypatch.setattr(kvtrain.kernels, name, counted)
    return counts


def test_switch_reads_the_environment_at_call_time(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert (use_kernels(cpu), use_kernels(cuda)) == (False, True)
    monkeypatch.setenv(KERNELS_ENV, "torch")
    assert (use_kernels(cpu), use_kernels(cuda)) == (False, False)
    monkeypatch.setenv(KERNELS_ENV, "Triton")
    assert (use_kernels(cpu), use_kernels(cuda)) == (True, True)
    monkeypatch.setenv(KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match="KVTRAIN_KERNELS='cuda' must be one of auto, triton, torch"):
        use_kernels(cpu)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cache_decode_steps_run_the_decode_kernel(model, batch, name, monkeypatch, calls):
    ids, mask = batch
    config = CONFIGS[name]

    def decode(choice: str) -> torch.Tensor:
        monkeypatch.setenv(KERNELS_ENV, choice)
        with torch.no_grad():
            return teacher_forced_decode(model, CompressedCache.for_model(model, config), ids, mask, prefill_len=PREFILL)

    reference = decode("torch")
    assert calls["decode_attention"] == 0
    kernel = decode("triton")
    assert calls["decode_attention"] == LAYERS * (SEQ - PREFILL)
    torch.testing.assert_close(kernel, reference, **FP32_TOL)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_replay_runs_the_keyset_kernel_forward_and_backward(model, batch, name, monkeypatch, calls):
    ids, mask = batch
    config = CONFIGS[name]
    targets = torch.randint(0, 61, ids.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    params = [model.model.layers[0].self_attn.q_proj.weight, model.model.layers[1].self_attn.v_proj.weight]

    def replayed(choice: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setenv(KERNELS_ENV, choice)
        with replay_compression(model, config, prefill_len=PREFILL):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        real = mask.bool()
        loss = torch.nn.functional.cross_entropy(logits[real], targets[real])
        return logits.detach(), list(torch.autograd.grad(loss, params))

    ref_logits, ref_grads = replayed("torch")
    assert calls["keyset_attention"] == 0
    logits, grads = replayed("triton")
    assert calls["keyset_attention"] == LAYERS
    torch.testing.assert_close(logits, ref_logits, **FP32_TOL)
    for grad, ref in zip(grads, ref_grads):
        assert ref.abs().max() > 1e-4  # the loss really depends on the parameter
        torch.testing.assert_close(grad, ref, **FP32_TOL)
    # Replay on the kernels still reproduces the compressed cache (here on its PyTorch path).
    monkeypatch.setenv(KERNELS_ENV, "torch")
    with torch.no_grad():
        decoded = teacher_forced_decode(model, CompressedCache.for_model(model, config), ids, mask, prefill_len=PREFILL)
    torch.testing.assert_close(logits[mask.bool()], decoded[mask.bool()], atol=1e-4, rtol=0)
