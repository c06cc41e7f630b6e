"""SALS as a cache mode: step-by-step decoding through `CompressedCache` vs one replayed forward, and both vs
independent references (the plain model at full rank, a brute-force selection from k_proj, a byte formula)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from kvtrain.calibrate.run import calibrate
from kvtrain.config import KVCompressionConfig, QuantConfig, SalsConfig, ScheduleConfig
from kvtrain.models import tiny_model, tiny_tokenizer
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import teacher_forced_decode
from kvtrain.runtime.replay import replay_compression
from tests.test_cache_replay import run_both

SEQ, PREFILL, H_KV, H_Q, D, LAYERS = 70, 40, 2, 6, 16, 3
WIDTH = H_KV * D


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_layers=LAYERS, hidden_size=96, num_heads=H_Q, num_kv_heads=H_KV, vocab_size=128,
                      seed=0)


@pytest.fixture(scope="module")
def basis_file(llama, tmp_path_factory):
    """A basis fitted on the tiny model's own keys (2 blocks of 48 tokens: 96 >= WIDTH directions)."""
    out = tmp_path_factory.mktemp("sals")
    folder = calibrate(llama, tiny_tokenizer(), out_dir=out, fit=("sals",), num_blocks=2, block_len=48, progress=False)
    return str(folder / "sals_basis.safetensors")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(1))


def sals_config(basis: str, **overrides) -> KVCompressionConfig:
    sals = dict(basis=basis, rank=12, top_k=6, sinks=2, recent=4)
    sals.update(overrides.pop("sals", {}))
    fields = dict(budget=None, compression_ratio=0.0, sals=SalsConfig(**sals), dense_layers=[0],
                  schedule=ScheduleConfig(interval=8))
    fields.update(overrides)
    return KVCompressionConfig(**fields)


def decode_and_replay(model, config, input_ids, attention_mask=None, prefill_len=PREFILL):
    cache, decoded, _, replayed = run_both(model, config, input_ids, attention_mask, prefill_len)
    return cache, decoded, replayed


FOUR_BIT = QuantConfig(key_bits=None, value_bits=4, group_size=8)
PARITY_CASES = {
    "latent": {},
    "values-4bit": {"quant": FOUR_BIT},
    "values-2bit-chunked-prefill": {"quant": QuantConfig(key_bits=None, value_bits=2, group_size=8),
                                    "schedule": ScheduleConfig(interval=8, prefill_chunk=16)},
    "token-fraction": {"sals": {"top_k": None, "token_fraction": 0.125}},
    "selection-rank-3": {"sals": {"selection_rank": 3}},
    "recent-selector": {"sals": {"selector": "recent"}},
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_replay_logits_equal_decode_logits(llama, basis_file, tokens, case):
    config = sals_config(basis_file, **PARITY_CASES[case])
    cache, decoded, replayed = decode_and_replay(llama, config, tokens)
    assert (decoded - replayed).abs().max().item() <= 1e-4
    with torch.no_grad():
        full = llama(input_ids=tokens).logits
    assert torch.allclose(decoded[:, :16], full[:, :16], atol=1e-4)  # the first forward attends exactly
    assert (decoded[:, PREFILL:] - full[:, PREFILL:]).abs().max() > 1e-3  # and SALS really changed decoding
    assert len(cache.records[0]) == 0 and len(cache.records[1]) == SEQ - PREFILL  # dense layer 0; a set per step


def left_padded_batch():
    gen = torch.Generator().manual_seed(3)
    long_row = torch.randint(4, 128, (SEQ,), generator=gen)
    short_row = torch.randint(4, 128, (SEQ - 6,), generator=gen)
    batch = torch.stack([long_row, torch.cat([torch.zeros(6, dtype=torch.long), short_row])])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    return long_row, short_row, batch, mask


@pytest.mark.parametrize("quant", [None, FOUR_BIT], ids=["full-values", "values-4bit"])
def test_left_padded_batch_equals_replay_and_per_row_runs(llama, basis_file, quant):
    long_row, short_row, batch, mask = left_padded_batch()
    config = sals_config(basis_file, quant=quant, sals={"top_k": None, "token_fraction": 0.25})
    _, batched, replayed = decode_and_replay(llama, config, batch, mask)
    assert (batched[:, 6:] - replayed[:, 6:]).abs().max().item() <= 1e-4
    solo_long = teacher_forced_decode(llama, CompressedCache.for_model(llama, config), long_row[None],
                                      prefill_len=PREFILL)
    solo_short = teacher_forced_decode(llama, CompressedCache.for_model(llama, config), short_row[None],
                                       prefill_len=PREFILL - 6)
    assert (batched[0] - solo_long[0]).abs().max().item() <= 1e-4
    assert (batched[1, 6:] - solo_short[0]).abs().max().item() <= 1e-4


def test_full_rank_and_every_token_is_the_plain_model(llama, basis_file, tokens):
    """Closed form: rank h_kv*d reconstructs keys exactly and top_k >= n attends every token."""
    config = sals_config(basis_file, sals={"rank": WIDTH, "top_k": SEQ}, schedule=ScheduleConfig(prefill_chunk=16))
    _, decoded, replayed = decode_and_replay(llama, config, tokens)
    with torch.no_grad():
        full = llama(input_ids=tokens).logits
    assert (decoded - full).abs().max().item() <= 1e-4
    assert (replayed - full).abs().max().item() <= 1e-4


def attention_inputs(model, run):
    """Per layer, the normalised hidden states its attention received during ``run()``, concatenated [b, S, D]."""
    seen = {i: [] for i in range(len(model.model.layers))}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: seen[i].append(kwargs["hidden_states"].detach()), with_kwargs=True
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return {i: torch.cat(h, dim=1) for i, h in seen.items()}


def brute_force_selection(keys, query, t, basis, r_star, top_k, sinks, recent):
    """Positions kept at decode step t by sorting: pre-RoPE keys [S, h_kv, d], query [h_q, d] (pre-RoPE)."""
    joint_k = keys.reshape(keys.shape[0], -1).double()
    g = H_Q // H_KV
    q_bar = torch.cat([query[h * g : (h + 1) * g].double().mean(0) for h in range(H_KV)])
    u = basis[:, :r_star].double()
    scores = [float((q_bar @ u) @ (joint_k[j] @ u)) for j in range(t)]
    always = set(range(min(sinks, t))) | set(range(max(0, t - recent), t))
    rest = sorted((j for j in range(t) if j not in always), key=lambda j: -scores[j])
    return always | set(rest[:top_k])


@pytest.mark.parametrize("sals", [{"top_k": 6}, {"top_k": None, "token_fraction": 0.125, "selection_rank": 4}],
                         ids=["top-k", "token-fraction"])
def test_selected_sets_equal_a_brute_force_selection(llama, basis_file, tokens, sals):
    config = sals_config(basis_file, sals=sals)
    cache = CompressedCache.for_model(llama, config, record=True)
    inputs = attention_inputs(llama, lambda: teacher_forced_decode(llama, cache, tokens, prefill_len=PREFILL))
    u_full = load_file(basis_file)
    settings = config.sals
    for layer in (1, 2):
        attn = llama.model.layers[layer].self_attn
        with torch.no_grad():
            keys = attn.k_proj(inputs[layer][0]).view(SEQ, H_KV, D)  # pre-RoPE, straight from k_proj
            queries = attn.q_proj(inputs[layer][0]).view(SEQ, H_Q, D)
        u = u_full[f"layers.{layer}.U"][:, : settings.rank]
        for record in cache.records[layer]:
            t = record.tokens_seen
            top_k = settings.top_k if settings.top_k is not None else math.ceil(settings.token_fraction * t)
            expected = brute_force_selection(keys, queries[t], t, u, settings.resolved_selection_rank, top_k,
                                             settings.sinks, settings.recent)
            got = {int(j) for j in record.kept[0, 0] if j >= 0}
            assert got == expected, f"layer {layer}, step {t}"
            assert torch.equal(record.kept[0, 0], record.kept[0, 1])  # one set shared by the KV heads


def tada_bytes(tokens: int) -> int:
    """TaDA at 4 bits, group 8: a float16 mean per token + per head packed codes and a float16 scale/zero per group."""
    return tokens * (D * 2 + H_KV * (D * 4 // 8 + (D // 8) * 2 * 2))


@pytest.mark.parametrize("quant", [None, FOUR_BIT], ids=["full-values", "values-4bit"])
def test_nbytes_is_the_bytes_held(llama, basis_file, tokens, quant):
    config = sals_config(basis_file, quant=quant)
    cache = CompressedCache.for_model(llama, config)
    teacher_forced_decode(llama, cache, tokens, prefill_len=PREFILL)
    dense = 2 * SEQ * H_KV * D * 4
    latent_keys = SEQ * config.sals.rank * 4
    if quant is None:
        values = SEQ * H_KV * D * 4
    else:  # archived at the prefill event and every 8 decode steps; the rest wait in full precision
        archived = PREFILL + (SEQ - PREFILL) // 8 * 8
        values = tada_bytes(archived) + (SEQ - archived) * H_KV * D * 4
    assert cache.nbytes() == dense + 2 * (latent_keys + values)
    assert [n.tolist() for n in cache.stored_tokens()] == [[[SEQ, SEQ]]] * LAYERS


def test_gradient_reaches_k_proj_through_the_reconstructed_keys(llama, basis_file, tokens, monkeypatch):
    import kvtrain.runtime.sals.replay as sals_replay

    config = sals_config(basis_file)

    def k_proj_grad():
        llama.zero_grad()
        with replay_compression(llama, config, prefill_len=PREFILL):
            logits = llama(input_ids=tokens, use_cache=False).logits
            torch.nn.functional.cross_entropy(logits[0, PREFILL:-1], tokens[0, PREFILL + 1 :]).backward()
        return llama.model.layers[2].self_attn.k_proj.weight.grad.clone()

    grad = k_proj_grad()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    reconstruct = sals_replay.reconstruct_keys
    monkeypatch.setattr(sals_replay, "reconstruct_keys", lambda *a: reconstruct(*a).detach())
    without = k_proj_grad()
    llama.zero_grad()
    assert (grad - without).abs().max() > 1e-6 * grad.abs().max()  # part of it flows through the latents


def test_cache_refuses_the_exact_oracle_and_a_missing_rope(llama, basis_file):
    with pytest.raises(ValueError, match="oracle for replay"):
        CompressedCache.for_model(llama, sals_config(basis_file, sals={"selector": "exact"}))
    with pytest.raises(ValueError, match="CompressedCache.for_model"):
        CompressedCache(sals_config(basis_file), llama.config)


def test_exact_oracle_replay_keeps_the_best_head_summed_scores(llama, basis_file, tokens):
    """At full rank with top_k = n - sinks - recent the oracle attends everything (= plain model); with a small
    top_k it differs from the latent selector."""
    everything = sals_config(basis_file, sals={"selector": "exact", "rank": WIDTH, "top_k": SEQ})
    with torch.no_grad():
        full = llama(input_ids=tokens).logits
        with replay_compression(llama, everything, prefill_len=PREFILL):
            oracle_all = llama(input_ids=tokens, use_cache=False).logits
        with replay_compression(llama, sals_config(basis_file, sals={"selector": "exact"}), prefill_len=PREFILL):
            oracle = llama(input_ids=tokens, use_cache=False).logits
    assert (oracle_all - full).abs().max().item() <= 1e-4
    _, latent, _ = decode_and_replay(llama, sals_config(basis_file), tokens)
    assert (oracle[:, PREFILL:] - latent[:, PREFILL:]).abs().max() > 1e-4
