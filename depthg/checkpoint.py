"""Segmenter checkpoints: one self-describing file, local or on s3://, readable with ``weights_only=True``.

Layout (a ``torch.save`` of plain Python containers and tensors only)::

    {"format": "depthg-segmenter/1", "config": <Config as a dict>, "backbone": "dino_vits8",
     "feat_dim": 384, "segmenter": {"code_dim", "n_classes", "extra_clusters", "lhp"},
     "state_dict": {name: tensor}, "extra": <plain data or {}>}

The backbone is not stored (it is frozen): it is rebuilt from ``config.model.backbone`` / ``weights``.
"""
from __future__ import annotations

import io as _io
from typing import Any

import torch

from depthg import io
from depthg.config import Config, ConfigError, from_dict, to_dict
from depthg.errors import DepthgError
from depthg.models.heads import Segmenter

FORMAT = "depthg-segmenter/1"


class CheckpointError(DepthgError, ValueError):
    """A checkpoint that cannot be read or does not match; the message names the file."""


def save_segmenter(url: str, cfg: Config, segmenter: Segmenter, extra: dict | None = None) -> None:
    """Atomically write ``segmenter`` (+ its config and ``extra`` plain data) to ``url``."""
    payload = {
        "format": FORMAT,
        "config": to_dict(cfg),
        "backbone": cfg.model.backbone,
        "feat_dim": segmenter.feat_dim,
        "segmenter": segmenter.describe(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in segmenter.state_dict().items()},
        "extra": extra or {},
    }
    buf = _io.BytesIO()
    torch.save(payload, buf)
    io.write_bytes(url, buf.getvalue())


def _read(url: str, map_location) -> dict[str, Any]:
    data = io.read_bytes(url)
    try:
        payload = torch.load(_io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - rewrapped with the file name
        raise CheckpointError(f"checkpoint {url} cannot be read as a depthg segmenter: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {url}: format {found!r}, expected {FORMAT!r}")
    missing = [k for k in ("config", "feat_dim", "segmenter", "state_dict") if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {url}: missing entries {', '.join(missing)}")
    return payload


def _check_state(url: str, segmenter: Segmenter, state: dict[str, torch.Tensor]) -> None:
    own = segmenter.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    if problems:
        raise CheckpointError(f"checkpoint {url} does not match its segmenter description: {'; '.join(problems[:8])}")


def load_segmenter(url: str, map_location="cpu") -> tuple[Config, Segmenter, dict]:
    """Read a checkpoint written by ``save_segmenter`` -> ``(cfg, segmenter, extra)``."""
    payload = _read(url, map_location)
    try:
        cfg = from_dict(Config, payload["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {url}: its config is not valid here: {exc}") from exc
    desc = payload["segmenter"]
    model = cfg.model
    stated = (desc.get("code_dim"), desc.get("n_classes"), desc.get("extra_clusters"))
    if stated != (model.code_dim, model.n_classes, model.extra_clusters):
        raise CheckpointError(f"checkpoint {url}: segmenter (code_dim, n_classes, extra_clusters) = {stated} "
                              f"but its config says {(model.code_dim, model.n_classes, model.extra_clusters)}")
    segmenter = Segmenter(int(payload["feat_dim"]), model.code_dim, model.n_classes, model.extra_clusters,
                          bool(desc.get("lhp", False)))
    _check_state(url, segmenter, payload["state_dict"])
    segmenter.load_state_dict(payload["state_dict"], strict=True)
    if isinstance(map_location, (str, torch.device)):
        segmenter = segmenter.to(map_location)
    return cfg, segmenter, payload.get("extra") or {}


def read_header(url: str) -> dict[str, Any]:
    """The checkpoint's description without building modules: format, backbone, feat_dim, segmenter, config."""
    payload = _read(url, "cpu")
    return {k: payload.get(k) for k in ("format", "backbone", "feat_dim", "segmenter", "config")}
