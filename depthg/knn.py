"""Exact cosine k-nearest neighbours in chunks (pure torch), for mining positives.

``topk_cosine(feats, k)`` L2-normalises ``feats [N, C]`` and, one block of queries at a time
(``chunk`` rows, so memory is ``chunk x N`` rather than ``N x N``), takes the top-k cosine
similarities over the whole set. Row i never contains i itself (``exclude_self``): rank 0 of our
result is rank 1 of the reference, which keeps the anchor as its own top hit. Ties are broken by
the lower index, so results do not depend on the chunk size. Cost: one ``chunk x N`` matmul and
top-k per block (on ``device``, e.g. a GPU, when given). Memory: the normalised features
(``4 N C`` bytes) plus at most ``17 chunk N`` bytes per block; ``block_rows(N, budget)`` picks the
chunk for a budget.
"""
from __future__ import annotations

import torch


def topk_cosine(feats: torch.Tensor, k: int, chunk: int = 1024, exclude_self: bool = True,
                device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(scores [N, k] float32, indices [N, k] int64)``, best first.

    ``k`` is capped at N-1 (N with ``exclude_self=False``).
    """
    if feats.ndim != 2:
        raise ValueError(f"features must be [N, C], got shape {tuple(feats.shape)}")
    n = feats.shape[0]
    k = min(int(k), n - 1 if exclude_self else n)
    if k < 1:
        raise ValueError(f"need at least 2 samples to mine neighbours, got {n}")
    device = torch.device(device) if device is not None else feats.device
    x = torch.nn.functional.normalize(feats.to(device=device, dtype=torch.float32), dim=1)
    scores, indices = [], []
    for start in range(0, n, chunk):
        sim = x[start:start + chunk] @ x.T  # [c, N]
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=device)
            sim[rows, rows + start] = -float("inf")
        s, i = _stable_topk(sim, k)
        scores.append(s.cpu())
        indices.append(i.cpu())
    return torch.cat(scores), torch.cat(indices)


def _stable_topk(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row, best first, equal values in ascending index order.

    ``torch.topk`` (O(N) per row) promises no tie order, so the selection is re-sorted by
    (value desc, index asc); rows where values equal to the k-th one also lie outside the selection
    (a tie at the boundary) fall back to a full stable sort. Exact either way.
    """
    s, i = torch.topk(sim, k, dim=1)
    order = torch.argsort(i, dim=1)
    s, i = s.gather(1, order), i.gather(1, order)
    order = torch.argsort(s, dim=1, descending=True, stable=True)
    s, i = s.gather(1, order), i.gather(1, order)
    tied = (sim >= s[:, -1:]).sum(dim=1) > k
    if tied.any():
        fs, fi = torch.sort(sim[tied], dim=1, descending=True, stable=True)
        s[tied], i[tied] = fs[:, :k], fi[:, :k]
    return s, i


def block_rows(n: int, budget_bytes: int) -> int:
    """Query rows per block so that one block's working memory stays within ``budget_bytes``.

    Per query row ``topk_cosine`` holds the similarity row (4 bytes per candidate), a comparison
    mask (1 byte) and, for rows tied at the k-th value, a full sort (4-byte values + 8-byte indices):
    at most 17 bytes per candidate, so a block of ``r`` rows needs <= 17 * r * n bytes on top of
    the normalised features (4 * n * C bytes).
    """
    return max(1, int(budget_bytes) // (17 * max(int(n), 1)))
