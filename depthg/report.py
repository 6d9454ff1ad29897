"""Evaluation report: JSON, a Markdown table, a confusion-matrix PNG and a qualitative grid PNG.

Drawn with PIL only. ``write_report(out_url, result, meta, class_names, palette, extra)`` writes

* ``eval.md``        a table: cluster and linear, with and without CRF (and k-means when run);
* ``confusion.png``  the cluster head's matched confusion (rows = ground truth, row-normalised);
* ``samples.png``    one row per image: image | depth (when present) | ground truth | prediction;
* ``extra``          the caller's files (``launch/evaluate.py``: ``eval_config.yaml``);
* ``eval.json``      scores of every head (accuracy, mIoU, per-class IoU, cluster assignment),
                     the summed confusion matrices and ``meta`` (backbone, depth source, checkpoint),
                     **last**: it is the report's done-marker. An ``eval.json`` already in the folder is
                     removed before anything else is written, so a report killed half-way never looks done.

``complete(out_url)``: ``eval.json`` and the three other report files exist (a report written before
``eval.json`` came last, killed between its files, is incomplete: evaluate it again).
"""
from __future__ import annotations

import io as _pyio
import json

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from depthg import io, metrics

HEADER = 14  # px of column titles above the qualitative grid
HEADS = (("cluster", "cluster (unsupervised)"), ("cluster_crf", "cluster + CRF"),
         ("linear", "linear probe"), ("linear_crf", "linear probe + CRF"), ("kmeans", "k-means on codes"))


def _palettes():
    from depthg.data import palettes as p

    return p, {"camvid": (p.CAMVID_CLASSES, p.CAMVID_PALETTE),
               "cityscapes": (p.CITYSCAPES_CLASSES, p.CITYSCAPES_PALETTE),
               "potsdam": (p.POTSDAM_CLASSES, p.POTSDAM_PALETTE),
               "cocostuff27": (p.COCO27_CLASSES, p.COCO27_PALETTE),
               "synthetic": (p.SYNTHETIC_CLASSES, p.SYNTHETIC_PALETTE)}


def dataset_style(dataset: str, n_classes: int) -> tuple[list[str], np.ndarray]:
    """(class names, uint8 palette ``[n_classes, 3]``) of a dataset; generic ones when unknown."""
    p, known = _palettes()
    names, palette = known.get(dataset, (None, None))
    if names is None or len(names) != n_classes:
        return [f"class {i}" for i in range(n_classes)], p.default_palette(n_classes)
    return list(names), np.asarray(palette, np.uint8)


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """uint8 ``[H,W,3]`` colours of a label map; ignore (-1) and out-of-range ids are black."""
    lut = np.concatenate([np.asarray(palette, np.uint8), np.zeros((1, 3), np.uint8)])
    label = np.asarray(label)
    return lut[np.where((label < 0) | (label >= len(palette)), len(palette), label)]


def _png_bytes(img: Image.Image) -> bytes:
    buf = _pyio.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- tables
def _fmt(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.1f}"


def markdown(scores: dict, meta: dict, class_names: list[str]) -> str:
    """The Markdown report: what was evaluated, a table of heads, per-class IoU."""
    lines = ["# Evaluation", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| head | pixel accuracy (%) | mIoU (%) |", "|---|---|---|"]
    for key, title in HEADS:
        if key in scores:
            lines.append(f"| {title} | {_fmt(scores[key]['accuracy'])} | {_fmt(scores[key]['miou'])} |")
    heads = [k for k, _ in HEADS if k in scores]
    lines += ["", "Per-class IoU (%):", "", "| class | " + " | ".join(heads) + " |",
              "|---|" + "---|" * len(heads)]
    for c, name in enumerate(class_names):
        lines.append(f"| {name} | " + " | ".join(_fmt(scores[h]["iou"][c]) for h in heads) + " |")
    if "cluster" in scores:
        lines += ["", "Cluster -> class assignment (Hungarian, leftover clusters to their majority class): "
                  + ", ".join(f"{k}->{c}" for k, c in enumerate(scores["cluster"]["assignment"]))]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- images
def confusion_image(conf: np.ndarray, class_names: list[str], cell: int = 18) -> Image.Image:
    """Row-normalised square confusion ``[pred, gt]`` drawn with ground truth as rows (PIL only).

    Rows are labelled "index name", columns (predicted class) by index; darker = more pixels.
    """
    conf = np.asarray(conf, np.float64).T  # rows: ground truth, columns: prediction
    n = conf.shape[0]
    norm = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    font = ImageFont.load_default()
    names = [f"{i} {name}"[:24] for i, name in enumerate(class_names)]
    left, top = 10 + 6 * max((len(s) for s in names), default=1), 16
    img = Image.new("RGB", (left + n * cell + 4, top + n * cell + 4), "white")
    draw = ImageDraw.Draw(img)
    for i in range(n):
        draw.text((2, top + i * cell + 3), names[i], fill="black", font=font)
        draw.text((left + i * cell + 2, 2), str(i), fill="black", font=font)
        for j in range(n):
            shade = int(round(255 * (1 - norm[i, j])))
            x, y = left + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline=(220, 220, 220))
    return img


def sample_grid(samples: list[dict], palette: np.ndarray, assignment=None, tile: int = 160) -> Image.Image:
    """Rows of image | depth (if any) | ground truth | prediction (cluster ids mapped by ``assignment``)."""
    has_depth = any(s.get("depth") is not None for s in samples)
    cols = 4 if has_depth else 3
    titles = ["image"] + (["depth"] if has_depth else []) + ["ground truth", "prediction"]
    grid = Image.new("RGB", (cols * tile, HEADER + max(1, len(samples)) * tile), "black")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(titles):
        draw.text((c * tile + 4, 2), title, fill="white", font=ImageFont.load_default())
    lut = None if assignment is None else np.asarray(assignment, np.int64)
    for r, s in enumerate(samples):
        pred = np.asarray(s["pred"]).astype(np.int64)
        if lut is not None:
            pred = lut[pred]
        tiles = [s["image"]]
        if has_depth:
            d = s.get("depth")
            tiles.append(np.zeros_like(s["image"]) if d is None else np.repeat(np.asarray(d)[..., None], 3, axis=2))
        label = s.get("label")
        tiles += [np.zeros_like(s["image"]) if label is None else colorize(label, palette), colorize(pred, palette)]
        for c, t in enumerate(tiles):
            cell = Image.fromarray(np.asarray(t, np.uint8)).resize((tile, tile), Image.NEAREST)
            grid.paste(cell, (c * tile, HEADER + r * tile))
    return grid


# ----------------------------------------------------------------------------- all together
FILES = ("eval.md", "confusion.png", "samples.png", "eval.json")  # in the order written: eval.json last


def write_report(out_url: str, result: dict, meta: dict, class_names: list[str], palette: np.ndarray,
                 extra: dict | None = None) -> dict:
    """Write eval.md, confusion.png, samples.png, the ``extra`` files (``{name: bytes}``) and, last, eval.json under
    ``out_url``; returns their URLs. A stale eval.json is removed first (see the module docstring)."""
    scores = result["scores"]
    paths = {name: io.join(out_url, name) for name in FILES}
    io.remove(paths["eval.json"])  # a rewritten report is not done until its new eval.json is written
    data = {"meta": meta, "images": result.get("images"), "class_names": list(class_names), "scores": scores,
            "confusion": {k: np.asarray(v).tolist() for k, v in result["confusion"].items()}}
    io.write_bytes(paths["eval.md"], markdown(scores, meta, class_names).encode())
    head = "cluster_crf" if "cluster_crf" in scores else "cluster"
    assignment = scores[head]["assignment"]
    matched = metrics.remap_confusion(result["confusion"][head], assignment)
    io.write_bytes(paths["confusion.png"], _png_bytes(confusion_image(matched, class_names)))
    grid = sample_grid(result.get("samples", []), palette, assignment)
    io.write_bytes(paths["samples.png"], _png_bytes(grid))
    for name, payload in (extra or {}).items():
        paths[name] = io.join(out_url, name)
        io.write_bytes(paths[name], payload)
    io.write_bytes(paths["eval.json"], json.dumps(data, indent=1).encode())
    return paths


def complete(out_url: str) -> bool:
    """Whether ``out_url`` holds a whole report: ``eval.json`` (written last) and the other report files (a report
    of the code before, which wrote ``eval.json`` first, may have been killed after it)."""
    return all(io.exists(io.join(out_url, name)) for name in reversed(FILES))
