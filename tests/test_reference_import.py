"""Importing the reference's Lightning checkpoints (depthg/reference.py): fidelity to the reference's forward pass,
safety of the unpickling, key and config errors, convert / evaluate / segment on a .ckpt."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import reference_impl as R
from depthg import evaluation, inference, shards
from depthg.checkpoint import CheckpointError, load_model, load_segmenter, read_header
from depthg.models.backbones import dino_position_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checkpoint(path, n_classes=27, model_type="vit_small", dim=70, extra=0, seed=0, state_edit=None, old_callbacks=False,
                **cfg):
    """A Lightning checkpoint of a randomly initialised reference model, and that model."""
    torch.manual_seed(seed)
    model = R.LitSegmenter(n_classes, model_type, dim, extra, nonlinear=cfg.get("projection_type", "nonlinear") == "nonlinear",
                           lhp=cfg.get("lhp", False),
                           guidance=cfg.get("guidance", "none") if cfg.get("arch") == "dino_depth" else None)
    state = model.state_dict()
    if state_edit:
        state = state_edit(dict(state))
    R.write_lightning_checkpoint(str(path), model, n_classes, R.reference_cfg(model_type, dim, extra_clusters=extra, **cfg),
                                 old_callbacks=old_callbacks, state_dict=state)
    return str(path), model


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reference_input(image: np.ndarray, res: int) -> torch.Tensor:
    """The reference's eval transform: T.Resize(res, NEAREST) + T.CenterCrop(res) + ToTensor (before normalize)."""
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(res, T.InterpolationMode.NEAREST), T.CenterCrop(res), T.ToTensor()])
    return tf(Image.fromarray(image))[None]


def _ours(backbone, segmenter, image, res):
    x, _ = evaluation.collate([evaluation.prepare({"image": image}, res)])
    with torch.no_grad():
        codes = evaluation.compute_codes(backbone, segmenter.head, x, True)
        scores = evaluation.probe_scores(segmenter, codes, (res, res))
    return x, codes, scores["cluster"], torch.log_softmax(scores["linear"], dim=1)


def test_vits8_at_320_equals_the_reference_forward_pass(tmp_path):
    url, ref = _checkpoint(tmp_path / "cocostuff_vits.ckpt", n_classes=27, extra=3)
    cfg, backbone, segmenter, extra = load_model(url)
    assert (cfg.model.backbone, cfg.model.code_dim, cfg.model.n_classes, cfg.model.extra_clusters) == ("dino_vits8", 70, 27, 3)
    assert cfg.model.pos_embed == "dino" and (cfg.eval.resolution, cfg.eval.flip, cfg.eval.crf) == (320, True, True)
    assert extra["uses_labels"] and extra["imported"]["reference"] == "depthg" and cfg.data.dataset == "cocostuff27"
    image = _image(240, 360)  # not square: the reference's resize + centre crop to 320 x 320 (a 40 x 40 grid)
    x, codes, cluster, linear = _ours(backbone, segmenter, image, 320)
    x_ref = _reference_input(image, 320)
    assert torch.equal(x, x_ref)  # the same pixels
    code_ref, cluster_ref, linear_ref = R.reference_eval(ref, x_ref)
    assert codes.shape == code_ref.shape == (1, 70, 40, 40)
    for ours, theirs in ((codes, code_ref), (cluster, cluster_ref), (linear, linear_ref)):
        assert (ours - theirs).abs().max().item() < 1e-5
    assert torch.equal(cluster.argmax(1), cluster_ref.argmax(1)) and torch.equal(linear.argmax(1), linear_ref.argmax(1))
    backbone.pos_embed = "timm"  # timm's exact-size resampling is another model at 320 px
    assert (_ours(backbone, segmenter, image, 320)[1] - code_ref).abs().max().item() > 1e-4


def test_vitb8_linear_projection_lhp_and_old_lightning_layout(tmp_path):
    url, ref = _checkpoint(tmp_path / "cityscapes_vitb.ckpt", n_classes=27, model_type="vit_base", dim=100, extra=1,
                           projection_type="linear", lhp=True, dataset_name="cityscapes", old_callbacks=True)
    cfg, backbone, segmenter, extra = load_model(url)
    assert cfg.model.backbone == "dino_vitb8" and backbone.dim == 768 and segmenter.lhp is not None
    assert torch.equal(segmenter.lhp.net[0].weight, ref.lhp_module.projection_head[0].weight)
    assert extra["criterion"].startswith("the reference's ModelCheckpoint (monitor test/cluster/mIoU")
    image = _image(56, 72, seed=1)  # a 7 x 7 grid: the position table resampled down
    x, codes, cluster, linear = _ours(backbone, segmenter, image, 56)
    code_ref, cluster_ref, linear_ref = R.reference_eval(ref, _reference_input(image, 56))
    for ours, theirs in ((codes, code_ref), (cluster, cluster_ref), (linear, linear_ref)):
        assert (ours - theirs).abs().max().item() < 1e-5


def test_dino_depth_sum_and_concat_evaluate_on_image_features_cross_attn_is_refused(tmp_path):
    """``arch: dino_depth`` files: the reference mixes depth in only in training mode, so ``sum`` / ``concat`` codes
    at evaluation are the image features' (equal to the transcription); ``cross_attn`` codes are not, refused."""
    image = _image(56, 64, seed=3)
    x_ref = _reference_input(image, 56)
    for guidance in ("sum", "concat"):
        url, ref = _checkpoint(tmp_path / f"{guidance}.ckpt", arch="dino_depth", guidance=guidance)
        assert any(k.startswith("net.depth_downscaling.") for k in ref.state_dict())  # the reference's depth modules
        cfg, backbone, segmenter, extra = load_model(url)
        assert extra["imported"]["reference_config"]["guidance"] == guidance
        _, codes, cluster, linear = _ours(backbone, segmenter, image, 56)
        for ours, theirs in zip((codes, cluster, linear), R.reference_eval(ref, x_ref)):
            assert (ours - theirs).abs().max().item() < 1e-5
    url, ref = _checkpoint(tmp_path / "cross.ckpt", arch="dino_depth", guidance="cross_attn")
    cross_codes = R.reference_eval(ref, x_ref)[0]
    ref.net.guidance = "none"  # the same weights on the image features alone: other codes, so no import can fake it
    assert (cross_codes - R.reference_eval(ref, x_ref)[0]).abs().max().item() > 1e-3
    with pytest.raises(CheckpointError, match=r"guidance = 'cross_attn' \(arch dino_depth\).*'none', 'sum' and 'concat'"):
        load_model(url)


def test_dino_position_table_matches_the_transcription():
    vit = R.DinoViT("vit_small", depth=1)
    table = vit.pos_embed.detach()
    for grid in ((28, 28), (40, 40), (30, 45), (7, 9)):
        assert torch.equal(dino_position_table(table, grid), vit.positions(*grid).detach())
    assert dino_position_table(table, (28, 28)) is table


def test_unknown_and_missing_keys_are_named(tmp_path):
    def add(state):
        state["net.extra_head.weight"] = torch.zeros(1)
        return state

    def drop(state):
        del state["cluster_probe.clusters"]
        del state["net.model.blocks.11.mlp.fc2.weight"]
        return state

    url, _ = _checkpoint(tmp_path / "a.ckpt", state_edit=add)
    with pytest.raises(CheckpointError, match="unknown keys net.extra_head.weight"):
        load_model(url)
    url, _ = _checkpoint(tmp_path / "b.ckpt", state_edit=drop)
    with pytest.raises(CheckpointError, match="missing keys cluster_probe.clusters"):
        load_model(url)

    def drop_backbone_only(state):
        del state["net.model.blocks.11.mlp.fc2.weight"]
        return state

    url, _ = _checkpoint(tmp_path / "c.ckpt", state_edit=drop_backbone_only)
    with pytest.raises(CheckpointError, match="blocks.11.mlp.fc2.weight"):
        load_model(url)


@pytest.mark.parametrize("key,value,message", [
    ("dino_patch_size", 16, "dino_patch_size = 16"),
    ("arch", "feature-pyramid", "arch = 'feature-pyramid'"),
    ("dino_feat_type", "KK", "dino_feat_type = 'KK'"),
])
def test_unsupported_reference_configs_are_refused_naming_the_key(tmp_path, key, value, message):
    url, _ = _checkpoint(tmp_path / "x.ckpt", **{key: value})
    with pytest.raises(CheckpointError, match=message):
        load_segmenter(url)


def test_hyper_parameters_without_cfg_are_refused(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(1)}, "global_step": 1, "hyper_parameters": {"n_classes": 3}},
               tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="'hyper_parameters' must hold 'n_classes' and 'cfg'"):
        load_segmenter(str(tmp_path / "x.ckpt"))


class _Exploit:
    """Pickles as a call of os.system: what a malicious checkpoint would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = str(tmp_path / "evil.ckpt")
    torch.manual_seed(0)
    R.write_lightning_checkpoint(bad, R.LitSegmenter(27), 27, _Exploit(f"touch {marker}"))
    for load in (load_model, load_segmenter, read_header):
        with pytest.raises(CheckpointError, match=r"refused: loading it needs (posix|os)\.system"):
            load(bad)
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("DEPTHG_DEBUG", None)
    for script, args in (("evaluate.py", ["--checkpoint", bad]), ("convert.py", [bad, str(tmp_path / "out.pt")]),
                         ("segment.py", ["--checkpoint", bad, "--input", str(tmp_path / "*.ckpt"), "--output",
                                         str(tmp_path / "seg")])):
        proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args], env=env,
                              capture_output=True, text=True, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and lines[-1].startswith("error: checkpoint") and "refused" in lines[-1], proc.stderr
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_convert_then_evaluate_and_segment_a_reference_checkpoint(tmp_path):
    from launch import convert as convert_script
    from launch import evaluate as evaluate_script
    from launch import segment as segment_script

    url, _ = _checkpoint(tmp_path / "potsdam_vits.ckpt", n_classes=3, dim=90, dataset_name="potsdam")
    out = str(tmp_path / "potsdam_vits8.pt")
    info = convert_script.main([url, out])
    assert info["backbone"] == "dino_vits8" and info["n_classes"] == 3 and info["dataset"] == "potsdam"
    # the reference chose its Potsdam files on validation cluster accuracy (the others on cluster mIoU)
    assert info["selection"] == "the reference's ModelCheckpoint (monitor test/cluster/Accuracy)"
    assert load_segmenter(out)[2]["select"] == "val_accuracy"
    with pytest.raises(OSError, match="exists; pass --force"):
        convert_script.main([url, out])
    assert read_header(out)["embedded_backbone"] is True
    image = _image(40, 48, seed=2)
    a = inference.segment_images(*load_model(url)[1:3], [image], 32, "linear")
    b = inference.segment_images(*load_model(out)[1:3], [image], 32, "linear")
    assert np.array_equal(a[0], b[0]) and a[0].shape == (40, 48)
    root = str(tmp_path / "shards")
    shards.write_test_shards(root, n_samples=2, size=(36, 40), with_positives=False, split="val", n_classes=3)
    for ckpt in (url, out):
        result = evaluate_script.main(["--checkpoint", ckpt, "--shards", root, "--workers", "0", "--output",
                                       str(tmp_path / "report"), "eval.resolution=32", "eval.crf=false"])
        assert result["meta"]["backbone weights"].startswith("from the checkpoint (depthg reference model")
        assert "USES THE VALIDATION LABELS" in result["meta"]["checkpoint selection"]
        assert result["meta"]["position embeddings"] == "dino" and set(result["scores"]) == {"cluster", "linear"}
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(image).save(folder / "p.png")
    segment_script.main(["--checkpoint", url, "--input", str(folder), "--output", str(tmp_path / "seg"),
                         "--no-crf", "eval.resolution=32"])
    written = sorted(n for n in os.listdir(tmp_path / "seg") if n.endswith(".png"))
    assert written == ["p.png_label.png", "p.png_overlay.png"]  # names from the source path, extension kept
    assert json.load(open(tmp_path / "seg" / "manifest.json"))["images"] == 1
