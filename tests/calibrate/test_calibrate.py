"""End-to-end calibration on a tiny model, checked against hand-collected activations and explicit SVDs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvtrain.artifacts.calibration import ARTIFACT_DIR, load_artifacts
from kvtrain.artifacts.projections import PROJECTIONS, read_projections
from kvtrain.calibrate.run import STATE_DIR, calibrate, token_hash
from kvtrain.data import load_texts, token_blocks
from kvtrain.models import tiny_model, tiny_tokenizer
from kvtrain.policies.budgets import layer_budgets
from kvtrain.policies.expected_attention import ExpectedAttentionScorer
from kvtrain.runtime.routing import observe_attention

N_BLOCKS, BLOCK_LEN, D = 4, 48, 16
COMMON = dict(num_blocks=N_BLOCKS, block_len=BLOCK_LEN, tada_blocks=1, tada_group_size=8, head_budget=32,
              checkpoint_every=2, progress=False)
FILES = ("config.json", "projections.safetensors", "quant_plan.json", "query_stats.safetensors", "head_budgets.json")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def run(out: Path, tokenizer, model=None, **kwargs) -> Path:
    return calibrate(model or tiny_model(), tokenizer, out_dir=out, **{**COMMON, **kwargs})


def artifact_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in FILES}


def test_writes_every_artifact_and_loads_them(tmp_path, tokenizer):
    model = tiny_model()
    folder = run(tmp_path, tokenizer, model, rank=8, value_rank=6)
    assert folder == tmp_path / ARTIFACT_DIR
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)  # checkpoint folder removed at the end
    loaded = load_artifacts(tmp_path, model)
    assert loaded.projections.key_ranks == [8, 8] and loaded.projections.value_ranks == [6, 6]
    assert loaded.projections.keys[0].a.shape == (2, D, 8)
    assert loaded.quant_plan.bits and sum(loaded.quant_plan.bits) <= 4 * 2
    assert loaded.query_stats.mu.shape == (2, 4, D) and loaded.query_stats.sigma.shape == (2, 4, D, D)
    ExpectedAttentionScorer(stats=str(folder / "query_stats.safetensors"))  # the scorer accepts the file
    budgets = layer_budgets(loaded.head_budgets_path, 2, 32)  # the format KVCompressionConfig.layer_budgets reads
    assert sum(budgets) == 2 * 32 and min(budgets) >= 8
    config = json.loads((folder / "config.json").read_text())
    blocks = token_blocks(tokenizer, load_texts(None, "train"), BLOCK_LEN, N_BLOCKS)
    assert config["data"] == {"source": "embedded", "split": "train", "num_blocks": N_BLOCKS, "block_len": BLOCK_LEN,
                              "num_tokens": N_BLOCKS * BLOCK_LEN, "token_ids_sha256": token_hash(blocks)}
    assert config["settings"]["rank"] == 8 and config["model_fingerprint"]["num_hidden_layers"] == 2


def collect_by_hand(model, blocks):
    """Per layer post-RoPE keys/queries/values and pre-RoPE queries (from the hidden states), by explicit loops."""
    layers = len(model.model.layers)
    post = {l: {"q": [], "k": [], "v": []} for l in range(layers)}

    def grab(module, query, key, value, mask):
        post[module.layer_idx]["q"].append(query[0].double())
        post[module.layer_idx]["k"].append(key[0].double())
        post[module.layer_idx]["v"].append(value[0].double())

    pre = {l: [] for l in range(layers)}
    with torch.no_grad(), observe_attention(model, grab):
        for block in blocks:
            hidden = model.model(input_ids=block[None], output_hidden_states=True).hidden_states
            for l, layer in enumerate(model.model.layers):
                q = layer.self_attn.q_proj(layer.input_layernorm(hidden[l]))[0]  # [S, h_q*d], before RoPE
                pre[l].append(q.view(q.shape[0], -1, D).double())
    return post, pre


def test_projections_and_query_stats_equal_a_hand_collected_fit(tmp_path, tokenizer):
    model = tiny_model()
    folder = run(tmp_path, tokenizer, model, rank=5, value_rank=4, fit=("kqsvd", "query-stats"))
    proj = read_projections(folder / PROJECTIONS, 2, 2, D)
    blocks = token_blocks(tokenizer, load_texts(None, "train"), BLOCK_LEN, N_BLOCKS)
    post, pre = collect_by_hand(model, blocks)
    g = 2
    for l in range(2):
        k_all = torch.cat(post[l]["k"], dim=1)  # [h_kv, T, d]
        q_all = torch.cat(post[l]["q"], dim=1)  # [h_q, T, d]
        v_all = torch.cat(post[l]["v"], dim=1)
        w = model.model.layers[l].self_attn.o_proj.weight.double()  # [D_model, h_q*d]
        for h in range(2):
            k = k_all[h]
            q = torch.cat([q_all[h * g + j] for j in range(g)])  # group queries stacked along tokens
            for x, y, pair, r in ((k, q, proj.keys[l], 5),
                                  (v_all[h], torch.cat([w[:, (h * g + j) * D:(h * g + j + 1) * D] for j in range(g)]),
                                   proj.values[l], 4)):
                m = x @ y.T
                u, s, vh = torch.linalg.svd(m, full_matrices=False)
                best = (u[:, :r] * s[:r]) @ vh[:r]
                approx = (x @ pair.a[h].double()) @ (y @ pair.b[h].double()).T
                assert ((approx - best).norm() / m.norm()).item() < 1e-4
                torch.testing.assert_close(pair.singular_values[h], s[:D], rtol=1e-4, atol=1e-6 * s[0].item())
        # Expected Attention statistics: pre-RoPE queries of positions >= n_sink (4), biased covariance.
        qs = torch.cat([p[4:] for p in pre[l]])  # [N, h_q, d]
        stats = load_artifacts(tmp_path, model).query_stats
        mu = qs.mean(dim=0)
        centred = qs - mu
        sigma = torch.einsum("nhd,nhe->hde", centred, centred) / qs.shape[0]
        torch.testing.assert_close(stats.mu[l].double(), mu, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.sigma[l].double(), sigma, rtol=1e-4, atol=1e-5)


def test_two_runs_are_bit_identical(tmp_path, tokenizer):
    a = run(tmp_path / "a", tokenizer, rank=6)
    b = run(tmp_path / "b", tokenizer, rank=6)
    assert artifact_bytes(a) == artifact_bytes(b)


class Interrupt(Exception):
    pass


def interrupt_at(forward: int):
    """An attention observer that raises `Interrupt` (like a kill) at the `forward`-th forward of layer 0."""
    forwards = 0

    def interrupt(module, query, key, value, mask):
        nonlocal forwards
        forwards += module.layer_idx == 0
        if forwards == forward:
            raise Interrupt  # like a kill: nothing after this point runs
        return None

    return interrupt


# Forwards (counted at layer 0): 4 statistics blocks, checkpointed after blocks 2 and 4; then the TaDA pass:
# 1 reference forward and 3 per layer (bits 2, 4, 8).
@pytest.mark.parametrize(
    ("stop_at_forward", "blocks_done", "tada_rows"),
    [(3, 2, 0), (6, 4, 0), (9, 4, 1)],  # in the statistics pass; first TaDA forward; first forward of layer 1
)
def test_resume_after_interruption_is_bit_identical(tmp_path, tokenizer, stop_at_forward, blocks_done, tada_rows):
    reference = run(tmp_path / "ref", tokenizer, rank=6)
    model = tiny_model()
    with observe_attention(model, interrupt_at(stop_at_forward)), pytest.raises(Interrupt):
        run(tmp_path / "cut", tokenizer, model, rank=6)
    progress = json.loads((tmp_path / "cut" / ARTIFACT_DIR / STATE_DIR / "progress.json").read_text())
    assert progress["blocks_done"] == blocks_done and len(progress["tada_rows"]) == tada_rows
    assert not (tmp_path / "cut" / ARTIFACT_DIR / "config.json").exists()
    resumed = run(tmp_path / "cut", tokenizer, model, rank=6)
    assert artifact_bytes(resumed) == artifact_bytes(reference)


def test_checkpoint_from_other_data_is_refused(tmp_path, tokenizer):
    model = tiny_model()
    with observe_attention(model, interrupt_at(3)), pytest.raises(Interrupt):
        run(tmp_path, tokenizer, model, rank=6)
    with pytest.raises(ValueError, match="different token_ids_sha256"):
        run(tmp_path, tokenizer, model, rank=6, block_len=40)
    run(tmp_path, tokenizer, model, rank=6, block_len=40, resume=False)  # starts over


def test_fingerprint_mismatch_names_the_field(tmp_path, tokenizer):
    run(tmp_path, tokenizer, rank=6, fit=("kqsvd",))
    with pytest.raises(ValueError, match="num_hidden_layers: 2 in the artifacts, 3 for this model"):
        load_artifacts(tmp_path, tiny_model(num_layers=3))


def test_corrupt_files_are_named(tmp_path, tokenizer):
    model = tiny_model()
    folder = run(tmp_path, tokenizer, model, rank=6, fit=("kqsvd", "head-budgets"))
    path = folder / PROJECTIONS
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"projections\.safetensors: sha256 differs"):
        load_artifacts(tmp_path, model)
    # The file alone (as `--kv-config` names it, with no calibration folder around it) is refused as well.
    with pytest.raises(ValueError, match=r"projections\.safetensors: its content does not match the sha256"):
        read_projections(path, 2, 2, D)
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ValueError, match=r"projections\.safetensors: its content does not match the sha256"):
        read_projections(path, 2, 2, D)
    path.write_bytes(bytes(data[:20]))  # truncated inside the header
    with pytest.raises(ValueError, match=r"projections\.safetensors: not a readable safetensors file"):
        read_projections(path, 2, 2, D)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_artifacts(tmp_path, model)


def test_too_few_tokens_for_the_rank(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="key rank=12 needs at least 12 calibration tokens, but the calibration data "
                                         "has 8 tokens"):
        run(tmp_path, tokenizer, rank=12, num_blocks=1, block_len=8, fit=("kqsvd",))


def test_nan_activations_name_the_layer(tmp_path, tokenizer):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 1: attention keys contain NaN or inf"):
        run(tmp_path, tokenizer, model, rank=6)


def test_tada_sensitivity_falls_with_more_bits(tmp_path, tokenizer):
    model = tiny_model()
    run(tmp_path, tokenizer, model, fit=("tada",), tada_budget=4.0)
    loaded = load_artifacts(tmp_path, model)
    table = loaded.config["results"]["tada_sensitivity"]
    assert len(table) == 2
    for row in table:
        assert row["2"] > row["4"] > row["8"] > 0
    assert loaded.projections is None and sum(loaded.quant_plan.bits) / 2 <= 4.0


def test_global_rank_budget_and_energy_ranks(tmp_path, tokenizer):
    model = tiny_model()
    run(tmp_path / "budget", tokenizer, model, rank_budget=11, value_rank=4, fit=("kqsvd",))
    proj = load_artifacts(tmp_path / "budget", model).projections
    assert sum(proj.key_ranks) == 11
    run(tmp_path / "eps", tokenizer, model, energy_eps=0.0, fit=("kqsvd",))
    assert load_artifacts(tmp_path / "eps", model).projections.key_ranks == [D, D]  # eps 0: nothing may be dropped


def test_cli_calibrate(tmp_path, tokenizer):
    import argparse

    from kvtrain.calibrate.cli import add_calibrate_parser

    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    parser = argparse.ArgumentParser()
    add_calibrate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["calibrate", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                              "--fit", "kqsvd,head-budgets", "--num-blocks", "2", "--block-len", "32",
                              "--rank", "4", "--head-budget", "16", "--no-progress"])
    args.func(args)
    loaded = load_artifacts(tmp_path / "out", model)
    assert loaded.projections.key_ranks == [4, 4] and loaded.quant_plan is None and loaded.query_stats is None
    assert sum(loaded.head_budgets["budgets"]) == 32
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate", "--out", "x", "--fit", "kqsvd,nope"])
