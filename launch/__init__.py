"""Thin entry scripts; each exposes ``main(argv=None)``. An installed package (``pip install -e .``), so the
scripts import ``depthg``, ``cluster``, ``bench`` and each other without touching ``sys.path``."""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.yaml")  # used when a script gets no --config
