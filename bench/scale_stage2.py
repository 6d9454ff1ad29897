"""Scale places of stage 2 (``bench/scale.py`` runs, fits and reports them): each ``place(n)`` builds the inputs
one process receives at ``n`` crops and returns the zero-argument work that is measured."""
from __future__ import annotations

import numpy as np

PER_SHARD = 320  # crops per shard (64 images x 5 crops, as stage 1 writes COCO)


def synthetic_sidecars(n: int, per_shard: int = PER_SHARD, seed: int = 0) -> list[dict]:
    """Sidecars of ``n`` crops in shards of ``per_shard``: offsets of samples of ~30 kB, as JSON would load them."""
    rng = np.random.default_rng(seed)
    infos = []
    for index, start in enumerate(range(0, n, per_shard)):
        count = min(per_shard, n - start)
        sizes = rng.integers(20_000, 40_000, count)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        infos.append({"name": f"shard-{index:06d}.tar", "count": count, "offsets": offsets.tolist(),
                      "prefix": (offsets[:-1] + sizes // 2).tolist()})
    return infos


def offsets_table(n: int):
    """The driver builds the split's offsets table from every sidecar and serialises it (``write_index``)."""
    from depthg.shards import OffsetsTable

    infos = synthetic_sidecars(n)

    def work() -> dict:
        data = OffsetsTable.from_sidecars(infos).to_bytes()
        return {"table_bytes": len(data)}

    return work
