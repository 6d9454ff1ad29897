"""An independent transcription of the reference's model and evaluation forward pass, for the import tests.

Written from the public definitions of leonsick/depthg / mhamilton723/STEGO (``src/dino/vision_transformer.py``,
``src/modules.py``: DinoFeaturizer, DinoFeaturizerWithDepth, ClusterLookup; ``src/train_segmentation.py``:
LitUnsupervisedSegmenter; ``src/eval_segmentation.py``), in this project's own words and without any of its code:
module attribute names are the reference's so that ``state_dict()`` has its exact key layout. ``write_lightning_checkpoint`` writes a
``.ckpt`` as PyTorch Lightning does (``hyper_parameters.cfg`` a pickled omegaconf DictConfig, optimizer states,
loops, callbacks).
"""
from __future__ import annotations

import math
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ARCHS = {"vit_small": (384, 6), "vit_base": (768, 12)}


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).unbind(2)  # each [b, n, h, d]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(c // self.heads), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = SelfAttention(dim, heads), FeedForward(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class DinoViT(nn.Module):
    """DINO's ViT with a 224 px (28 x 28) position table; tokens of the last block after the final norm."""

    def __init__(self, arch: str, patch: int = 8, depth: int = 12):
        super().__init__()
        dim, heads = ARCHS[arch]
        self.patch = patch
        self.patch_embed = PatchEmbed(dim, patch)
        side = 224 // patch
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, side * side + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def positions(self, rows: int, cols: int):
        table = self.pos_embed
        n = table.shape[1] - 1
        if rows * cols == n and rows == cols:
            return table
        side, dim = int(math.sqrt(n)), table.shape[-1]
        grid = table[0, 1:].T.reshape(1, dim, side, side)
        # DINO: scale factors (rows + 0.1) / side, (cols + 0.1) / side, bicubic
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic",
                             align_corners=False)
        return torch.cat([table[:, :1], grid.reshape(1, dim, -1).transpose(1, 2)], dim=1)

    def last_tokens(self, img):
        rows, cols = img.shape[2] // self.patch, img.shape[3] // self.patch
        x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.positions(rows, cols)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class Featurizer(nn.Module):
    """DinoFeaturizer: frozen ViT, feature dropout, linear (cluster1) + nonlinear (cluster2) projections."""

    def __init__(self, arch: str, dim: int, nonlinear: bool = True):
        super().__init__()
        self.model = DinoViT(arch)
        n_feats = ARCHS[arch][0]
        self.dropout = nn.Dropout2d(p=0.1)
        self.cluster1 = nn.Sequential(nn.Conv2d(n_feats, dim, 1))
        self.nonlinear = nonlinear
        if nonlinear:
            self.cluster2 = nn.Sequential(nn.Conv2d(n_feats, n_feats, 1), nn.ReLU(), nn.Conv2d(n_feats, dim, 1))

    def forward(self, img):
        tokens = self.model.last_tokens(img)
        rows, cols = img.shape[2] // 8, img.shape[3] // 8
        feat = tokens[:, 1:].reshape(img.shape[0], rows, cols, -1).permute(0, 3, 1, 2)
        code = self.cluster1(self.dropout(feat))
        if self.nonlinear:
            code = code + self.cluster2(self.dropout(feat))
        return self.dropout(feat), code


class ChannelNorm(nn.Module):
    """LayerNorm2d: each pixel's channels normalised, then scaled and shifted per channel."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels)), eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt((x - mean).pow(2).mean(1, keepdim=True) + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class DepthFeaturizer(Featurizer):
    """DinoFeaturizerWithDepth (``arch: dino_depth``) in eval mode, as every evaluation runs it: the depth input is
    zeros and ``sum`` / ``concat`` mix nothing in (those branches need training mode), so the codes are the image
    features'; ``cross_attn`` codes come from a cross-attention whose queries are the learned no-depth embedding and
    whose keys and values are the image tokens. Its depth modules are here for their key layout (ViT-S sizes)."""

    def __init__(self, arch: str, dim: int, nonlinear: bool = True, guidance: str = "sum"):
        super().__init__(arch, dim, nonlinear)
        n_feats = ARCHS[arch][0]
        self.guidance = guidance
        self.depth_downscaling = nn.Sequential(
            nn.Conv2d(1, 64, 2, stride=2), ChannelNorm(64), nn.GELU(), nn.Conv2d(64, 128, 2, stride=2),
            ChannelNorm(128), nn.GELU(), nn.Conv2d(128, n_feats, 2, stride=2))
        self.cross_attn = nn.MultiheadAttention(n_feats, 8, dropout=0.1)
        self.no_depth_embed = nn.Embedding(1, n_feats)

    def forward(self, img):
        feat, _ = super().forward(img)
        if self.guidance == "cross_attn":
            b, c, h, w = feat.shape
            tokens = feat.flatten(2).permute(2, 0, 1)  # [h*w, b, c]
            queries = self.no_depth_embed.weight.view(1, 1, c).expand(h * w, b, c)
            feat = self.cross_attn(queries, tokens, tokens)[0].permute(1, 2, 0).reshape(b, c, h, w)
        code = self.cluster1(self.dropout(feat))
        if self.nonlinear:
            code = code + self.cluster2(self.dropout(feat))
        return self.dropout(feat), code, None


class ClusterLookup(nn.Module):
    def __init__(self, dim: int, n: int):
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(n, dim))

    def log_probs(self, x, alpha: float):
        cos = torch.einsum("bchw,nc->bnhw", F.normalize(x, dim=1), F.normalize(self.clusters, dim=1))
        return torch.log_softmax(alpha * cos, dim=1)


class Projection(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.projection_head = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1))


class LitSegmenter(nn.Module):
    """LitUnsupervisedSegmenter's modules under its attribute names (its ``state_dict`` layout)."""

    def __init__(self, n_classes: int, arch: str = "vit_small", dim: int = 70, extra_clusters: int = 0,
                 nonlinear: bool = True, lhp: bool = False, guidance: str | None = None):
        super().__init__()
        if lhp:
            self.lhp_module = Projection(dim)
        # guidance given: arch dino_depth (DinoFeaturizerWithDepth), else arch dino (DinoFeaturizer)
        self.net = (Featurizer(arch, dim, nonlinear) if guidance is None
                    else DepthFeaturizer(arch, dim, nonlinear, guidance))
        self.train_cluster_probe = ClusterLookup(dim, n_classes)
        self.cluster_probe = ClusterLookup(dim, n_classes + extra_clusters)
        self.linear_probe = nn.Conv2d(dim, n_classes, 1)
        self.decoder = nn.Conv2d(dim, ARCHS[arch][0], 1)


@torch.no_grad()
def reference_eval(model: LitSegmenter, images01: torch.Tensor):
    """The reference's evaluation forward on images in [0, 1] (already resized and cropped):
    -> (codes at the feature grid, cluster log-probs, linear log-probs at the image size)."""
    model.eval()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    img = (images01 - mean) / std
    code = (model.net(img)[1] + model.net(img.flip(dims=[3]))[1].flip(dims=[3])) / 2
    up = F.interpolate(code, img.shape[-2:], mode="bilinear", align_corners=False)
    return code, model.cluster_probe.log_probs(up, 2.0), torch.log_softmax(model.linear_probe(up), dim=1)


def reference_cfg(model_type: str = "vit_small", dim: int = 70, dataset: str = "cocostuff27", **overrides) -> dict:
    """The keys of the reference's Hydra config (src/configs/local_config.yml) that shape the model, plus a few
    of its training keys, as a run of paper_reproduction.sh would have them."""
    cfg = {"output_root": "/outputs", "data_dir": "/datasets", "experiment_name": "exp1", "log_dir": "cocostuff27",
           "use_depth": True, "depth_type": "zoedepth", "guidance": "none", "depth_feat_correlation_loss": True,
           "depth_sampling": "fps", "lhp": False, "propagation_strategy": "depth", "batch_size": 32,
           "num_neighbors": 7, "dataset_name": dataset, "crop_type": "five", "res": 224, "extra_clusters": 0,
           "model_type": model_type, "arch": "dino", "dino_feat_type": "feat", "projection_type": "nonlinear",
           "dino_patch_size": 8, "granularity": 1, "continuous": True, "dim": dim, "dropout": True,
           "pretrained_weights": None, "pointwise": True, "feature_samples": 11, "neg_samples": 5,
           "pos_intra_shift": 0.07, "lr": 5e-4, "full_name": "${log_dir}/cocostuff27_exp1"}
    cfg.update(overrides)
    return cfg


def _old_lightning_callback_class():
    """A class that pickles as ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` (Lightning < 1.5
    keyed callback states by the callback's class)."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    if name not in sys.modules:
        for part in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
            sys.modules.setdefault(part, types.ModuleType(part))
        cls = type("ModelCheckpoint", (), {"__module__": name})
        sys.modules[name].ModelCheckpoint = cls
    return sys.modules[name].ModelCheckpoint


def write_lightning_checkpoint(path: str, model: LitSegmenter, n_classes: int, cfg, old_callbacks: bool = False,
                               state_dict: dict | None = None) -> None:
    """Save ``model`` as Lightning's ``ModelCheckpoint`` would (``trainer.save_checkpoint`` layout); ``cfg`` a dict
    (saved as an omegaconf DictConfig, as Hydra hands it to the module) or any object to pickle in its place."""
    from omegaconf import OmegaConf

    dcfg = cfg
    if isinstance(cfg, dict):
        dcfg = OmegaConf.create(cfg)
        OmegaConf.set_struct(dcfg, False)
    head = [p for n, p in model.named_parameters() if not n.startswith("net.model.")]
    optims = [torch.optim.Adam(head, lr=5e-4), torch.optim.Adam(model.linear_probe.parameters(), lr=5e-3),
              torch.optim.Adam(model.cluster_probe.parameters(), lr=5e-3)]
    for opt in optims:  # one step, so the states hold tensors like a trained run's
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    # the reference's train_segmentation.py: Potsdam files are chosen on cluster accuracy, the others on cluster mIoU
    metric = "test/cluster/Accuracy" if isinstance(cfg, dict) and cfg.get("dataset_name") == "potsdam" else "test/cluster/mIoU"
    monitor = {"monitor": metric, "best_model_score": torch.tensor(25.6), "best_model_path": "/ckpt/a.ckpt",
               "current_score": torch.tensor(24.9), "dirpath": "/ckpt", "best_k_models": {"/ckpt/a.ckpt": torch.tensor(25.6)},
               "kth_best_model_path": "/ckpt/b.ckpt", "kth_value": torch.tensor(24.0), "last_model_path": "/ckpt/last.ckpt"}
    key = _old_lightning_callback_class() if old_callbacks else (
        f"ModelCheckpoint{{'monitor': '{metric}', 'mode': 'max', 'every_n_train_steps': 5}}")
    payload = {"epoch": 3, "global_step": 7000, "pytorch-lightning_version": "1.4.9" if old_callbacks else "2.0.2",
               "state_dict": state_dict if state_dict is not None else model.state_dict(),
               "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 2334},
                                      "epoch_loop.batch_progress": {"total": {"ready": 2334, "completed": 2334},
                                                                    "is_last_batch": False}}},
               "callbacks": {key: monitor}, "optimizer_states": [o.state_dict() for o in optims], "lr_schedulers": [],
               "hparams_name": "kwargs", "hyper_parameters": {"n_classes": n_classes, "cfg": dcfg}}
    torch.save(payload, path)
