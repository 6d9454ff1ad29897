"""The base of the project's own error types.

Every error that tells a user what to fix (a config key, a file, a shard, a checkpoint, a storage URL)
derives from ``DepthgError`` as well as from the builtin it always was (``ValueError``, ``OSError``), so
callers catching the builtin keep working and the scripts in ``launch/`` print it as one ``error: ...``
line instead of a traceback (``launch.run``; ``--debug`` or ``DEPTHG_DEBUG=1`` shows the traceback).
Most live beside the code that raises them; ``ConfigError`` and ``CheckpointError`` live here because modules
below ``depthg.config`` / ``depthg.checkpoint`` (``depthg.overrides``, ``depthg.reference``) raise them too.
"""
from __future__ import annotations


class DepthgError(Exception):
    """An error whose message names what to fix; shown to users without a traceback."""


class ConfigError(DepthgError, ValueError):
    """A config key or value that cannot be accepted; the message names the key (``depthg.config`` re-exports it)."""


class CheckpointError(DepthgError, ValueError):
    """A checkpoint that cannot be read or does not match; the message names the file (``depthg.checkpoint``
    re-exports it; defined here so that ``depthg.reference`` raises it without importing ``depthg.checkpoint``)."""
