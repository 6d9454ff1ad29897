"""Exact cosine k-nearest neighbours in fixed-size blocks (pure torch), for mining positives.

``topk_blocks(queries, keys, k, first)`` gives, for each (L2-normalised) query row, the top-k cosine
similarities over all (L2-normalised) ``keys``, one fixed-size block of ``query_rows`` queries x ``key_rows``
keys at a time: a block's similarities are one ``[query_rows, key_rows]`` float32 matmul, its top-k is merged
into the running top-k of its queries, so the working memory is the same at any N (at most ``17 x query_rows
x key_rows`` bytes, ``BLOCK_BYTES``) and the keys are held once (wherever the caller put them). ``first``:
the key index of ``queries[0]`` when the queries are rows of the keys; row i never contains itself then
(``exclude_self``): rank 0 of our result is rank 1 of the reference, which keeps the anchor as its own top hit.

Ties are broken by the lower index (the order is value descending, then index ascending: a total order), and
every block has the same shape (``min(query_rows, N) x min(key_rows, N)``, the last ones zero-padded): a BLAS
may round a product differently for another matrix shape, so fixed shapes make the result independent of how
the query rows are split over processes and of which process computed a row: splitting the queries of a split
over P mining actors gives exactly the single-process result, exact ties included (``tests/test_knn.py``).
Other block sizes may round the last bit of a score differently (values that are equal in exact arithmetic
may then order differently). Keys may be stored float32 or float16 (halving their memory); each key block
is brought to float32 on ``device`` before its matmul (float32 products and accumulation). Float32 is what
stage 2 uses (``cluster.mining``): bit-identical neighbours; float16 storage measured recall@30 0.9989 against
it on 49k clustered features, below 0.999 (``bench/scale_stage2.py``, extra ``knn_actors``: ``fp16_recall_at_30``).

``topk_cosine(feats, k)`` is the single-process form (normalises, the queries are the keys).
"""
from __future__ import annotations

import torch

QUERY_ROWS = 4096  # queries per block (with key blocks streamed from host memory: 2 kFLOP per byte moved)
KEY_ROWS = 32768  # keys per block: one block's similarities are 512 MiB of float32
BLOCK_BYTES = 17 * QUERY_ROWS * KEY_ROWS  # the most one block holds (see ``_stable_topk``): ~2.1 GiB


def topk_blocks(queries: torch.Tensor, keys: torch.Tensor, k: int, first: int | None = None,
                exclude_self: bool = True, query_rows: int = QUERY_ROWS, key_rows: int = KEY_ROWS,
                device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [Q, k] float32, indices [Q, k] int64)`` on the CPU, best first, of normalised ``queries
    [Q, C]`` against normalised ``keys [N, C]`` (float32 or float16, on any device; a CPU tensor may be a
    memory map). ``first``: key index of ``queries[0]`` (queries = keys ``first .. first+Q-1``), whose own
    key is excluded with ``exclude_self``. ``k`` is capped at the candidates there are."""
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries [Q, C] and keys [N, C] expected, got {tuple(queries.shape)} and {tuple(keys.shape)}")
    n = keys.shape[0]
    own = first is not None and exclude_self
    k = min(int(k), n - 1 if own else n)
    if k < 1:
        raise ValueError(f"need at least 2 samples to mine neighbours, got {n}")
    device = torch.device(device) if device is not None else keys.device
    # every matmul has the same shape, whatever the split of the queries: a BLAS may round a product
    # differently for another shape, and that would move exact ties between processes
    qr, kr = min(query_rows, n), min(key_rows, n)
    scores, indices = [], []
    for qs in range(0, queries.shape[0], qr):
        q = _padded(queries[qs:qs + qr], qr, device)
        rows = torch.arange(qr, device=device)
        best_s = best_i = None
        for ks in range(0, n, kr):
            block = _padded(keys[ks:ks + kr], kr, device)
            sim = q @ block.T  # [qr, kr]
            if ks + kr > n:
                sim[:, n - ks:] = -float("inf")  # padding
            if own:
                cols = rows + (first + qs - ks)
                mine = (cols >= 0) & (cols < kr)
                sim[rows[mine], cols[mine]] = -float("inf")
            s, i = _stable_topk(sim, min(k, kr, n - ks))
            i += ks
            if best_s is None:
                best_s, best_i = s, i
                continue
            # earlier blocks hold lower indices: a stable sort by value keeps them first among equal values
            cs, ci = torch.cat([best_s, s], dim=1), torch.cat([best_i, i], dim=1)
            order = torch.argsort(cs, dim=1, descending=True, stable=True)[:, :k]
            best_s, best_i = cs.gather(1, order), ci.gather(1, order)
        rest = min(qr, queries.shape[0] - qs)
        scores.append(best_s[:rest].cpu())
        indices.append(best_i[:rest].cpu())
    if not scores:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
    return torch.cat(scores), torch.cat(indices)


def _padded(x: torch.Tensor, rows: int, device) -> torch.Tensor:
    """``x`` as float32 on ``device``, zero rows appended up to ``rows``."""
    x = x.to(device=device, dtype=torch.float32)
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])


def normalize(feats: torch.Tensor) -> torch.Tensor:
    """Rows L2-normalised in float32: THE normalisation of the mined features (so a split normalised in parts
    equals one normalised at once, bit for bit: the operation is row-wise)."""
    return torch.nn.functional.normalize(feats.to(torch.float32), dim=1)


def topk_cosine(feats: torch.Tensor, k: int, chunk: int = QUERY_ROWS, exclude_self: bool = True,
                device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(scores [N, k] float32, indices [N, k] int64)``, best first, of all rows of ``feats [N, C]``
    against all rows (``chunk`` query rows per block); ``k`` is capped at N-1 (N with ``exclude_self=False``)."""
    if feats.ndim != 2:
        raise ValueError(f"features must be [N, C], got shape {tuple(feats.shape)}")
    device = torch.device(device) if device is not None else feats.device
    x = normalize(feats.to(device))
    return topk_blocks(x, x, k, first=0, exclude_self=exclude_self, query_rows=chunk, device=device)


def _stable_topk(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row, best first, equal values in ascending index order.

    ``torch.topk`` (O(N) per row) promises no tie order, so the selection is re-sorted by
    (value desc, index asc); rows where a value equal to the k-th one also lies outside the selection
    (a tie at the boundary: the (k+1)-th largest value equals the k-th) fall back to a full stable sort.
    Exact either way. Per row and candidate it holds the similarity (4 bytes) and, for tied rows, the
    sort (4 + 8): at most 17 bytes with the rows' selection.
    """
    width = sim.shape[1]
    s, i = torch.topk(sim, min(k + 1, width), dim=1)  # one more: it says whether the k-th value is tied outside
    tied = (s[:, k] == s[:, k - 1]) if width > k else torch.zeros(len(sim), dtype=torch.bool, device=sim.device)
    s, i = s[:, :k], i[:, :k]
    order = torch.argsort(i, dim=1)
    s, i = s.gather(1, order), i.gather(1, order)
    order = torch.argsort(s, dim=1, descending=True, stable=True)
    s, i = s.gather(1, order), i.gather(1, order)
    if tied.any():
        fs, fi = torch.sort(sim[tied], dim=1, descending=True, stable=True)
        s[tied], i[tied] = fs[:, :k], fi[:, :k]
    return s, i
