"""Every attention/norm scorer against a slow loop reference, plus padding invariance and validation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kvtrain.policies import SCORERS, build_scorer
from kvtrain.policies.base import ScoreInputs
from kvtrain.policies.gates import GATES_ATTRIBUTE, RetentionGates

from . import left_pad, make_inputs, make_state, ref_attention

ATOL = 1e-5


def assert_valid_close(scores: torch.Tensor, ref: list, inputs: ScoreInputs) -> None:
    assert scores.shape == inputs.valid.shape
    assert torch.isfinite(scores).all()
    b, h, n = scores.shape
    checked = 0
    for bi in range(b):
        for hi in range(h):
            for j in range(n):
                if inputs.valid[bi, hi, j]:
                    assert scores[bi, hi, j].item() == pytest.approx(ref[bi][hi][j], abs=ATOL), (bi, hi, j)
                    checked += 1
    assert checked > 0


def dims(inputs: ScoreInputs) -> tuple[int, int, int, int, int]:
    b, h_kv, n, _ = inputs.keys.shape
    return b, h_kv, inputs.group_size, inputs.queries.shape[2], n


def real_query(inputs: ScoreInputs, bi: int, t: int) -> bool:
    return int(inputs.query_positions[t]) >= int(inputs.rope_offset[bi])


# --- loop references -------------------------------------------------------------------------------------


def ref_streaming(inputs: ScoreInputs) -> list:
    b, h_kv, _, _, n = dims(inputs)
    return [
        [[float(inputs.positions[bi, hi, j] - inputs.rope_offset[bi]) for j in range(n)] for hi in range(h_kv)]
        for bi in range(b)
    ]


def ref_norm(x: torch.Tensor, sign: float) -> list:
    b, h, n, _ = x.shape
    return [
        [[sign * math.sqrt(sum(v * v for v in x[bi, hi, j].tolist())) for j in range(n)] for hi in range(h)]
        for bi in range(b)
    ]


def ref_tova(inputs: ScoreInputs) -> list:
    b, h_kv, g, w, n = dims(inputs)
    att = ref_attention(inputs)
    return [
        [[sum(att[bi][hi * g + gi][w - 1][j] for gi in range(g)) / g for j in range(n)] for hi in range(h_kv)]
        for bi in range(b)
    ]


def ref_h2o(inputs: ScoreInputs, state: dict, reduce: str) -> list:
    b, h_kv, g, w, n = dims(inputs)
    att = ref_attention(inputs)
    out = [[[0.0] * n for _ in range(h_kv)] for _ in range(b)]
    for bi in range(b):
        for hi in range(h_kv):
            for j in range(n):
                acc = state["acc"][bi, hi, j].item() if inputs.has_history[bi, hi, j] else 0.0
                for t in range(w):
                    if int(inputs.query_positions[t]) > inputs.last_event_position:
                        group = [att[bi][hi * g + gi][t][j] for gi in range(g)]
                        acc += sum(group) / g if reduce == "mean" else max(group)
                out[bi][hi][j] = acc
    return out


def ref_snapkv(inputs: ScoreInputs, window: int, kernel: int) -> list:
    b, h_kv, g, w, n = dims(inputs)
    att = ref_attention(inputs)
    out = [[[0.0] * n for _ in range(h_kv)] for _ in range(b)]
    for bi in range(b):
        ts = [t for t in range(max(0, w - window), w) if real_query(inputs, bi, t)]
        for hi in range(h_kv):
            mean = [sum(att[bi][hi * g + gi][t][j] for gi in range(g) for t in ts) / (g * len(ts)) for j in range(n)]
            for j in (j for j in range(n) if inputs.valid[bi, hi, j]):
                near = range(max(0, j - kernel // 2), min(n, j + kernel // 2 + 1))
                around = [i for i in near if inputs.valid[bi, hi, i]]
                out[bi][hi][j] = max(mean[i] for i in around)
    return out


def ref_redundancy(keys: list, valid: list) -> list:
    n = len(keys)
    idx = [j for j in range(n) if valid[j]]
    norm = [math.sqrt(sum(v * v for v in k)) for k in keys]
    cos = [[0.0] * n for _ in range(n)]
    for j in idx:
        for m in idx:
            if j != m:
                cos[j][m] = sum(a * c for a, c in zip(keys[j], keys[m])) / ((norm[j] + 1e-8) * (norm[m] + 1e-8))
    for m in idx:
        dups = [j for j in idx if j != m and cos[j][m] > 0.5]
        if dups:
            cos[max(dups)][m] = 0.0
    raw = {j: sum(cos[j]) / len(idx) for j in idx}
    top = max(raw.values())
    total = sum(math.exp(v - top) for v in raw.values())
    soft = {j: math.exp(v - top) / total for j, v in raw.items()}
    peak = max(soft.values())
    return [soft[j] / peak if valid[j] else 0.0 for j in range(n)]


def ref_gkv(inputs: ScoreInputs, state: dict | None, alpha: float, smooth: str, redundancy: bool, lam: float):
    b, h_kv, g, w, n = dims(inputs)
    att = ref_attention(inputs)
    scores = [[[0.0] * n for _ in range(h_kv)] for _ in range(b)]
    glob = [[[0.0] * n for _ in range(h_kv)] for _ in range(b)]
    for bi in range(b):
        ts = [t for t in range(w) if real_query(inputs, bi, t)]
        for hi in range(h_kv):
            valid = inputs.valid[bi, hi].tolist()
            local = [sum(max(att[bi][hi * g + gi][t][j] for gi in range(g)) for t in ts) / len(ts) for j in range(n)]
            peak = max(local[j] for j in range(n) if valid[j])
            local = [v / peak for v in local]
            red = ref_redundancy(inputs.keys[bi, hi].double().tolist(), valid) if redundancy else None
            for j in range(n):
                f = local[j]
                if state is not None and inputs.has_history[bi, hi, j]:
                    prev = state["global_score"][bi, hi, j].item()
                    if smooth == "max":
                        f = max(alpha * prev, f)
                    elif smooth == "mean":
                        f = alpha * prev + (1 - alpha) * f
                    else:
                        f = alpha * prev + f
                glob[bi][hi][j] = f
                scores[bi][hi][j] = lam * f - (1 - lam) * red[j] if redundancy else f
    return scores, glob


# --- tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_matches_reference(seed):
    inputs = make_inputs(seed)
    scores, state = build_scorer("streaming")(inputs, {})
    assert_valid_close(scores, ref_streaming(inputs), inputs)
    assert state == {}


def test_norm_scorers_match_reference():
    inputs = make_inputs(2)
    key_scores, _ = build_scorer("key_norm")(inputs, {})
    value_scores, _ = build_scorer("value_norm")(inputs, {})
    assert_valid_close(key_scores, ref_norm(inputs.keys.double(), -1.0), inputs)
    assert_valid_close(value_scores, ref_norm(inputs.values.double(), 1.0), inputs)


def test_tova_per_group_matches_reference():
    inputs = make_inputs(3)
    scores, _ = build_scorer("tova", {"heads": "group"})(inputs, {})
    assert_valid_close(scores, ref_tova(inputs), inputs)


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("with_state", [True, False])
def test_h2o_matches_reference(reduce, with_state):
    inputs = make_inputs(4)
    state = make_state(inputs, 5) if with_state else {}
    scores, new_state = build_scorer("h2o", {"group_reduce": reduce})(inputs, {"acc": state["acc"]} if state else {})
    ref = ref_h2o(inputs, state if state else {"acc": torch.zeros_like(inputs.valid, dtype=torch.float)}, reduce)
    assert_valid_close(scores, ref, inputs)
    assert_valid_close(new_state["acc"], ref, inputs)


def test_h2o_accumulates_every_decoded_query_once():
    # Two consecutive events over the same candidates (nothing evicted): the carried sum must equal the sum of
    # the attention of every window query, each counted once, when the window covers the interval.
    inputs = make_inputs(6, last_event_position=-1, rope_offset=(0, 0))
    scorer = build_scorer("h2o")
    full, _ = scorer(inputs, {})
    first = {**vars(inputs), "queries": inputs.queries[:, :, :3], "query_positions": inputs.query_positions[:3]}
    _, state = scorer(ScoreInputs(**first), {})
    second = {**vars(inputs), "last_event_position": int(inputs.query_positions[2]), "has_history": inputs.valid}
    total, _ = scorer(ScoreInputs(**second), state)
    torch.testing.assert_close(total, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("window", "kernel"), [(16, 5), (3, 5), (5, 3), (2, 1)])
def test_snapkv_matches_reference(window, kernel):
    inputs = make_inputs(7)
    scores, _ = build_scorer("snapkv", {"window": window, "kernel_size": kernel})(inputs, {})
    assert_valid_close(scores, ref_snapkv(inputs, window, kernel), inputs)


@pytest.mark.parametrize("smooth", ["max", "mean", "sum"])
@pytest.mark.parametrize("redundancy", [True, False])
def test_gkv_matches_reference(smooth, redundancy):
    inputs = make_inputs(8)
    state = make_state(inputs, 9)
    params = {"smooth": smooth, "redundancy": redundancy, "alpha": 0.7, "mix_lambda": 0.4}
    scores, new_state = build_scorer("gkv", params)(inputs, {"global_score": state["global_score"]})
    ref_scores, ref_glob = ref_gkv(inputs, state, 0.7, smooth, redundancy, 0.4)
    assert_valid_close(scores, ref_scores, inputs)
    assert_valid_close(new_state["global_score"], ref_glob, inputs)


def test_gkv_first_event_without_state_matches_reference():
    inputs = make_inputs(10)
    scores, _ = build_scorer("gkv")(inputs, {})
    ref_scores, _ = ref_gkv(inputs, None, 0.8, "max", True, 0.5)
    assert_valid_close(scores, ref_scores, inputs)


def test_gkv_redundancy_spares_the_newest_copy():
    # Three exact copies of one key among random ones: the newest copy must be the least redundant of the three.
    inputs = make_inputs(11, b=1, h_kv=1, n=12, rope_offset=(0,))
    keys = inputs.keys.clone()
    keys[..., 4:, :] = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    keys[..., 6, :] = keys[..., 9, :] = keys[..., 11, :] = keys[..., 4, :]
    everything = {"valid": torch.ones_like(inputs.valid), "positions": torch.arange(12).view(1, 1, 12)}
    inputs = ScoreInputs(**{**vars(inputs), "keys": keys, **everything})
    scorer = build_scorer("gkv", {"mix_lambda": 0.0})
    scores, _ = scorer(inputs, {})  # score = -R^
    copies = scores[0, 0, [4, 6, 9, 11]]
    assert copies.argmax().item() == 3
    assert (copies[3] > copies[:3]).all()


# Parameters that differ from a scorer's defaults in the padding test (SnapKV's window must fit the short case).
SCORER_PARAMS = {"snapkv": {"window": 6}}


def _model_with_random_gates(inputs):
    """What a scorer with weights of its own (the retention gates) binds to: random gates shaped like `inputs`."""
    _, heads, _, head_dim = inputs.keys.shape
    gates = RetentionGates(inputs.layer_idx + 1, heads, head_dim)
    with torch.no_grad():
        gates.weight.normal_(generator=torch.Generator().manual_seed(5))
        gates.bias.normal_(generator=torch.Generator().manual_seed(6))
    return SimpleNamespace(**{GATES_ATTRIBUTE: gates})


# KVzip looks its scores up in a table a model pass computes over the (padded) prompt itself; its padding
# invariance is tested there (tests/test_kvzip.py::test_left_padded_row_scores_like_unpadded).
TABLE_SCORERS = {"kvzip"}


@pytest.mark.parametrize("name", sorted(set(SCORERS) - TABLE_SCORERS))
@pytest.mark.parametrize(("case", "pad", "pad_queries"), [("long", 4, 0), ("short", 3, 2)])
def test_left_padding_does_not_change_scores(name, case, pad, pad_queries):
    if case == "long":
        inputs = make_inputs(12)
    else:  # a row shorter than the window: padding queries enter the window
        inputs = make_inputs(13, n=5, columns=5, w=5, rope_offset=(0, 0), last_event_position=2)
    state = make_state(inputs, 14)
    padded, padded_state = left_pad(inputs, state, pad, pad_queries)
    scorer = build_scorer(name, SCORER_PARAMS.get(name, {}))
    scorer.bind(_model_with_random_gates(inputs))
    scores, new_state = scorer(inputs, state)
    padded_scores, padded_new_state = scorer(padded, padded_state)
    assert torch.isfinite(padded_scores).all()
    valid = inputs.valid
    torch.testing.assert_close(padded_scores[..., pad:][valid], scores[valid], atol=ATOL, rtol=0)
    for key in new_state:
        torch.testing.assert_close(padded_new_state[key][..., pad:][valid], new_state[key][valid], atol=ATOL, rtol=0)
    # Rows are independent: scoring one row alone gives the same scores.
    per_row = {k: v[1:] for k, v in vars(inputs).items() if isinstance(v, torch.Tensor) and k != "query_positions"}
    row = ScoreInputs(**{**vars(inputs), **per_row})
    row_scores, _ = scorer(row, {k: v[1:] for k, v in state.items()})
    torch.testing.assert_close(row_scores[valid[1:]], scores[1:][valid[1:]], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("h2o", {"group_reduce": "sum"}, "group_reduce"),
        ("snapkv", {"kernel_size": 4}, "kernel_size"),
        ("snapkv", {"window": 0}, "window"),
        ("gkv", {"smooth": "ema"}, "smooth"),
        ("gkv", {"alpha": 1.5}, "alpha"),
        ("gkv", {"mix_lambda": -0.1}, "mix_lambda"),
        ("expected_attention", {"n_future_positions": 0}, "n_future_positions"),
        ("expected_attention", {"epsilon": -1.0}, "epsilon"),
    ],
)
def test_bad_hyperparameters_raise(name, params, field):
    with pytest.raises(ValueError, match=field):
        build_scorer(name, params)
