"""Fidelity metrics against explicit loops on small tensors, and on a tiny model at full rank."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from kvtrain.calibrate.fit import fit_projections, o_proj_weights
from kvtrain.calibrate.statistics import collect_statistics
from kvtrain.data import load_texts, token_blocks
from kvtrain.eval.fidelity import FidelityVariant, add_fidelity_parser, evaluate_fidelity, layer_errors
from kvtrain.lowrank import LowRankPair
from kvtrain.models import tiny_model, tiny_tokenizer
from kvtrain.quant import tada_dequantize, tada_quantize

HQ, HKV, S, D, DM = 4, 2, 5, 4, 6


def brute_force(q, k, v, w, scaling, key_pair=None, value_pair=None, stored_k=None, stored_v=None):
    """Squared logit / output errors and references by explicit loops (plain Python floats)."""
    g = HQ // HKV
    logit_err = logit_ref = 0.0
    out = [[0.0] * DM for _ in range(S)]
    out_hat = [[0.0] * DM for _ in range(S)]
    for j in range(HQ):
        h = j // g
        for i in range(S):
            exact, approx = [], []
            for t in range(i + 1):
                l = sum(q[j, i, c] * k[h, t, c] for c in range(D)) * scaling
                if key_pair is None:
                    lh = sum(q[j, i, c] * stored_k[h, t, c] for c in range(D)) * scaling
                else:
                    r = key_pair.a.shape[-1]
                    qt = [sum(q[j, i, c] * key_pair.b[h, c, x] for c in range(D)) for x in range(r)]
                    lh = sum(qt[x] * stored_k[h, t, x] for x in range(r)) * scaling
                exact.append(float(l))
                approx.append(float(lh))
                logit_err += float(l - lh) ** 2
                logit_ref += float(l) ** 2
            p = [math.exp(x - max(exact)) for x in exact]
            ph = [math.exp(x - max(approx)) for x in approx]
            p, ph = [x / sum(p) for x in p], [x / sum(ph) for x in ph]
            for c in range(D):
                o = sum(p[t] * float(v[h, t, c]) for t in range(i + 1))
                if value_pair is None:
                    oh = sum(ph[t] * float(stored_v[h, t, c]) for t in range(i + 1))
                else:
                    r = value_pair.a.shape[-1]
                    oh = sum(ph[t] * float(stored_v[h, t, x]) * float(value_pair.b[h, c, x])
                             for t in range(i + 1) for x in range(r))
                for n in range(DM):
                    out[i][n] += o * float(w[n, j * D + c])
                    out_hat[i][n] += oh * float(w[n, j * D + c])
    out_err = sum((a - b) ** 2 for ra, rb in zip(out, out_hat) for a, b in zip(ra, rb))
    out_ref = sum(a**2 for ra in out for a in ra)
    return {"logit_err": logit_err, "logit_ref": logit_ref, "output_err": out_err, "output_ref": out_ref}


def tensors(seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HQ, S, D, generator=gen)
    k = torch.randn(1, HKV, S, D, generator=gen)
    v = torch.randn(1, HKV, S, D, generator=gen)
    w = torch.randn(DM, HQ * D, generator=gen)
    return q, k, v, w


def assert_sums_close(got, want):
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name


def test_low_rank_errors_match_explicit_loops():
    q, k, v, w = tensors(0)
    gen = torch.Generator().manual_seed(1)
    key_pair = LowRankPair(torch.randn(HKV, D, 2, generator=gen), torch.randn(HKV, D, 2, generator=gen), torch.ones(HKV, D))
    value_pair = LowRankPair(torch.randn(HKV, D, 3, generator=gen), torch.randn(HKV, D, 3, generator=gen), torch.ones(HKV, D))
    got = layer_errors(q, k, v, w, 0.5, key_pair, value_pair)
    stored_k = torch.einsum("htd,hdr->htr", k[0], key_pair.a)
    stored_v = torch.einsum("htd,hdr->htr", v[0], value_pair.a)
    assert_sums_close(got, brute_force(q[0], k[0], v[0], w, 0.5, key_pair, value_pair, stored_k, stored_v))


def test_quantised_errors_match_explicit_loops():
    q, k, v, w = tensors(2)
    got = layer_errors(q, k, v, w, 0.5, key_bits=2, value_bits=4, group_size=4)
    stored_k = tada_dequantize(tada_quantize(k, 2, 4))[0]
    stored_v = tada_dequantize(tada_quantize(v, 4, 4))[0]
    want = brute_force(q[0], k[0], v[0], w, 0.5, stored_k=stored_k, stored_v=stored_v)
    assert want["logit_err"] > 0 and want["output_err"] > 0
    assert_sums_close(got, want)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    model = tiny_model()
    calib = token_blocks(tokenizer, load_texts(None, "train"), 32, 4)
    held = token_blocks(tokenizer, load_texts(None, "heldout"), 32, 2)
    return model, tokenizer, calib, held


@pytest.mark.parametrize("method", ["kqsvd", "ksvd", "eigen"])
def test_full_rank_gives_zero_error_and_low_rank_does_not(tiny, method):
    model, _, calib, held = tiny
    stats = collect_statistics(model, calib)
    full = fit_projections(stats.grams, stats.values, o_proj_weights(model), method, [16, 16], [16, 16])
    low = fit_projections(stats.grams, stats.values, o_proj_weights(model), method, [4, 4], [4, 4])
    rows = evaluate_fidelity(model, held, [FidelityVariant("full", full.keys, full.values),
                                           FidelityVariant("low", low.keys, low.values)])
    for row in rows:
        if row["variant"] == "full":
            assert row["logit_error"] < 1e-4 and row["output_error"] < 1e-4
        else:
            assert row["logit_error"] > 1e-2 and row["output_error"] > 1e-2


def test_more_bits_give_lower_error(tiny):
    model, _, _, held = tiny
    rows = evaluate_fidelity(model, held, [FidelityVariant(f"{b}", key_bits=b, value_bits=b, group_size=8)
                                           for b in (2, 4, 8)])
    for layer in range(2):
        errs = [r["logit_error"] for r in rows if r["layer"] == layer]
        assert errs[0] > errs[1] > errs[2] > 0


def test_cli_with_method_and_rank(tiny, tmp_path):
    model, tokenizer, _, _ = tiny
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    parser = argparse.ArgumentParser()
    add_fidelity_parser(parser.add_subparsers(dest="suite"))
    args = parser.parse_args(["fidelity", "--model", str(tmp_path / "model"), "--method", "kqsvd", "--rank", "16",
                              "--calib-blocks", "4", "--blocks", "1", "--block-len", "32",
                              "--out", str(tmp_path / "out.json")])
    args.func(args)
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["logit_error"] < 1e-4 for r in rows)
