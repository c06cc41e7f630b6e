"""Streamed Gram accumulators against explicit per-token loops."""

from __future__ import annotations

import io

import pytest
import torch

from kvtrain.lowrank.gram import GramAccumulator, JointKeyGramAccumulator, ValueGramAccumulator

H_KV, G, D = 2, 3, 4


def _data(b: int = 2, n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, H_KV, n, D, generator=gen)
    queries = torch.randn(b, H_KV * G, n, D, generator=gen)
    mask = torch.rand(b, n, generator=gen) > 0.3
    return keys, queries, mask


def _loop_grams(keys, queries, mask):
    """Reference: outer products summed token by token, the group's query heads looped explicitly."""
    kg = torch.zeros(H_KV, D, D, dtype=torch.float64)
    qg = torch.zeros(H_KV, D, D, dtype=torch.float64)
    for bi in range(keys.shape[0]):
        for t in range(keys.shape[2]):
            if not mask[bi, t]:
                continue
            for h in range(H_KV):
                k = keys[bi, h, t].double()
                kg[h] += torch.outer(k, k)
                for j in range(G):
                    q = queries[bi, h * G + j, t].double()
                    qg[h] += torch.outer(q, q)
    return kg, qg


def test_matches_loop_and_counts():
    keys, queries, mask = _data()
    acc = GramAccumulator(H_KV, D, G, layer_idx=0)
    acc.update(keys, queries, mask)
    kg, qg = _loop_grams(keys, queries, mask)
    torch.testing.assert_close(acc.key_gram, kg)
    torch.testing.assert_close(acc.query_gram, qg)
    assert acc.num_key_tokens == int(mask.sum())
    assert acc.num_query_rows == G * int(mask.sum())


def test_chunked_equals_all_at_once_and_token_first_layout():
    keys, queries, mask = _data(n=9)
    whole = GramAccumulator(H_KV, D, G)
    whole.update(keys, queries, mask)
    chunked = GramAccumulator(H_KV, D, G)
    for lo in range(0, 9, 4):
        chunked.update(keys[:, :, lo : lo + 4], queries[:, :, lo : lo + 4], mask[:, lo : lo + 4])
    flat = GramAccumulator(H_KV, D, G)
    for bi in range(keys.shape[0]):  # [T, h, d] layout, one sequence at a time
        flat.update(keys[bi].transpose(0, 1), queries[bi].transpose(0, 1), mask[bi])
    for other in (chunked, flat):
        torch.testing.assert_close(other.key_gram, whole.key_gram)
        torch.testing.assert_close(other.query_gram, whole.query_gram)
        assert (other.num_key_tokens, other.num_query_rows) == (whole.num_key_tokens, whole.num_query_rows)


def test_state_dict_round_trip_resumes_and_merge_sums():
    (k1, q1, m1), (k2, q2, m2) = _data(seed=1), _data(seed=2)
    full = GramAccumulator(H_KV, D, G)
    full.update(k1, q1, m1)
    full.update(k2, q2, m2)

    first = GramAccumulator(H_KV, D, G)
    first.update(k1, q1, m1)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = GramAccumulator(H_KV, D, G)
    resumed.load_state_dict(torch.load(buf))
    resumed.update(k2, q2, m2)

    second = GramAccumulator(H_KV, D, G)
    second.update(k2, q2, m2)
    merged = first.merge(second)
    for other in (resumed, merged):
        torch.testing.assert_close(other.key_gram, full.key_gram)
        torch.testing.assert_close(other.query_gram, full.query_gram)
        assert other.num_key_tokens == full.num_key_tokens
        assert other.num_query_rows == full.num_query_rows

    with pytest.raises(ValueError, match="group_size"):
        GramAccumulator(H_KV, D, G + 1).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="cannot merge"):
        first.merge(GramAccumulator(H_KV, D, 1))


def test_value_and_joint_accumulators_match_loops():
    keys, _, mask = _data(n=6)
    vacc = ValueGramAccumulator(H_KV, D)
    jacc = JointKeyGramAccumulator(H_KV, D)
    vacc.update(keys[:, :, :3], mask[:, :3])
    vacc.update(keys[:, :, 3:], mask[:, 3:])
    jacc.update(keys, mask)
    vg = torch.zeros(H_KV, D, D, dtype=torch.float64)
    jg = torch.zeros(H_KV * D, H_KV * D, dtype=torch.float64)
    for bi in range(keys.shape[0]):
        for t in range(keys.shape[2]):
            if mask[bi, t]:
                for h in range(H_KV):
                    vg[h] += torch.outer(keys[bi, h, t].double(), keys[bi, h, t].double())
                joint = torch.cat([keys[bi, h, t] for h in range(H_KV)]).double()
                jg += torch.outer(joint, joint)
    torch.testing.assert_close(vacc.value_gram, vg)
    torch.testing.assert_close(jacc.gram, jg)
    assert vacc.num_tokens == jacc.num_tokens == int(mask.sum())
    state = jacc.state_dict()
    again = JointKeyGramAccumulator(H_KV, D)
    again.load_state_dict(state)
    torch.testing.assert_close(again.merge(jacc).gram, 2 * jg)


def test_bad_inputs_name_the_layer_and_field():
    keys, queries, mask = _data()
    acc = GramAccumulator(H_KV, D, G, layer_idx=7)
    bad = keys.clone()
    bad[0, 1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 7: keys contain NaN or inf"):
        acc.update(bad, queries)
    inf_q = queries.clone()
    inf_q[1, 0, 0, 3] = float("inf")
    with pytest.raises(ValueError, match="layer 7: queries contain NaN or inf"):
        acc.update(keys, inf_q)
    # Garbage in masked-out (padding) slots is never read.
    padded = keys.clone()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 2] = False
    acc.update(padded.masked_fill(~mask[:, None, :, None], float("nan")), queries, mask)
    with pytest.raises(ValueError, match="layer 7: keys has 3 heads"):
        acc.update(torch.randn(2, 3, 5, D), queries)
    with pytest.raises(ValueError, match="mask for keys"):
        acc.update(keys, queries, torch.ones(5, dtype=torch.bool))
