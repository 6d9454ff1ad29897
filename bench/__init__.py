"""Benchmarks: each module prints a table and writes JSON beside it in ``bench/`` (never timed assertions in tests).

``python launch/benchmark.py NAME`` runs ``bench/NAME.py`` (``add_arguments(parser)``, ``run(args) -> dict``).
The package sits above ``cluster/`` and ``depthg/`` (it imports them, nothing there imports it).
"""
from __future__ import annotations

import os
import platform


def machine() -> dict:
    """The machine a result was measured on (stored in every JSON)."""
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg": [round(x, 2) for x in os.getloadavg()],  # 1, 5, 15 min when the result was written
    }
