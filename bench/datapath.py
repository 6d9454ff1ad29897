"""Data path: storage, CPU and bytes per trained sample, against what one GPU's backbone consumes (issue 22).

    python launch/benchmark.py datapath [--data camvid|synthetic] [--images 12] [--a10g-tflops 25 --h100-tflops 300]

The same crops (CamVid frames from ``--camvid``, 480 x 360, five-cropped at 0.5 -> 240 x 180, with depth
from the synthetic renderer at the same size since CamVid has none; or ``--data synthetic``: rendered
scenes at 320 x 240) are written as stage 1 (lossless PNG at the crop size), as stage 2 the old way (the
anchor + 7 embedded positives, schema ``depthg-shards/1``) and as stage 2 now (each sample once at
``--resolution``, positives by reference) in every encoding of ``--encodings``. Per encoding:

* storage per sample (tar bytes / samples) against stage 1's;
* CPU-ms per trained sample: process CPU time (``time.process_time``: every thread, 1 torch thread) of the
  real loader (``depthg.streaming``, in-process, read-ahead threads on) over ``--epochs`` passes: read,
  draw, decode anchor + positive, resize (the identity at the stored resolution), depth, collate; the old
  format through a replica of the old loader (decode the anchor and the drawn embedded positive's PNGs at
  the crop size, resize, float tensors, collate);
* bytes read per trained sample, counted at the storage layer (``bench.mining_io``'s counting file system;
  a pass without read-ahead, so the count is the steady state) against the member bytes decoded;
* fidelity: RGB mean / max absolute error (0..255) and depth max absolute error against the lossless
  crop at the training resolution.

Then ``required_cpus_per_gpu = cpu_ms x samples_per_s / 1000`` for an A10G and an H100, where the backbone's
rate is ``sustained TFLOP/s / (2 x FLOP per forward)`` (anchor and positive both go through it): the FLOP count
is MEASURED with ``torch.utils.flop_counter.FlopCounterMode`` on timm's ``vit_small_patch8_224`` (random init,
attention through the math kernel so its matmuls count), the sustained TFLOP/s are labelled estimates
(arguments). Goal: at most half the vCPUs a GPU has (g5.12xlarge: 12 per A10G; p5.48xlarge: 24 per H100).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import torch

from depthg import codecs, shards, streaming
from depthg.data import SyntheticSource, five_crop, resize_center_crop, to_tensor_image

OLD = "old"  # today's format before this change: PNG at the crop size + 7 embedded positives
GPUS = {"A10G": ("a10g_tflops", "a10g_vcpus", "g5.12xlarge: 48 vCPUs / 4 A10G"),
        "H100": ("h100_tflops", "h100_vcpus", "p5.48xlarge: 192 vCPUs / 8 H100")}


def add_arguments(parser) -> None:
    parser.add_argument("--data", default="camvid", choices=("camvid", "synthetic"))
    parser.add_argument("--camvid", default="/work/shared/data/camvid", help="CamVid root (train.txt, train/, ...)")
    parser.add_argument("--images", type=int, default=24, help="source images (x 5 crops)")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--positives", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=3, help="loader passes timed per encoding")
    parser.add_argument("--encodings", default="old,png+png16,jpeg95+raw16z,jpeg90+raw16z,jpeg95+png16,"
                        "jpeg95+raw16,jpeg95+png8,webp90+raw16z")
    parser.add_argument("--a10g-tflops", type=float, default=25.0,
                        help="ESTIMATE: sustained bf16 TFLOP/s of ViT-S/8 on an A10G (~35%% of its ~70 dense peak)")
    parser.add_argument("--h100-tflops", type=float, default=300.0,
                        help="ESTIMATE: sustained bf16 TFLOP/s of ViT-S/8 on an H100 SXM (~30%% of its ~990 dense peak)")
    parser.add_argument("--a10g-vcpus", type=int, default=12)
    parser.add_argument("--h100-vcpus", type=int, default=24)


def parse_encoding(name: str) -> codecs.Encoding:
    """``jpeg95+raw16z`` -> Encoding("jpeg", 95, "raw16z")."""
    rgb, depth = name.split("+")
    codec = rgb.rstrip("0123456789")
    return codecs.Encoding(codec, int(rgb[len(codec):] or 95), depth)


# ----------------------------------------------------------------------------- the crops
def load_crops(args) -> tuple[list, str]:
    """Records of the five crops of ``--images`` images (native crop size, depth in [0, 1], labels)."""
    if args.data == "camvid" and os.path.isdir(args.camvid):
        from depthg.data.sources import CamVidSource

        src = CamVidSource(args.camvid, "train", limit=args.images)
        records = [src.load(i) for i in src.ids()]
        h, w = records[0].image.shape[:2]
        depth = SyntheticSource(len(records), h, w, 0, "train")
        for rec, did in zip(records, depth.ids()):
            rec.depth = depth.load(did).depth
        what = f"CamVid train frames {w}x{h} (depth: the synthetic renderer's at the same size; CamVid has none)"
    else:
        src = SyntheticSource(args.images, 240, 320, 0, "train")
        records = [src.load(i) for i in src.ids()]
        what = "synthetic scenes 320x240 (rendered depth, clipped at 10 m)"
    crops = [c for rec in records for c in five_crop(rec, 0.5)]
    for k, c in enumerate(crops):
        c.id = f"s{k:05d}"
    h, w = crops[0].image.shape[:2]
    return crops, f"{what}, five-cropped at 0.5: {len(crops)} crops of {w}x{h}"


def _positives(n: int, k: int) -> list[list[int]]:
    """Stand-in neighbours (sizes and costs do not depend on which): the next k crops of another image."""
    return [[(i + 5 * (j + 1)) % n for j in range(k)] for i in range(n)]


# ----------------------------------------------------------------------------- writing the three formats
def _put(folder: str, samples: list, per_shard: int) -> list[dict]:
    return [shards.put_shard(folder, shards.shard_name(i // per_shard), samples[i:i + per_shard])
            for i in range(0, len(samples), per_shard)]


def _per_sample(infos: list[dict]) -> float:
    return sum(info["offsets"][-1] for info in infos) / sum(info["count"] for info in infos)


def write_stage1(crops, folder: str, per_shard: int) -> list[dict]:
    return _put(folder, [shards.encode_sample(c.id, c.image, c.depth, c.label, {"neighbors": []}) for c in crops],
                per_shard)


def write_old_stage2(crops, folder: str, k: int, per_shard: int) -> list[dict]:
    """The layout before this change: the stage-1 members + ``pos{j}.rgb.png`` / ``pos{j}.depth.png`` of K positives."""
    samples = []
    for c, pos in zip(crops, _positives(len(crops), k)):
        raw = shards.encode_sample(c.id, c.image, c.depth, c.label, {"neighbors": [crops[p].id for p in pos]})
        for j, p in enumerate(pos):
            raw[f"pos{j}.rgb.png"] = codecs.encode_image(crops[p].image)
            raw[f"pos{j}.depth.png"] = codecs.encode_depth(crops[p].depth)
        samples.append(raw)
    return _put(folder, samples, per_shard)


def write_new_stage2(crops, root: str, enc: codecs.Encoding, args, per_shard: int) -> list[dict]:
    """As ``cluster.mining`` writes them: each crop once at the resolution, positives in the shards' row files."""
    res, folder = args.resolution, shards.split_dir(root, "train", "train")
    samples = [shards.encode_sample(c.id, resize_center_crop(c.image, res), resize_center_crop(c.depth, res),
                                    resize_center_crop(c.label, res), {}, enc) for c in crops]
    infos = _put(folder, samples, per_shard)
    table = shards.OffsetsTable.from_sidecars(infos)
    shards.write_index(folder, table)
    positives = np.array(_positives(len(crops), args.positives))
    for i, info in enumerate(infos):  # the row files: each sample's positives and their byte ranges
        shards.write_rows(folder, info["name"], shards.build_rows(table, i, positives[table.first[i]:table.first[i + 1]]))
    shards.write_manifest(folder, {"kind": "train", "split": "train", "index": shards.INDEX, "rows": shards.ROWS,
                                   "resolution": res, "num_positives": args.positives, "encoding": enc.as_dict(),
                                   "n_classes": 12, "depth_source": "synthetic",
                                   "shards": [{"name": i["name"], "count": i["count"]} for i in infos]})
    return infos


# ----------------------------------------------------------------------------- loaders
def old_loader(folder: str, infos: list[dict], args) -> dict:
    """CPU-ms per trained sample of the old loader's work (replica): each shard's range read once, one
    embedded positive drawn, anchor + positive PNGs decoded, resized, made float tensors, collated."""
    rng, res, trained, read, decoded = np.random.default_rng(0), args.resolution, 0, [0], 0
    start = time.process_time()
    for _ in range(args.epochs):
        for info in infos:
            raws = list(shards.iter_shard(os.path.join(folder, info["name"]), 0, info["count"], info["offsets"], read))
            for b in range(0, len(raws), args.batch):
                out = []
                for raw in raws[b:b + args.batch]:
                    j = int(rng.integers(args.positives))
                    names = ("rgb.png", "depth.png", "label.png", "meta.json", f"pos{j}.rgb.png", f"pos{j}.depth.png")
                    decoded += sum(len(raw[m]) for m in names)
                    img, pos = codecs.decode_image(raw["rgb.png"]), codecs.decode_image(raw[f"pos{j}.rgb.png"])
                    depth, pdepth = codecs.decode_depth(raw["depth.png"]), codecs.decode_depth(raw[f"pos{j}.depth.png"])
                    label = codecs.decode_label(raw["label.png"])
                    out.append({"image": to_tensor_image(resize_center_crop(img, res)),
                                "pos_image": to_tensor_image(resize_center_crop(pos, res)),
                                "depth": torch.from_numpy(resize_center_crop(depth, res))[None],
                                "pos_depth": torch.from_numpy(resize_center_crop(pdepth, res))[None],
                                "label": torch.from_numpy(resize_center_crop(label, res))})
                _ = {key: torch.stack([s[key] for s in out]) for key in out[0]}  # the collate
                trained += len(out)
    cpu = time.process_time() - start
    return {"cpu_ms_per_sample": 1000 * cpu / trained, "trained": trained,
            "bytes_read_per_sample": read[0] / trained, "bytes_decoded_per_sample": decoded / trained}


def new_loader(root: str, args, steps: int, **spec) -> dict:
    """CPU-ms per trained sample of ``depthg.streaming`` (in-process), the first batch not counted."""
    spec, _ = streaming.open_split(root, "train", micro_batch=args.batch, resolution=args.resolution,
                                   num_steps=steps + 1, **spec)
    it = iter(streaming.make_loader(spec, 0))
    first = next(it)
    assert first["image"].dtype == torch.uint8
    cpu, wall, trained = time.process_time(), time.perf_counter(), 0
    for batch in it:
        trained += len(batch["id"])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_ms_per_sample": 1000 * cpu / trained, "samples_per_s_wall": trained / wall, "trained": trained}


def counted_bytes(local_root: str, args, steps: int, counts: str) -> dict:
    """Storage bytes read per trained sample (counting file system, no read-ahead: the samples, their rows and
    their positives; the loader reads no table) and member bytes decoded."""
    from bench.mining_io import COUNT_DIR_ENV, _read_logs, register_counting

    register_counting()
    root = "counted://" + local_root
    spec, _ = streaming.open_split(root, "train", micro_batch=args.batch, resolution=args.resolution,
                                   num_steps=steps, shuffle_buffer=0, fetch_threads=0)
    for name in os.listdir(counts):
        os.remove(os.path.join(counts, name))
    os.environ[COUNT_DIR_ENV] = counts
    try:
        batches = list(streaming.make_loader(spec, 0))
    finally:
        os.environ.pop(COUNT_DIR_ENV, None)
    trained = sum(len(b["id"]) for b in batches)
    storage = sum(n for _, _, n, name in _read_logs(counts) if name.endswith((".tar", "." + shards.ROWS)))
    return {"bytes_read_per_sample": storage / trained, "bytes_decoded_per_sample": sum(b["decoded"] for b in batches) / trained,
            "loader_reported_equals_storage": storage == sum(b["bytes"] for b in batches),
            "offsets_table_bytes": len(shards.read_index(shards.split_dir(local_root, "train", "train")).to_bytes())}


# ----------------------------------------------------------------------------- fidelity, decoders, FLOPs
def fidelity(crops, enc: codecs.Encoding, res: int) -> dict:
    rgb, depth = [], 0.0
    for c in crops:
        image, d = resize_center_crop(c.image, res), resize_center_crop(c.depth, res)
        back = codecs.decode_image(codecs.encode_image(image, enc.rgb, enc.quality), codecs.RGB_MEMBER[enc.rgb])
        rgb.append(np.abs(back.astype(np.int64) - image.astype(np.int64)))
        dd = codecs.decode_depth(codecs.encode_depth(d, enc.depth), codecs.DEPTH_MEMBER[enc.depth])
        depth = max(depth, float(np.abs(dd - d).max()))
    return {"rgb_mean_abs_error": float(np.mean([e.mean() for e in rgb])), "rgb_max_abs_error": int(max(e.max() for e in rgb)),
            "depth_max_abs_error": depth, "depth_error_bound": codecs.depth_error_bound(enc.depth)}


def _cpu_ms(fn, items, reps: int = 3) -> float:
    fn(items[0])
    start = time.process_time()
    for _ in range(reps):
        for x in items:
            fn(x)
    return 1000 * (time.process_time() - start) / (reps * len(items))


def decoders(crops, res: int) -> dict:
    """CPU-ms per member decode at ``res``: each RGB codec (JPEG by PIL and by torchvision) and depth codec."""
    import io as _pyio

    from PIL import Image

    images = [resize_center_crop(c.image, res) for c in crops]
    depths = [resize_center_crop(c.depth, res) for c in crops]
    out = {}
    for codec, q in (("png", 95), ("jpeg", 95), ("jpeg", 90), ("webp", 90)):
        data = [codecs.encode_image(x, codec, q) for x in images]
        key = codec if codec == "png" else f"{codec}{q}"
        out[f"rgb {key}"] = _cpu_ms(lambda b, m=codecs.RGB_MEMBER[codec]: codecs.decode_image(b, m), data)
        if codec == "jpeg":
            out[f"rgb {key} (PIL)"] = _cpu_ms(lambda b: np.array(Image.open(_pyio.BytesIO(b)).convert("RGB")), data)
    for codec in codecs.DEPTH_CODECS:
        data = [codecs.encode_depth(d, codec) for d in depths]
        out[f"depth {codec}"] = _cpu_ms(lambda b, m=codecs.DEPTH_MEMBER[codec]: codecs.decode_depth(b, m), data)
    labels = [codecs.encode_label(resize_center_crop(c.label, res)) for c in crops]
    out["label png"] = _cpu_ms(codecs.decode_label, labels)
    return out


def backbone_flops(res: int) -> dict:
    """FLOP of one forward of timm's ViT-S/8 (random init) at ``res``, counted by ``FlopCounterMode``."""
    import timm
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model("vit_small_patch8_224", pretrained=False, img_size=res).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:  # the math kernel: attention's matmuls count
        model.forward_features(torch.rand(1, 3, res, res))
    ops = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return {"model": "timm vit_small_patch8_224 (random init)", "resolution": res, "flop_per_forward": int(counter.get_total_flops()),
            "by_op": ops, "note": "counted (1 multiply-add = 2 FLOP); attention counted through the math kernel"}


def gpu_table(cpu_ms: dict, flop: int, args) -> dict:
    out = {}
    for gpu, (tflops_key, vcpus_key, instance) in GPUS.items():
        tflops, vcpus = getattr(args, tflops_key), getattr(args, vcpus_key)
        rate = tflops * 1e12 / (2 * flop)  # trained samples/s: anchor + positive forwards
        rows = {enc: {"required_cpus_per_gpu": ms * rate / 1000, "fraction_of_vcpus": ms * rate / 1000 / vcpus,
                      "goal_met": ms * rate / 1000 <= 0.5 * vcpus} for enc, ms in cpu_ms.items()}
        out[gpu] = {"sustained_tflops_ESTIMATE": tflops, "backbone_samples_per_s_ESTIMATE": rate, "vcpus_per_gpu": vcpus,
                    "instance": instance, "goal": f"<= {0.5 * vcpus:g} CPUs (0.5 x {vcpus} vCPUs)", "encodings": rows}
    return out


# ----------------------------------------------------------------------------- run
def measure(crops, args, tmp: str, names: list[str]) -> dict:
    per_shard = max(args.batch, len(crops) // 4)
    stage1 = write_stage1(crops, os.path.join(tmp, "stage1"), per_shard)
    steps = args.epochs * len(crops) // args.batch
    rows, counts = {}, os.path.join(tmp, "counts")
    os.makedirs(counts)
    for name in names:
        if name == OLD:
            folder = os.path.join(tmp, "old")
            infos = write_old_stage2(crops, folder, args.positives, per_shard)
            rows[name] = {"storage_per_sample": _per_sample(infos), **old_loader(folder, infos, args),
                          "fidelity": fidelity(crops, codecs.LOSSLESS, args.resolution)}
            continue
        enc, root = parse_encoding(name), os.path.join(tmp, name.replace("+", "_"))
        infos = write_new_stage2(crops, root, enc, args, per_shard)
        rows[name] = {"storage_per_sample": _per_sample(infos), "encoding": enc.as_dict(),
                      **new_loader(root, args, steps, shuffle_buffer=64), **counted_bytes(root, args, steps, counts),
                      "fidelity": fidelity(crops, enc, args.resolution)}
        if enc == codecs.TRAIN_DEFAULT:
            rows[name]["cpu_ms_per_sample_without_read_ahead"] = new_loader(root, args, steps, shuffle_buffer=64,
                                                                            fetch_threads=0)["cpu_ms_per_sample"]
    s1 = _per_sample(stage1)
    for row in rows.values():
        row["storage_over_stage1"] = row["storage_per_sample"] / s1
        row["read_over_decoded"] = row["bytes_read_per_sample"] / row["bytes_decoded_per_sample"]
    return {"stage1_storage_per_sample": s1, "encodings": rows}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def _print(result: dict) -> None:
    print(f"data: {result['data']}; {result['cpu_model']}, {os.cpu_count()} cores, 1 torch thread, "
          f"load {result['load_avg_1min_before']:.2f} -> {result['load_avg_1min']:.2f}")
    print(f"stage 1 (lossless PNG at the crop size): {result['stage1_storage_per_sample'] / 1e3:.1f} kB per sample")
    head = f"{'encoding':<16}{'kB/sample':>10}{'x st.1':>7}{'CPU-ms':>8}{'kB read':>9}{'read/dec':>9}{'rgb err':>10}{'depth err':>11}"
    print(head)
    for name, r in result["encodings"].items():
        f = r["fidelity"]
        print(f"{name:<16}{r['storage_per_sample'] / 1e3:>10.1f}{r['storage_over_stage1']:>7.2f}{r['cpu_ms_per_sample']:>8.2f}"
              f"{r['bytes_read_per_sample'] / 1e3:>9.1f}{r['read_over_decoded']:>9.2f}"
              f"{f['rgb_mean_abs_error']:>6.2f}/{f['rgb_max_abs_error']:<3d}{f['depth_max_abs_error']:>11.2e}")
    print("decode CPU-ms per member at the resolution: " + ", ".join(f"{k} {v:.2f}" for k, v in result["decoders"].items()))
    fl = result["flops"]
    print(f"backbone: {fl['flop_per_forward'] / 1e9:.1f} GFLOP per forward (measured), x2 per trained sample")
    for gpu, g in result["gpus"].items():
        print(f"{gpu}: {g['sustained_tflops_ESTIMATE']:g} TFLOP/s sustained (ESTIMATE) -> {g['backbone_samples_per_s_ESTIMATE']:.0f} "
              f"trained samples/s; goal {g['goal']}")
        for name, r in g["encodings"].items():
            print(f"    {name:<16} {r['required_cpus_per_gpu']:6.2f} CPUs per GPU ({r['fraction_of_vcpus']:.2f} of the vCPUs) "
                  f"{'met' if r['goal_met'] else 'NOT met'}")


def run(args) -> dict:
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    crops, what = load_crops(args)
    tmp = tempfile.mkdtemp(prefix="depthg-bench-datapath-")
    try:
        result = {"data": what, "cpu_model": _cpu_model(), "load_avg_1min_before": load_before,
                  **measure(crops, args, tmp, [n.strip() for n in args.encodings.split(",") if n.strip()])}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["decoders"] = decoders(crops, args.resolution)
    result["flops"] = backbone_flops(args.resolution)
    result["gpus"] = gpu_table({k: r["cpu_ms_per_sample"] for k, r in result["encodings"].items()},
                               result["flops"]["flop_per_forward"], args)
    result["default_encoding"] = codecs.TRAIN_DEFAULT.name
    result["load_avg_1min"] = os.getloadavg()[0]
    result["config"] = {k: getattr(args, k) for k in ("data", "images", "resolution", "batch", "positives", "epochs")}
    _print(result)
    return result
