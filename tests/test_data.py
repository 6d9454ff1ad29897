"""Dataset readers on tiny fixture folders in each real layout, transforms, and real CamVid."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from depthg.config import DataConfig
from depthg.data import (FolderSource, Record, SourceError, build_source, crop_boxes, five_crop, read_depth,
                         resize_center_crop, to_tensor_image, transform_record)
from depthg.data import palettes as P

CAMVID = "/work/shared/data/camvid"


def _png(path, arr, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def _rgb(h=6, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- CamVid
def _camvid(root, labels):
    lines = []
    for i, lab in enumerate(labels):
        _png(f"{root}/train/f{i}.png", _rgb(*lab.shape, seed=i))
        _png(f"{root}/trainannot/f{i}.png", lab.astype(np.uint8))
        lines.append(f"train/f{i}.png trainannot/f{i}.png")
    (root / "train.txt").write_text("\n".join(lines) + "\n")


def test_camvid_reads_and_maps_void(tmp_path):
    lab = np.array([[0, 3, 10, 11], [255, 5, 8, 1]])
    _camvid(tmp_path, [lab, lab[::-1]])
    src = build_source(DataConfig(dataset="camvid", root=str(tmp_path)), "train")
    assert src.ids() == ["f0", "f1"] and src.n_classes == 11 and src.palette.shape == (11, 3)
    assert src.has_labels and not src.has_depth
    rec = src.load("f0")
    assert rec.image.shape == (2, 4, 3) and rec.depth is None
    np.testing.assert_array_equal(rec.label, [[0, 3, 10, -1], [-1, 5, 8, 1]])
    np.testing.assert_array_equal(rec.image, _rgb(2, 4, seed=0))
    assert len(build_source(DataConfig(dataset="camvid", root=str(tmp_path), limit=1), "train")) == 1
    # listed once, loaded from a share: an unlisted source holds no ids, a share only its entries
    unlisted = build_source(DataConfig(dataset="camvid", root=str(tmp_path)), "train", listed=False)
    entries = list(unlisted.scan())
    assert len(unlisted) == 0 and entries == [("f0", "train/f0.png trainannot/f0.png"),
                                              ("f1", "train/f1.png trainannot/f1.png")]
    part = unlisted.share(entries[1:])
    assert part.ids() == ["f1"] and np.array_equal(part.load("f1").label, src.load("f1").label)
    with pytest.raises(SourceError, match="unknown image id 'f0'"):
        part.load("f0")


def test_camvid_errors(tmp_path):
    _camvid(tmp_path, [np.array([[0, 12], [13, 1]])])
    src = build_source(DataConfig(dataset="camvid", root=str(tmp_path)), "train")
    with pytest.raises(SourceError, match=r"f0\.png.*\[12, 13\]"):
        src.load("f0")
    with pytest.raises(SourceError, match="val.txt"):
        build_source(DataConfig(dataset="camvid", root=str(tmp_path)), "val")
    with pytest.raises(SourceError, match="not found"):
        build_source(DataConfig(dataset="camvid", root=str(tmp_path / "nope")), "train")
    with open(tmp_path / "train.txt", "a") as fh:
        fh.write("train/f0.png trainannot/f0.png\n")
    with pytest.raises(SourceError, match=r"train\.txt:2: image id 'f0' again \(first on line 1\)"):
        build_source(DataConfig(dataset="camvid", root=str(tmp_path)), "train")
    (tmp_path / "train" / "f0.png").write_bytes(b"not a png at all")
    with pytest.raises(SourceError, match=r"cannot read image .*f0\.png"):
        src.load("f0")


@pytest.mark.skipif(not os.path.isfile(f"{CAMVID}/train.txt"), reason="real CamVid not present")
def test_real_camvid_two_images():
    src = build_source(DataConfig(dataset="camvid", root=CAMVID, limit=2), "val")
    assert len(src) == 2
    for id_ in src.ids():
        rec = src.load(id_)
        assert rec.image.shape == (360, 480, 3) and rec.image.dtype == np.uint8
        assert rec.label.shape == (360, 480) and rec.label.dtype == np.int64
        assert rec.label.min() >= -1 and rec.label.max() <= 10 and (rec.label >= 0).mean() > 0.5


# ----------------------------------------------------------------------------- COCO-Stuff
def test_coco_fine_to_coarse_table():
    lut = P.COCO_FINE_TO_COARSE
    names = P.COCO27_CLASSES
    # fine id = COCO category id - 1; known categories from the COCO / COCO-Stuff lists
    known = {0: "person", 2: "vehicle", 9: "outdoor", 15: "animal", 61: "furniture", 71: "electronic",
             95: "building", 148: "ground", 156: "sky", 168: "plant", 181: "solid", 119: "water",
             105: "sky", 170: "wall", 180: "window", 91: "textile", 102: "ceiling", 117: "floor"}
    for fine, coarse in known.items():
        assert names[lut[fine]] == coarse, (fine, P.COCO_FINE[fine])
    assert len(names) == 27 and names[:12].count("person") == 1
    assert sorted(set(lut[:182].tolist())) == list(range(27))
    assert lut[255] == -1 and (lut[182:255] == -1).all()
    assert set(lut[:91].tolist()) == set(range(12)) and set(lut[91:182].tolist()) == set(range(12, 27))


def _coco(root, curated=None):
    lab = np.array([[0, 2, 148], [156, 255, 168]], np.uint8)
    for i, name in enumerate(["000000000139", "000000000285"]):
        _png(f"{root}/images/val2017/{name}.jpg", _rgb(2, 3, seed=i))
        _png(f"{root}/annotations/val2017/{name}.png", lab if i == 0 else np.full((2, 3), 200, np.uint8))
    if curated:
        os.makedirs(f"{root}/curated/val2017")
        (root / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(curated) + "\n")


def test_cocostuff27_curated_list_and_mapping(tmp_path):
    _coco(tmp_path, curated=["000000000139"])
    src = build_source(DataConfig(dataset="cocostuff27", root=str(tmp_path)), "val")
    assert src.ids() == ["000000000139"] and src.n_classes == 27
    rec = src.load("000000000139")
    names = [P.COCO27_CLASSES[c] if c >= 0 else None for c in rec.label.ravel()]
    assert names == ["person", "vehicle", "ground", "sky", None, "plant"]
    assert rec.image.shape == (2, 3, 3)


def test_cocostuff27_without_list_uses_all_and_rejects_bad_ids(tmp_path):
    _coco(tmp_path)
    src = build_source(DataConfig(dataset="cocostuff27", root=str(tmp_path)), "val")
    assert src.ids() == ["000000000139", "000000000285"]
    with pytest.raises(SourceError, match=r"000000000285\.png.*\[200\]"):
        src.load("000000000285")
    with pytest.raises(SourceError, match="train2017"):
        build_source(DataConfig(dataset="cocostuff27", root=str(tmp_path)), "train")


# ----------------------------------------------------------------------------- Cityscapes
def _cityscapes(root, lab):
    stem = "aachen_000000_000019"
    _png(f"{root}/leftImg8bit/val/aachen/{stem}_leftImg8bit.png", _rgb(*lab.shape))
    _png(f"{root}/gtFine/val/aachen/{stem}_gtFine_labelIds.png", lab.astype(np.uint8))
    _png(f"{root}/leftImg8bit/val/bonn/bonn_000001_000002_leftImg8bit.png", _rgb(*lab.shape))
    return stem


def test_cityscapes_label_ids_minus_7(tmp_path):
    stem = _cityscapes(tmp_path, np.array([[0, 6, 7, 26], [33, 255, 11, 24]]))
    src = build_source(DataConfig(dataset="cityscapes", root=str(tmp_path)), "val")
    assert src.ids() == [stem, "bonn_000001_000002"]
    rec = src.load(stem)
    np.testing.assert_array_equal(rec.label, [[-1, -1, 0, 19], [26, -1, 4, 17]])
    assert [P.CITYSCAPES_CLASSES[i] for i in (0, 19, 26, 4, 17)] == ["road", "car", "bicycle", "building", "person"]
    with pytest.raises(SourceError, match="bonn_000001_000002_gtFine_labelIds.png"):
        src.load("bonn_000001_000002")  # its label file is missing


def test_cityscapes_out_of_range(tmp_path):
    stem = _cityscapes(tmp_path, np.array([[7, 34]]))
    with pytest.raises(SourceError, match=r"\[34\]"):
        build_source(DataConfig(dataset="cityscapes", root=str(tmp_path)), "val").load(stem)


# ----------------------------------------------------------------------------- Potsdam
def test_potsdam_mat_and_png(tmp_path):
    from scipy.io import savemat

    os.makedirs(tmp_path / "imgs")
    os.makedirs(tmp_path / "gt")
    img4 = np.random.default_rng(0).integers(0, 256, (2, 4, 4), dtype=np.uint8)  # RGB + IR
    savemat(tmp_path / "imgs/0_0.mat", {"img": img4})
    savemat(tmp_path / "gt/0_0.mat", {"gt": np.array([[0, 1, 2, 3], [4, 5, 255, 0]], np.uint8)})
    _png(str(tmp_path / "imgs/1_1.png"), _rgb(2, 4))
    _png(str(tmp_path / "gt/1_1.png"), np.array([[6, 0, 0, 0], [0, 0, 0, 0]], np.uint8))
    (tmp_path / "labelled_train.txt").write_text("0_0\n")
    src = build_source(DataConfig(dataset="potsdam", root=str(tmp_path)), "train")
    assert src.ids() == ["0_0"] and src.n_classes == 3
    rec = src.load("0_0")
    np.testing.assert_array_equal(rec.image, img4[..., :3])
    np.testing.assert_array_equal(rec.label, [[0, 1, 2, 2], [0, 1, -1, 0]])
    every = build_source(DataConfig(dataset="potsdam", root=str(tmp_path)), "val")  # no list: all images
    assert every.ids() == ["0_0", "1_1"]
    with pytest.raises(SourceError, match=r"1_1\.png.*\[6\]"):
        every.load("1_1")
    (tmp_path / "imgs/2_2.mat").write_bytes(b"garbage")
    with pytest.raises(SourceError, match=r"2_2\.mat"):
        build_source(DataConfig(dataset="potsdam", root=str(tmp_path)), "val").load("2_2")


# ----------------------------------------------------------------------------- folder
def test_folder_unlabelled_without_depth(tmp_path):
    _png(str(tmp_path / "images/b.jpg"), _rgb(4, 6, 1))
    _png(str(tmp_path / "images/a.png"), _rgb(4, 6, 0))
    (tmp_path / "images/notes.txt").write_text("ignored")
    src = build_source(DataConfig(dataset="folder", root=str(tmp_path)), "train", n_classes=5)
    assert src.ids() == ["a", "b"] and not src.has_labels and not src.has_depth
    assert src.n_classes == 5 and src.palette.shape == (5, 3)
    rec = src.load("a")
    assert rec.label is None and rec.depth is None
    np.testing.assert_array_equal(rec.image, _rgb(4, 6, 0))


def test_folder_with_labels_depth_and_classes(tmp_path):
    _png(str(tmp_path / "images/a.png"), _rgb(2, 3, 0))
    _png(str(tmp_path / "images/b.png"), _rgb(2, 3, 1))
    _png(str(tmp_path / "labels/a.png"), np.array([[0, 1, 255], [2, 2, 0]], np.uint8))
    d16 = np.array([[0, 65535, 32768], [1, 2, 3]], np.uint16)
    _png(str(tmp_path / "depth/a.png"), d16)
    np.save(tmp_path / "depth/b.npy", np.array([[2.0, 4.0, 6.0], [10.0, 2.0, 3.0]]))
    (tmp_path / "classes.txt").write_text("ground\nwall\nsky\n")
    src = build_source(DataConfig(dataset="folder", root=str(tmp_path)), "val", n_classes=27)
    assert src.class_names == ["ground", "wall", "sky"] and src.n_classes == 3
    assert src.has_labels and src.has_depth
    a = src.load("a")
    np.testing.assert_array_equal(a.label, [[0, 1, -1], [2, 2, 0]])
    np.testing.assert_allclose(a.depth, d16 / 65535.0, atol=1e-7)
    b = src.load("b")
    assert b.label is None  # labels may cover a subset
    np.testing.assert_allclose(b.depth, [[0, 0.25, 0.5], [1, 0, 0.125]], atol=1e-6)


def test_folder_errors(tmp_path):
    with pytest.raises(SourceError, match="images folder not found"):
        build_source(DataConfig(dataset="folder", root=str(tmp_path)), "train")
    os.makedirs(tmp_path / "images")
    with pytest.raises(SourceError, match="no images found"):
        build_source(DataConfig(dataset="folder", root=str(tmp_path)), "train")
    _png(str(tmp_path / "images/a.png"), _rgb(2, 3))
    _png(str(tmp_path / "images/b.png"), _rgb(2, 3))
    _png(str(tmp_path / "labels/a.png"), np.array([[0, 1, 7], [9, 0, 0]], np.uint8))
    _png(str(tmp_path / "depth/a.png"), np.zeros((2, 3), np.uint8))
    src = build_source(DataConfig(dataset="folder", root=str(tmp_path)), "train", n_classes=3)
    with pytest.raises(SourceError, match=r"labels/a\.png.*\[7, 9\]"):
        src.load("a")
    with pytest.raises(SourceError, match=r"missing depth for image .*b\.png"):
        src.load("b")
    with pytest.raises(SourceError, match="data.root is empty"):
        build_source(DataConfig(dataset="folder", root=""), "train")


def test_read_depth_8bit_is_not_truncated(tmp_path):
    _png(str(tmp_path / "d.png"), np.array([[0, 128, 255]], np.uint8))
    np.testing.assert_allclose(read_depth(str(tmp_path / "d.png")), [[0, 128 / 255, 1]], atol=1e-7)


def test_read_depth_metric_npy_depth_range(tmp_path):
    metric = np.array([[1.0, 4.0, 10.0], [20.0, 150.0, 2.5]])
    np.save(tmp_path / "d.npy", metric)
    full = read_depth(str(tmp_path / "d.npy"))  # no clip: the sky sets the maximum
    np.testing.assert_allclose(full, (metric - 1.0) / 149.0, atol=1e-6)
    clipped = read_depth(str(tmp_path / "d.npy"), depth_max=10.0)  # ZoeDepth-NYU's range
    np.testing.assert_allclose(clipped, (np.minimum(metric, 10.0) - 1.0) / 9.0, atol=1e-6)
    np.save(tmp_path / "n.npy", np.array([[0.0, 0.25], [0.5, 1.0]]))  # already normalised: untouched
    np.testing.assert_allclose(read_depth(str(tmp_path / "n.npy"), depth_max=10.0), [[0, 0.25], [0.5, 1]])
    with pytest.raises(SourceError, match=r"d\.npy: depth_max must be >= 0"):
        read_depth(str(tmp_path / "d.npy"), depth_max=-1.0)
    _png(str(tmp_path / "images/a.png"), _rgb(2, 3))
    (tmp_path / "depth").mkdir()
    np.save(tmp_path / "depth/a.npy", metric)
    src = FolderSource(str(tmp_path), "train", n_classes=2, depth_max=10.0)
    np.testing.assert_allclose(src.load("a").depth, clipped)
    with pytest.raises(SourceError, match="folder source: depth_max must be >= 0"):
        FolderSource(str(tmp_path), "train", n_classes=2, depth_max=-3.0)


def test_five_crop_renormalises_depth_per_crop_on_request():
    depth = np.linspace(0.0, 1.0, 8 * 12, dtype=np.float32).reshape(8, 12)
    rec = Record("img", np.zeros((8, 12, 3), np.uint8), depth, None)
    plain, renorm = five_crop(rec, 0.5), five_crop(rec, 0.5, renormalise_depth=True)
    for p, r in zip(plain, renorm):
        assert p.depth.max() < 1.0 or p.depth.min() > 0.0  # a crop of a full-image min-max: not [0,1]
        assert r.depth.min() == 0.0 and r.depth.max() == pytest.approx(1.0)
        np.testing.assert_allclose(r.depth, (p.depth - p.depth.min()) / (p.depth.max() - p.depth.min()), atol=1e-6)
        assert r.label is None and np.array_equal(r.image, p.image)
    flat = Record("f", np.zeros((8, 12, 3), np.uint8), np.full((8, 12), 0.3, np.float32), None)
    assert not five_crop(flat, 0.5, renormalise_depth=True)[0].depth.any()  # constant crop -> zeros


# ----------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("hw", [(8, 12), (7, 9), (240, 320)])
def test_five_crop_geometry(hw):
    h, w = hw
    coords = np.arange(h * w).reshape(h, w)
    rec = Record("img", np.stack([coords % 256] * 3, -1).astype(np.uint8), (coords / coords.max()).astype(np.float32),
                 coords.astype(np.int64))
    crops = five_crop(rec, 0.5)
    ch, cw = int(h * 0.5), int(w * 0.5)
    tops = [0, 0, h - ch, h - ch, int(round((h - ch) / 2))]
    lefts = [0, w - cw, 0, w - cw, int(round((w - cw) / 2))]
    assert [c.id for c in crops] == [f"img_c{k}" for k in range(5)]
    for c, t, l in zip(crops, tops, lefts):
        np.testing.assert_array_equal(c.label, coords[t:t + ch, l:l + cw])
        np.testing.assert_array_equal(c.depth, rec.depth[t:t + ch, l:l + cw])  # not renormalised
        np.testing.assert_array_equal(c.image[..., 1], (coords[t:t + ch, l:l + cw] % 256))
    assert crop_boxes(h, w)[4] == (tops[4], lefts[4], ch, cw)


def test_resize_center_crop_pins_the_reference_pixels():
    """The one resize reads exactly the pixels of the reference's T.Resize(size, NEAREST) + T.CenterCrop(size)
    (PIL's nearest, torchvision's int() long side and round() crop offset)."""
    from PIL import Image

    img = _rgb(120, 160)  # a 120x160 five-crop at 112 px: 112 x int(112 * 160 / 120) = 112 x 149, crop left 18
    out = resize_center_crop(img, 112)
    rows = ((np.arange(112) + 0.5) * 120 / 112).astype(int)
    cols = ((np.arange(149) + 0.5) * 160 / 149).astype(int)[18:130]
    np.testing.assert_array_equal(out, img[rows][:, cols])
    pil = np.asarray(Image.fromarray(img).resize((149, 112), Image.NEAREST))[:, 18:130]
    np.testing.assert_array_equal(out, pil)
    assert cols[:6].tolist() == [19, 20, 22, 23, 24, 25] and rows[:4].tolist() == [0, 1, 2, 3]
    # every kind of array takes the same pixels: labels keep their values, depth is not blended
    label = np.random.default_rng(0).integers(-1, 5, (120, 160))
    np.testing.assert_array_equal(resize_center_crop(label, 112), label[rows][:, cols])
    depth = np.random.default_rng(1).random((120, 160)).astype(np.float32)
    np.testing.assert_array_equal(resize_center_crop(depth, 112), depth[rows][:, cols])
    # portrait images, and crop=False keeps the whole (resized) image for inference
    assert resize_center_crop(_rgb(50, 30), 20).shape == (20, 20, 3)
    assert resize_center_crop(_rgb(50, 30), 20, crop=False).shape == (33, 20, 3)


def test_training_evaluation_mining_and_inference_read_the_same_pixels():
    from depthg import evaluation, streaming

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    depth = rng.random((120, 160)).astype(np.float32)
    label = rng.integers(-1, 4, (120, 160))
    sample = {"id": "a", "image": image, "depth": depth, "label": label, "pos_image": image, "pos_depth": depth}
    train = streaming.to_tensors(sample, 112)
    ev = evaluation.prepare(sample, 112)
    expected = resize_center_crop(image, 112)
    np.testing.assert_array_equal(ev["image"], expected)
    np.testing.assert_array_equal(train["image"].permute(1, 2, 0).numpy(), expected)  # uint8 batches
    np.testing.assert_array_equal(train["label"].numpy(), ev["label"])
    np.testing.assert_array_equal(train["depth"][0].numpy(), ev["depth"])


def test_transform_record_and_to_tensor():
    rec = Record("x", _rgb(30, 40), np.random.default_rng(0).random((30, 40)).astype(np.float32),
                 np.zeros((30, 40), np.int64))
    out = transform_record(rec, 16)
    assert out.image.shape == (16, 16, 3) and out.depth.shape == (16, 16) and out.label.shape == (16, 16)
    t = to_tensor_image(out.image)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy() * 255, out.image, atol=1e-4)
    with pytest.raises(ValueError):
        to_tensor_image(out.depth)


def test_folder_per_split_subfolders_and_dotted_stems(tmp_path):
    _png(str(tmp_path / "train/images/a.b.png"), _rgb(2, 3, 0))
    _png(str(tmp_path / "val/images/c.png"), _rgb(2, 3, 1))
    cfg = DataConfig(dataset="folder", root=str(tmp_path))
    train, val = build_source(cfg, "train", n_classes=2), build_source(cfg, "val", n_classes=2)
    assert train.ids() == ["a_b"] and val.ids() == ["c"]  # ids carry no dots (shard keys)
    np.testing.assert_array_equal(train.load("a_b").image, _rgb(2, 3, 0))
    with pytest.raises(SourceError, match="unknown image id"):
        val.load("a_b")
