"""Depth estimators: normalisation, the inverse-depth flag, dataset pass-through, and the transformers
path on tiny randomly initialised DPT and ZoeDepth models saved to a temporary folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from depthg.config import DepthGenConfig
from depthg.data import Record
from depthg.depth import (DatasetDepth, DepthError, TransformersDepth, build_estimator, is_inverse_depth,
                          normalize_depth)

transformers = pytest.importorskip("transformers")


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(40, 50, 3), (24, 36, 3), (40, 50, 3)]]


def _save_dpt(folder, initializer_range=0.02):
    torch.manual_seed(0)
    cfg = transformers.DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                                 image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                                 neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8,
                                 initializer_range=initializer_range)
    transformers.DPTForDepthEstimation(cfg).eval().save_pretrained(folder)
    transformers.DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory):
    return _save_dpt(str(tmp_path_factory.mktemp("tiny_dpt")))


@pytest.fixture(scope="module")
def varied_dpt(tmp_path_factory):
    """A tiny random DPT whose depth maps have a real range (default init gives near-constant maps,
    ~1e-9 apart, which min-max normalisation would turn into noise)."""
    return _save_dpt(str(tmp_path_factory.mktemp("varied_dpt")), initializer_range=0.2)


@pytest.fixture(scope="module")
def tiny_zoe(tmp_path_factory):
    from bench.depthgen import make_tiny_zoe  # the benchmark's tiny random ZoeDepth (BEiT backbone)

    return make_tiny_zoe(str(tmp_path_factory.mktemp("tiny_zoe")))


def test_normalize_depth_minmax_and_inverse():
    d = np.array([[2.0, 4.0], [6.0, 10.0]])
    np.testing.assert_allclose(normalize_depth(d), [[0, 0.25], [0.5, 1]])
    np.testing.assert_allclose(normalize_depth(d, inverse=True), [[1, 0.75], [0.5, 0]])
    assert normalize_depth(np.full((3, 3), 7.0)).max() == 0
    out = normalize_depth(np.array([[1.0, np.nan], [3.0, np.inf]]))
    assert np.isfinite(out).all() and out.min() == 0 and out.max() == 1
    assert normalize_depth(d).dtype == np.float32


def test_inverse_flag_from_model_type():
    assert is_inverse_depth(transformers.DPTConfig())  # MiDaS-style relative inverse depth
    assert is_inverse_depth(transformers.DepthAnythingConfig())
    assert not is_inverse_depth(transformers.DepthAnythingConfig(depth_estimation_type="metric"))
    assert not is_inverse_depth(transformers.ZoeDepthConfig())  # metric, larger = farther
    assert not is_inverse_depth(transformers.GLPNConfig())


def test_dataset_depth_passes_through_and_names_missing_id():
    img = np.zeros((4, 5, 3), np.uint8)
    depth = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    est = build_estimator(DepthGenConfig(source="dataset"))
    assert isinstance(est, DatasetDepth) and est.needs_records
    np.testing.assert_array_equal(est([Record("a", img, depth)])[0], depth)
    with pytest.raises(DepthError, match="'b'"):
        est([Record("a", img, depth), Record("b", img, None)])
    with pytest.raises(DepthError, match="Records"):
        est([img])
    with pytest.raises(DepthError, match="'c'"):
        est([Record("c", img, depth * 3)])


def test_transformers_depth_shapes_range_and_batching(tiny_dpt):
    images = _images()
    est = build_estimator(DepthGenConfig(source="transformers", model=tiny_dpt, batch_size=2, device="cpu"))
    assert isinstance(est, TransformersDepth) and est.inverse and not est.needs_records
    out = est(images)
    assert [d.shape for d in out] == [img.shape[:2] for img in images]
    for d in out:
        assert d.dtype == np.float32 and d.min() == 0.0 and d.max() == 1.0
    one_by_one = TransformersDepth(tiny_dpt, "cpu", batch_size=1)(images)
    for a, b in zip(out, one_by_one):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # records work too, and the inverse flag flips the normalised map
    recs = [Record(f"r{i}", img) for i, img in enumerate(images)]
    metric = TransformersDepth(tiny_dpt, "cpu", batch_size=2, inverse=False)(recs)
    for a, b in zip(out, metric):
        np.testing.assert_allclose(a, 1.0 - b, atol=1e-6)


def test_flip_average_is_flip_equivariant(tiny_dpt):
    img = _images()[0]
    est = TransformersDepth(tiny_dpt, "cpu", flip_average=True)
    a, b = est([img, np.ascontiguousarray(img[:, ::-1])])
    np.testing.assert_allclose(a, b[:, ::-1], atol=1e-4)
    plain = TransformersDepth(tiny_dpt, "cpu", flip_average=False)
    c, d = plain([img, np.ascontiguousarray(img[:, ::-1])])
    assert np.abs(c - d[:, ::-1]).max() > 1e-3  # a random model is not symmetric on its own


def test_zoedepth_path_metric_and_padding_removed(tiny_zoe):
    est = TransformersDepth(tiny_zoe, "cpu", batch_size=2)
    assert not est.inverse
    images = _images()
    out = est(images)
    assert [d.shape for d in out] == [img.shape[:2] for img in images]
    assert all(np.isfinite(d).all() and d.min() >= 0 and d.max() <= 1 for d in out)


def test_depth_anything_keep_aspect_ratio_mixed_sizes(tmp_path):
    # keep_aspect_ratio gives one tensor size per image size: a batch of mixed sizes must be grouped
    torch.manual_seed(0)
    backbone = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                         intermediate_size=32, image_size=28, patch_size=14,
                                         out_features=["stage1", "stage2", "stage3", "stage4"],
                                         reshape_hidden_states=False)
    cfg = transformers.DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[8, 8, 16, 16],
                                           fusion_hidden_size=8, head_hidden_size=8, reassemble_hidden_size=16)
    transformers.DepthAnythingForDepthEstimation(cfg).eval().save_pretrained(str(tmp_path))
    transformers.DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=True,
                                   ensure_multiple_of=14).save_pretrained(str(tmp_path))
    est = TransformersDepth(str(tmp_path), "cpu", batch_size=3)
    assert est.inverse  # relative Depth Anything predicts disparity
    images = _images()
    out = est(images)
    assert [d.shape for d in out] == [img.shape[:2] for img in images]
    np.testing.assert_allclose(out[0], TransformersDepth(str(tmp_path), "cpu", batch_size=1)([images[0]])[0], atol=1e-5)


def test_batches_are_formed_across_image_sizes(tiny_dpt):
    # three image sizes, one model-input size (32 x 32): one batch of 3, not one batch per image size
    est = TransformersDepth(tiny_dpt, "cpu", batch_size=3)
    shapes, forward = [], est._forward
    est._forward = lambda batch: (shapes.append(tuple(batch.shape)), forward(batch))[1]
    images = _images() + [np.zeros((32, 64, 3), np.uint8)]
    out = est(images)
    assert shapes == [(3, 3, 32, 32), (1, 3, 32, 32)]
    assert [d.shape for d in out] == [img.shape[:2] for img in images]
    for a, b in zip(out, TransformersDepth(tiny_dpt, "cpu", batch_size=1)(images)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_autocast_precisions_on_cpu(varied_dpt):
    from depthg.depth.estimators import autocast_dtype

    images = _images()
    fp32 = TransformersDepth(varied_dpt, "cpu", precision="fp32")(images)
    auto = TransformersDepth(varied_dpt, "cpu")  # auto = fp32 on the CPU, fp16 on a GPU
    assert auto.amp is None and all(np.array_equal(a, b) for a, b in zip(auto(images), fp32))
    assert autocast_dtype("auto", torch.device("cuda")) == torch.float16
    # measured on this model: fp16 moves normalised depth by <= 0.004, bf16 by <= 0.04 (bench/depthgen.py)
    for precision, bound in (("fp16", 0.02), ("bf16", 0.1)):
        est = TransformersDepth(varied_dpt, "cpu", precision=precision)
        out = est(images)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(out, fp32))
        assert est.amp is not None and 0 < diff < bound, (precision, diff)
    with pytest.raises(DepthError, match="depthgen.precision"):
        TransformersDepth(varied_dpt, "cpu", precision="int8")


def test_autocast_overflow_falls_back_to_fp32(tmp_path):
    # large random weights overflow fp16 (inf/nan): the estimator reruns the batch in fp32 and stays there
    folder = _save_dpt(str(tmp_path), initializer_range=1.0)
    images = _images()
    est = TransformersDepth(folder, "cpu", precision="fp16")
    out = est(images)
    assert est.amp is None
    for a, b in zip(out, TransformersDepth(folder, "cpu", precision="fp32")(images)):
        assert np.isfinite(a).all() and np.array_equal(a, b)


def test_transformers_depth_errors(tmp_path, tiny_dpt):
    with pytest.raises(DepthError, match=str(tmp_path)):
        TransformersDepth(str(tmp_path), "cpu")
    est = TransformersDepth(tiny_dpt, "cpu")
    with pytest.raises(DepthError, match="uint8"):
        est([np.zeros((8, 8), np.float32)])
    with pytest.raises(DepthError, match="unknown depthgen.source"):
        build_estimator(DepthGenConfig(source="magic"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transformers_depth_on_gpu_matches_cpu(tiny_dpt):
    images = _images()
    cpu = TransformersDepth(tiny_dpt, "cpu", batch_size=2)(images)
    gpu_est = TransformersDepth(tiny_dpt, "cuda", batch_size=2, precision="fp32")
    assert gpu_est.device.type == "cuda"
    for a, b in zip(cpu, gpu_est(images)):
        np.testing.assert_allclose(a, b, atol=2e-3)
