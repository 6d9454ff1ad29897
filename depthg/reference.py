"""Import the reference's trained models: PyTorch Lightning checkpoints of DepthG's / STEGO's ``LitUnsupervisedSegmenter``.

leonsick/depthg and mhamilton723/STEGO publish their models as Lightning ``.ckpt`` files: a pickle of
``{"state_dict", "hyper_parameters": {"n_classes", "cfg"}, "epoch", "global_step", "optimizer_states", "loops",
"callbacks", ...}`` where ``cfg`` is the run's Hydra config, an omegaconf ``DictConfig``. This module turns one
into this project's ``Config`` + ``Segmenter`` + the DINO backbone tensors the file carries (no download).
``depthg.checkpoint`` reads files with it (``load_model``, ``load_segmenter``, ``read_header``,
``convert_checkpoint``); this module never imports ``depthg.checkpoint``.

Safety: the file is read with ``torch.load(weights_only=True)``; the only extra classes the unpickler may name are
``SAFE_GLOBALS`` (omegaconf's containers, nodes and metadata, ``typing.Any``, a few builtins, Lightning's callback
classes used as dictionary keys), each replaced by an inert stand-in (``Pickled``) that stores what the pickle
gives it and runs none of the named class's code; ``collections.defaultdict`` becomes a plain dict. Anything else
(``os.system``, a module's function, another class) makes torch refuse the file, and ``safe_torch_load`` raises
a ``CheckpointError`` naming what it needed.

Key layout of the reference module (``state_dict``), written from its public definitions:

=====================================================  ==============================================
reference key                                          here
=====================================================  ==============================================
``net.model.*`` (DINO ViT, DINO's own key layout)      the backbone (``backbone_state``)
``net.cluster1.0.{weight,bias}``                       ``head.linear.*`` (the linear projection)
``net.cluster2.{0,2}.{weight,bias}``                   ``head.nonlinear.{0,2}.*`` (``projection_type: nonlinear``)
``cluster_probe.clusters`` [n_classes+extra, dim]      ``cluster_probe.centroids``
``linear_probe.{weight,bias}``                         ``linear_probe.conv.*``
``lhp_module.projection_head.{0,2}.*`` (``cfg.lhp``)   ``lhp.net.{0,2}.*`` (kept; unused at inference,
                                                       as in the reference's evaluation)
``train_cluster_probe.clusters``, ``decoder.*``,       known, not used at inference: ignored
``*_metrics.{stats,cherry_stats}``, and for
``arch: dino_depth`` (``guidance`` none, sum or
concat) ``net.{depth_downscaling,cross_attn,
no_depth_embed}.*``
=====================================================  ==============================================

``arch: dino_depth`` (the reference's ``DinoFeaturizerWithDepth``) adds its depth features to the image features
only in training mode (``guidance: sum``; its ``concat`` branch is empty); in eval mode the codes of ``none``, ``sum``
and ``concat`` are those of the image features, so such a file is imported as a ``dino`` one. ``guidance: cross_attn`` is refused: its evaluation codes
go through a cross-attention with a learned embedding (``net.cross_attn``, ``net.no_depth_embed``).

Any other key, or a missing one, is an error naming it. At inference the reference evaluates ``model.net`` in
eval mode: feature dropout off, codes = linear(feats) + nonlinear(feats), no LHP projection; 320 px, flip
averaging, bilinear upsampling, ``log_softmax(2 cos)`` cluster probe, CRF (docs/IMPORT.md).
"""
from __future__ import annotations

import io as _io
import re
from typing import Any

import torch

from depthg.config import Config
from depthg.errors import CheckpointError
from depthg.models.heads import Segmenter

DATASETS = {"cocostuff27": "cocostuff27", "cityscapes": "cityscapes", "potsdam": "potsdam", "potsdamraw": "potsdam",
            "directory": "folder"}
BACKBONES = {("vit_small", 8): ("dino_vits8", 384), ("vit_base", 8): ("dino_vitb8", 768)}
EVAL_RESOLUTION = 320  # the reference's eval_config.yml (res: 320)


# ----------------------------------------------------------------------------- safe unpickling
class Pickled:
    """Inert stand-in for an object of an allowed class: keeps the constructor arguments and pickled state."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.__dict__["args"] = args
        return obj

    def __setstate__(self, state) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<pickled {self.qualname}>"


def _stub(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (Pickled,), {"qualname": qualname})


def _plain_dict(*_args) -> dict:
    """``collections.defaultdict(factory)`` read back as a plain dict (the factory is never called)."""
    return {}


_OMEGACONF = ["omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.Metadata",
              "omegaconf.base.ContainerMetadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode",
              "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode",
              "omegaconf.nodes.BytesNode", "omegaconf.nodes.PathNode", "omegaconf.nodes.EnumNode",
              "omegaconf.nodes.UnionNode", "omegaconf.nodes.InterpolationResultNode"]
_LIGHTNING_KEYS = [f"{pkg}.callbacks.{mod}.{cls}" for pkg in ("pytorch_lightning", "lightning.pytorch")
                   for mod, cls in (("model_checkpoint", "ModelCheckpoint"), ("early_stopping", "EarlyStopping"),
                                    ("lr_monitor", "LearningRateMonitor"), ("progress.tqdm_progress", "TQDMProgressBar"))]
SAFE_GLOBALS: dict[str, Any] = {
    **{name: _stub(name) for name in _OMEGACONF + _LIGHTNING_KEYS + ["typing.Any"]},
    "collections.defaultdict": _plain_dict,
    **{f"builtins.{t.__name__}": t for t in (int, float, str, bool, dict, list, tuple)},
}


def safe_torch_load(data: bytes, url: str, map_location="cpu") -> Any:
    """``torch.load(weights_only=True)`` of ``data`` with only ``SAFE_GLOBALS`` added; CheckpointError otherwise."""
    allowed = [(obj, name) for name, obj in SAFE_GLOBALS.items()]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(_io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - rewrapped with the file name and what it needed
        text = str(exc)
        found = re.search(r"GLOBAL (\S+)", text) or re.search(r"(?:function|got) (<[^>]+>|\S+)", text)
        if found:
            raise CheckpointError(
                f"checkpoint {url} refused: loading it needs {found.group(1).rstrip('.')}, which is not among the "
                "classes a model checkpoint may hold (depthg.reference.SAFE_GLOBALS); nothing from the file was "
                "run") from exc
        raise CheckpointError(f"checkpoint {url} cannot be read: {type(exc).__name__}: {text.splitlines()[0]}") from exc


def plain(obj: Any) -> Any:
    """The stand-ins of an unpickled omegaconf tree -> plain dicts, lists and values."""
    if isinstance(obj, Pickled):
        state = obj.__dict__.get("state")
        if isinstance(state, dict) and "_content" in state:  # DictConfig / ListConfig
            return plain(state["_content"])
        if isinstance(state, dict) and "_val" in state:  # a value node
            return plain(state["_val"])
        return obj.qualname
    if isinstance(obj, dict):
        return {k if isinstance(k, (str, int, float, bool)) else repr(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def _resolve(cfg: dict) -> dict:
    """Resolve plain ``${key}`` interpolations against the top level (what Hydra overrides can leave)."""
    def value(v, depth=0):
        m = re.fullmatch(r"\$\{([\w.]+)\}", v) if isinstance(v, str) else None
        if not m or depth > 8:
            return v
        node: Any = cfg
        for part in m.group(1).split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return value(node, depth + 1)

    return {k: value(v) for k, v in cfg.items()}


# ----------------------------------------------------------------------------- format detection and config
def is_lightning(payload: Any) -> bool:
    """True for a Lightning checkpoint (``state_dict`` + Lightning's bookkeeping, no depthg ``format``)."""
    return (isinstance(payload, dict) and "format" not in payload and isinstance(payload.get("state_dict"), dict)
            and any(k in payload for k in ("pytorch-lightning_version", "hyper_parameters", "global_step")))


def reference_config(payload: dict, url: str) -> tuple[int, dict]:
    """``(n_classes, cfg as plain data)`` from the checkpoint's ``hyper_parameters``."""
    hp = payload.get("hyper_parameters")
    if not isinstance(hp, dict) or "n_classes" not in hp or "cfg" not in hp:
        found = sorted(hp) if isinstance(hp, dict) else type(hp).__name__
        raise CheckpointError(f"checkpoint {url}: 'hyper_parameters' must hold 'n_classes' and 'cfg' (the reference's "
                              f"LitUnsupervisedSegmenter(n_classes, cfg)); found {found}")
    cfg = plain(hp["cfg"])
    if not isinstance(cfg, dict):
        raise CheckpointError(f"checkpoint {url}: hyper_parameters.cfg is {type(cfg).__name__}, expected a config mapping")
    return int(plain(hp["n_classes"])), _resolve(cfg)


def _need(rcfg: dict, key: str, url: str, allowed=None):
    if key not in rcfg:
        raise CheckpointError(f"checkpoint {url}: hyper_parameters.cfg has no '{key}'")
    value = rcfg[key]
    if allowed is not None and value not in allowed:
        raise CheckpointError(f"checkpoint {url}: hyper_parameters.cfg.{key} = {value!r}; this import supports "
                              f"{', '.join(repr(a) for a in allowed)}")
    return value


def _check_dino_depth_guidance(rcfg: dict, url: str) -> None:
    """Refuse an ``arch: dino_depth`` run unless its evaluation codes come from the image features alone.

    The reference's ``DinoFeaturizerWithDepth`` mixes its depth features into the image features only in training
    mode for ``sum`` and ``concat``; in eval mode (all of its evaluation) both fall through to the image features,
    like ``none``. ``cross_attn`` evaluates a cross-attention of its learned no-depth embedding over the image
    features (``net.cross_attn``, ``net.no_depth_embed``), which this import does not implement: refused."""
    guidance = rcfg.get("guidance", "none")
    if guidance == "cross_attn":
        raise CheckpointError(f"checkpoint {url}: hyper_parameters.cfg.guidance = 'cross_attn' (arch dino_depth): its "
                              "codes at evaluation pass through the reference's cross-attention of a learned no-depth "
                              "embedding, which this import does not implement; it supports guidance 'none', 'sum' "
                              "and 'concat' (codes from the image features, as the reference evaluates them)")
    if guidance not in ("none", "sum", "concat"):
        raise CheckpointError(f"checkpoint {url}: hyper_parameters.cfg.guidance = {guidance!r} (arch dino_depth); this "
                              "import supports 'none', 'sum', 'concat'")


def to_config(n_classes: int, rcfg: dict, url: str) -> Config:
    """This project's ``Config`` for the reference run ``rcfg``: the backbone and head shapes from the checkpoint's
    own config, evaluation as the reference's (320 px, flip, CRF), DINO's position-table interpolation."""
    if _need(rcfg, "arch", url, ("dino", "dino_depth")) == "dino_depth":
        _check_dino_depth_guidance(rcfg, url)
    _need(rcfg, "dino_feat_type", url, ("feat",))
    _need(rcfg, "projection_type", url, ("nonlinear", "linear"))
    key = (_need(rcfg, "model_type", url, ("vit_small", "vit_base")), int(_need(rcfg, "dino_patch_size", url, (8,))))
    cfg = Config()
    cfg.model.backbone = BACKBONES[key][0]
    cfg.model.code_dim = int(_need(rcfg, "dim", url)) if rcfg.get("continuous", True) else int(n_classes)
    cfg.model.n_classes, cfg.model.extra_clusters = int(n_classes), int(rcfg.get("extra_clusters", 0) or 0)
    cfg.model.pos_embed = "dino"
    cfg.data.dataset = DATASETS.get(str(rcfg.get("dataset_name", "")), "folder")
    cfg.data.resolution = int(rcfg.get("res", cfg.data.resolution))
    cfg.eval.resolution, cfg.eval.flip, cfg.eval.crf = EVAL_RESOLUTION, True, True
    cfg.loss.lhp.enabled = bool(rcfg.get("lhp", False))
    return cfg


# ----------------------------------------------------------------------------- state dict
HEAD_KEYS = {"net.cluster1.0.weight": "head.linear.weight", "net.cluster1.0.bias": "head.linear.bias",
             "cluster_probe.clusters": "cluster_probe.centroids",
             "linear_probe.weight": "linear_probe.conv.weight", "linear_probe.bias": "linear_probe.conv.bias"}
NONLINEAR_KEYS = {f"net.cluster2.{i}.{p}": f"head.nonlinear.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
LHP_KEYS = {f"lhp_module.projection_head.{i}.{p}": f"lhp.net.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
IGNORED = re.compile(r"^(train_cluster_probe\.clusters|decoder\.(weight|bias)"
                     r"|(test_)?(cluster|linear)_metrics\.(stats|cherry_stats))$")
DEPTH_ARCH_UNUSED = re.compile(r"^net\.(depth_downscaling|cross_attn|no_depth_embed)\.")


def split_state(state: dict, rcfg: dict, url: str) -> tuple[dict, dict]:
    """``(backbone tensors in DINO's layout, segmenter tensors under this project's names)``; unknown and missing
    keys raise naming them."""
    wanted = dict(HEAD_KEYS)
    if rcfg.get("projection_type") == "nonlinear":
        wanted.update(NONLINEAR_KEYS)
    if rcfg.get("lhp"):
        wanted.update(LHP_KEYS)
    backbone, segmenter, unknown = {}, {}, []
    for key, tensor in state.items():
        if key.startswith("net.model."):
            backbone[key[len("net.model."):]] = tensor
        elif key in wanted:
            segmenter[wanted[key]] = tensor
        elif not (IGNORED.match(key) or (rcfg.get("arch") == "dino_depth" and DEPTH_ARCH_UNUSED.match(key))):
            unknown.append(key)
    missing = [k for k in wanted if k not in state] + ([] if backbone else ["net.model.* (the DINO backbone)"])
    if unknown or missing:
        parts = [f"unknown keys {', '.join(sorted(unknown)[:10])}" + (" ..." if len(unknown) > 10 else "")] if unknown else []
        parts += [f"missing keys {', '.join(missing[:10])}"] if missing else []
        raise CheckpointError(f"checkpoint {url} does not have the reference's key layout "
                              f"(projection_type={rcfg.get('projection_type')}, lhp={bool(rcfg.get('lhp'))}): "
                              + "; ".join(parts))
    return backbone, segmenter


def build_segmenter(cfg: Config, feat_dim: int, tensors: dict, url: str) -> Segmenter:
    """The ``Segmenter`` holding the reference's head, probes (and LHP projection); a linear-only projection gets a
    zero nonlinear branch, so its codes are exactly the linear branch's."""
    model = cfg.model
    segmenter = Segmenter(feat_dim, model.code_dim, model.n_classes, model.extra_clusters, cfg.loss.lhp.enabled)
    own = segmenter.state_dict()
    for name in own:
        if name.startswith("head.nonlinear.") and name not in tensors:
            tensors[name] = torch.zeros_like(own[name])
    reverse = {v: k for k, v in {**HEAD_KEYS, **NONLINEAR_KEYS, **LHP_KEYS}.items()}
    bad = [f"{reverse.get(k, k)}: {tuple(t.shape)}, expected {tuple(own[k].shape)}"
           for k, t in tensors.items() if k in own and tuple(t.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"checkpoint {url}: tensor shapes differ from what its config implies "
                              f"(dim {model.code_dim}, {model.n_classes} classes + {model.extra_clusters} extra "
                              f"clusters, {feat_dim}-d features): {'; '.join(bad[:6])}")
    segmenter.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return segmenter.eval()


MONITORS = {"test/cluster/mIoU": "val_miou", "test/cluster/Accuracy": "val_accuracy"}  # its train_segmentation.py


def _selection(payload: dict) -> dict:
    """How the reference chose this file: its ModelCheckpoint callback's monitor (validation labels): cluster mIoU,
    cluster accuracy for Potsdam; ``select`` names it in this project's words (``val_miou`` / ``val_accuracy``)."""
    for key, state in (payload.get("callbacks") or {}).items():
        if "ModelCheckpoint" in str(plain(key)) and isinstance(state, dict) and state.get("monitor"):
            monitor = str(plain(state["monitor"]))
            return {"select": MONITORS.get(monitor, "reference"), "uses_labels": True,
                    "batch": payload.get("global_step"),
                    "criterion": f"the reference's ModelCheckpoint (monitor {monitor})"}
    return {"select": "none"}


def import_payload(payload: dict, url: str) -> tuple[Config, Segmenter, dict, dict]:
    """``(cfg, segmenter, backbone tensors in DINO's layout, extra)`` of a loaded Lightning checkpoint."""
    n_classes, rcfg = reference_config(payload, url)
    cfg = to_config(n_classes, rcfg, url)
    backbone_state, tensors = split_state(payload["state_dict"], rcfg, url)
    segmenter = build_segmenter(cfg, BACKBONES[(rcfg["model_type"], 8)][1], tensors, url)
    kind = "depthg" if any(k in rcfg for k in ("use_depth", "depth_feat_correlation_loss", "depth_sampling")) else "stego"
    imported = {"source": url, "reference": kind, "experiment_name": rcfg.get("experiment_name"),
                "dataset_name": rcfg.get("dataset_name"), "epoch": payload.get("epoch"),
                "global_step": payload.get("global_step"),
                "lightning_version": payload.get("pytorch-lightning_version"),
                "reference_config": {k: v for k, v in rcfg.items() if isinstance(v, (str, int, float, bool, type(None)))}}
    return cfg, segmenter, backbone_state, {**_selection(payload), "imported": imported}
