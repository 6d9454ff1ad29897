"""Thin entry scripts; each exposes ``main(argv=None)``. An installed package (``pip install -e .``), so the
scripts import ``depthg``, ``cluster``, ``bench`` and each other without touching ``sys.path``."""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.yaml")  # used when a script gets no --config


def run(main) -> None:
    """Run a script's ``main()`` as a command: the project's own errors (``depthg.errors.DepthgError``) and
    missing files print ONE line, ``error: <message>``, and exit with status 2; ``--debug`` (anywhere on the
    command line) or ``DEPTHG_DEBUG=1`` shows the traceback instead. Other exceptions are bugs: traceback."""
    import sys

    from depthg.errors import DepthgError

    debug = "--debug" in sys.argv[1:] or os.environ.get("DEPTHG_DEBUG") == "1"
    argv = [a for a in sys.argv[1:] if a != "--debug"]
    try:
        main(argv)
    except (DepthgError, FileNotFoundError) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
