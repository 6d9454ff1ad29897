"""Exact cosine top-k against a brute-force reference."""
from __future__ import annotations

import pytest
import torch

from depthg.knn import topk_cosine


def _brute(feats, k, exclude_self=True):
    x = feats / feats.norm(dim=1, keepdim=True)
    out = []
    for i in range(len(x)):
        cands = [(float(x[i] @ x[j]), j) for j in range(len(x)) if not (exclude_self and j == i)]
        cands.sort(key=lambda t: (-t[0], t[1]))
        out.append([j for _, j in cands[:k]])
    return torch.tensor(out)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_topk_equals_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(23, 5, generator=g, dtype=torch.float64) * torch.rand(23, 1, generator=g, dtype=torch.float64)
    scores, idx = topk_cosine(feats, 6, chunk=chunk)
    assert idx.shape == (23, 6) and scores.dtype == torch.float32
    assert torch.equal(idx, _brute(feats, 6))
    assert not (idx == torch.arange(23)[:, None]).any()
    x = torch.nn.functional.normalize(feats.float(), dim=1)
    assert torch.allclose(scores, (x[torch.arange(23)[:, None]] * x[idx]).sum(-1), atol=1e-6)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_ties_break_by_index_and_self_included_option():
    # four identical points plus one opposite: neighbours of 0 are 1, 2, 3 in order, whatever the chunk
    feats = torch.tensor([[1.0, 0.0]] * 4 + [[-1.0, 0.0]])
    for chunk in (1, 2, 5):
        _, idx = topk_cosine(feats, 3, chunk=chunk)
        assert idx[0].tolist() == [1, 2, 3] and idx[3].tolist() == [0, 1, 2]
        assert idx[4].tolist() == [0, 1, 2]
    _, idx = topk_cosine(feats, 2, exclude_self=False)
    assert idx[0].tolist() == [0, 1]


def test_k_capped_and_errors():
    feats = torch.randn(4, 3)
    _, idx = topk_cosine(feats, 30)
    assert idx.shape == (4, 3)
    with pytest.raises(ValueError, match="at least 2"):
        topk_cosine(torch.randn(1, 3), 5)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        topk_cosine(torch.randn(4), 2)


def test_many_ties_match_brute_force_in_order():
    # quantised features: many exact ties, inside and at the boundary of the top-k
    g = torch.Generator().manual_seed(1)
    feats = torch.randint(0, 3, (40, 3), generator=g).float() + torch.tensor([0.0, 0.0, 0.5])
    for chunk in (1, 8, 64):
        _, idx = topk_cosine(feats, 9, chunk=chunk)
        assert torch.equal(idx, _brute(feats.double(), 9))


@pytest.mark.parametrize("key_rows,query_rows", [(7, 5), (64, 1000), (1000, 13)])
def test_query_blocks_over_actors_and_key_blocks_equal_one_process(key_rows, query_rows):
    """The split's queries cut over 3 'actors' (rows first..; one actor holding a single row), keys in fixed
    blocks merged: exactly one process's result, also with many exact ties (quantised features); and the
    brute force's neighbours on a seeded set."""
    from depthg.knn import normalize, topk_blocks

    g = torch.Generator().manual_seed(2)
    random, quantised = torch.randn(150, 8, generator=g), torch.randint(0, 3, (150, 3), generator=g).float() + 0.5
    for feats in (random, quantised):
        keys = normalize(feats)
        one = topk_blocks(keys, keys, 9, first=0, key_rows=key_rows, query_rows=query_rows)
        parts = [(0, 40), (40, 41), (41, 150)]
        got = [topk_blocks(keys[a:b], keys, 9, first=a, key_rows=key_rows, query_rows=query_rows) for a, b in parts]
        assert torch.equal(torch.cat([i for _, i in got]), one[1]) and torch.equal(torch.cat([s for s, _ in got]), one[0])
    assert torch.equal(one[1][:, :3], topk_blocks(keys, keys, 3, first=0, key_rows=key_rows, query_rows=query_rows)[1])
    assert torch.equal(topk_blocks(normalize(random), normalize(random), 9, first=0, key_rows=key_rows,
                                   query_rows=query_rows)[1], _brute(random.double(), 9))
    # queries that are not keys: nothing excluded
    _, idx = topk_blocks(normalize(random)[:5], normalize(random), 3, key_rows=key_rows, query_rows=query_rows)
    assert idx[:, 0].tolist() == list(range(5))
