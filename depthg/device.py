"""The one device picker of the project (``auto | cpu | cuda``); the trainer adds only the rank's GPU choice
(``cluster.distributed.pick_device``)."""
from __future__ import annotations

import torch

from depthg.config import DeviceChoice, choices

DEVICES = choices(DeviceChoice)


def resolve_device(device: str = "auto", index: int = 0) -> torch.device:
    """``auto``: GPU ``index`` (modulo the visible GPUs) when torch sees one, else the CPU; ``cpu``; ``cuda``
    (an error naming the setting when torch sees no GPU). ``""`` counts as ``auto``."""
    device = device or "auto"
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device")
    return torch.device("cuda", index % torch.cuda.device_count())
