"""Segmenter checkpoints: one self-describing file, local or on s3://, readable with ``weights_only=True``.

Layout (a ``torch.save`` of plain Python containers and tensors only)::

    {"format": "depthg-segmenter/1", "config": <Config as a dict>, "backbone": "dino_vits8",
     "feat_dim": 384, "segmenter": {"code_dim", "n_classes", "extra_clusters", "lhp"},
     "state_dict": {name: tensor}, "extra": <plain data or {}>,
     "backbone_state": {name: tensor}}          # optional: the frozen backbone's own weights

A trained segmenter does not store its frozen backbone: it is rebuilt from ``config.model.backbone`` / ``weights``.
A model imported from the reference (``launch/convert.py``) carries its DINO weights in ``backbone_state``, so it
needs no download. ``load_model`` (backbone + segmenter) and ``load_segmenter`` also read the reference's own
PyTorch Lightning ``.ckpt`` files directly, and ``convert_checkpoint`` writes one as a ``segmenter.pt``
(``depthg.reference`` does the unpickling, safely: no pickled code runs, and the mapping). This module imports
``depthg.reference``, never the reverse; ``CheckpointError`` is defined in ``depthg.errors`` and re-exported here.
"""
from __future__ import annotations

import io as _io
from typing import Any

import torch

from depthg import io, reference
from depthg.config import Config, ConfigError, from_dict, to_dict
from depthg.errors import CheckpointError
from depthg.models.heads import Segmenter

FORMAT = "depthg-segmenter/1"


def save_segmenter(url: str, cfg: Config, segmenter: Segmenter, extra: dict | None = None,
                   backbone_state: dict | None = None) -> None:
    """Atomically write ``segmenter`` (+ its config, ``extra`` plain data and optionally the backbone's tensors)."""
    payload = {
        "format": FORMAT,
        "config": to_dict(cfg),
        "backbone": cfg.model.backbone,
        "feat_dim": segmenter.feat_dim,
        "segmenter": segmenter.describe(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in segmenter.state_dict().items()},
        "extra": extra or {},
    }
    if backbone_state is not None:
        payload["backbone_state"] = {k: v.detach().cpu().contiguous() for k, v in backbone_state.items()}
    buf = _io.BytesIO()
    torch.save(payload, buf)
    io.write_bytes(url, buf.getvalue())


def read_payload(url: str, map_location="cpu") -> Any:
    """The unpickled file: ``weights_only=True`` plus only the inert stand-ins of ``depthg.reference.SAFE_GLOBALS``."""
    if not io.exists(url):
        raise FileNotFoundError(f"checkpoint not found: {url}")
    return reference.safe_torch_load(io.read_bytes(url), url, map_location)


def _read(url: str, map_location, payload: Any = None) -> dict[str, Any]:
    payload = read_payload(url, map_location) if payload is None else payload
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
    """Read a checkpoint written by ``save_segmenter`` (or a reference Lightning ``.ckpt``) -> ``(cfg, segmenter, extra)``."""
    return _load_any(url, map_location)[:3]


def load_model(url: str, map_location="cpu"):
    """``(cfg, backbone, segmenter, extra)`` of a checkpoint: the backbone from the weights the file carries (an
    imported reference model) or else from ``cfg.model.backbone`` / ``weights``, with ``cfg.model.pos_embed``."""
    from depthg.models import build_backbone

    cfg, segmenter, extra, backbone_state = _load_any(url, map_location)
    try:
        backbone = build_backbone(cfg.model.backbone, cfg.model.weights, state=backbone_state,
                                  pos_embed=cfg.model.pos_embed)
    except ValueError as exc:
        if backbone_state is None:
            raise
        raise CheckpointError(f"checkpoint {url}: its backbone weights (net.model.* in a reference file) do not fit "
                              f"{cfg.model.backbone}: {exc}") from exc
    return cfg, backbone, segmenter, extra


def _load_any(url: str, map_location):
    """``(cfg, segmenter, extra, backbone tensors or None)`` of a depthg checkpoint or a reference Lightning one."""
    payload = read_payload(url, map_location)
    if reference.is_lightning(payload):
        cfg, segmenter, backbone_state, extra = reference.import_payload(payload, url)
        return cfg, segmenter, extra, backbone_state
    payload = _read(url, map_location, payload)
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
    return cfg, segmenter, payload.get("extra") or {}, payload.get("backbone_state")


def read_header(url: str) -> dict[str, Any]:
    """The checkpoint's description without building modules: format, backbone, feat_dim, segmenter, config, and
    whether it carries its backbone's weights (``embedded_backbone``)."""
    payload = read_payload(url, "cpu")
    if reference.is_lightning(payload):
        cfg, segmenter, _, extra = reference.import_payload(payload, url)
        return {"format": "lightning", "backbone": cfg.model.backbone, "feat_dim": segmenter.feat_dim,
                "segmenter": segmenter.describe(), "config": to_dict(cfg), "embedded_backbone": True,
                "imported": extra["imported"]}
    payload = _read(url, "cpu", payload)
    header = {k: payload.get(k) for k in ("format", "backbone", "feat_dim", "segmenter", "config")}
    return {**header, "embedded_backbone": "backbone_state" in payload}


def convert_checkpoint(src: str, dst: str) -> dict:
    """Import the reference's Lightning checkpoint ``src`` and write it as a depthg ``segmenter.pt`` at ``dst`` (with
    the backbone's tensors); returns what was imported (``extra["imported"]``, the shapes and how the reference chose
    the file)."""
    payload = read_payload(src, "cpu")
    if not reference.is_lightning(payload):
        raise CheckpointError(f"checkpoint {src} is not a PyTorch Lightning checkpoint (no state_dict with Lightning's "
                              "entries); a depthg segmenter.pt needs no conversion")
    cfg, segmenter, backbone_state, extra = reference.import_payload(payload, src)
    save_segmenter(dst, cfg, segmenter, extra, backbone_state=backbone_state)
    return {**extra["imported"], "backbone": cfg.model.backbone, "code_dim": cfg.model.code_dim,
            "n_classes": cfg.model.n_classes, "extra_clusters": cfg.model.extra_clusters, "lhp": segmenter.lhp is not None,
            "dataset": cfg.data.dataset, "selection": extra.get("criterion", "unknown")}
