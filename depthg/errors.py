"""The base of the project's own error types.

Every error that tells a user what to fix (a config key, a file, a shard, a checkpoint, a storage URL)
derives from ``DepthgError`` as well as from the builtin it always was (``ValueError``, ``OSError``), so
callers catching the builtin keep working and the scripts in ``launch/`` print it as one ``error: ...``
line instead of a traceback (``launch.run``; ``--debug`` or ``DEPTHG_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations


class DepthgError(Exception):
    """An error whose message names what to fix; shown to users without a traceback."""
