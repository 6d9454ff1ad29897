"""The process layout of a training job: one ``World`` value, detected once, passed down.

``depthg`` never reads the environment to learn its rank: ``cluster.world.detect()`` builds a
``World`` from whatever launcher started the process (torchrun, deepspeed, Ray Train) and the
library receives it as an argument. The default ``World()`` is a single process.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0  # global rank in [0, world_size)
    world_size: int = 1
    local_rank: int = 0  # rank within the node (selects the GPU)
    node: int = 0  # node index in [0, num_nodes)
    num_nodes: int = 1

    def __post_init__(self):
        if not (self.world_size >= 1 and 0 <= self.rank < self.world_size):
            raise ValueError(f"World: rank {self.rank} outside [0, {self.world_size})")
        if not (self.num_nodes >= 1 and 0 <= self.node < self.num_nodes):
            raise ValueError(f"World: node {self.node} outside [0, {self.num_nodes})")
        if self.local_rank < 0:
            raise ValueError(f"World: local_rank {self.local_rank} must be >= 0")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process allowed side effects (logs, checkpoint markers, final files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1
