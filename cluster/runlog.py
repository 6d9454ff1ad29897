"""Rank-0 logging of a training run: the one gate for its side effects.

``RankZeroLog`` writes, on rank 0 only, a tqdm bar (batches, samples/s), TensorBoard events under
``{output}/tb`` and ``{output}/metrics.jsonl`` (one JSON row per logged batch: every loss term, lambda,
b_depth, S, learning rates, data counters, validation scores). Other ranks get no-ops. For an s3://
output the files are written to a local folder and uploaded by ``flush`` (at every checkpoint and at
the end); a resumed run keeps the rows of the batches before its start.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from cluster.engine import global_batch
from depthg import io
from depthg.config import Config
from depthg.world import World


class RankZeroLog:
    """Every rank-0-only side effect of training goes through here; other ranks get no-ops."""

    def __init__(self, cfg: Config, world: World, total: int, start: int):
        self.enabled, self.output = world.is_main, cfg.train.output
        self.local = self.output if not io.is_remote(self.output) else tempfile.mkdtemp(prefix="depthg-log-")
        self.samples_per_batch = global_batch(cfg, world)
        self.bar = self.writer = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        os.makedirs(self.local, exist_ok=True)
        self._keep_history(start)
        self.writer = SummaryWriter(os.path.join(self.local, "tb"))
        self.bar = tqdm(total=total, initial=start, desc="train", unit="batch", dynamic_ncols=True)
        self.t0, self.n0 = time.time(), start

    def _keep_history(self, start: int) -> None:
        """metrics.jsonl keeps the rows of batches before ``start`` (a resumed run continues it)."""
        url, path = io.join(self.output, "metrics.jsonl"), os.path.join(self.local, "metrics.jsonl")
        rows = []
        if start > 0 and io.exists(url):
            rows = [r for r in io.read_bytes(url).decode().splitlines() if r.strip() and json.loads(r)["batch"] < start]
        with open(path, "w") as fh:
            fh.writelines(r + "\n" for r in rows)

    def metrics(self, batch_idx: int, values: dict) -> None:
        if not self.enabled:
            return
        rate = (batch_idx + 1 - self.n0) * self.samples_per_batch / max(time.time() - self.t0, 1e-9)
        values = {**values, "samples_per_s": rate}
        for key, value in values.items():
            self.writer.add_scalar(key.replace(".", "/"), value, batch_idx)
        with open(os.path.join(self.local, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps({"batch": batch_idx, **values}) + "\n")
        if "total" in values:
            self.bar.set_postfix(loss=f"{values['total']:.4f}", sps=f"{rate:.1f}")

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def flush(self) -> None:
        """Push metrics.jsonl and TensorBoard files to a remote output (local outputs are live)."""
        if not self.enabled:
            return
        self.writer.flush()
        if io.is_remote(self.output):
            for dirpath, _, files in os.walk(self.local):
                for name in files:
                    rel = os.path.relpath(os.path.join(dirpath, name), self.local)
                    io.put_file(os.path.join(dirpath, name), io.join(self.output, *rel.split(os.sep)))

    def print(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self.writer.close()
            self.bar.close()
