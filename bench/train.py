"""Training step breakdown and streaming throughput (local disk vs S3): table + JSON.

    python launch/benchmark.py train [--backbone effnet_lite0 --resolution 112 --batch 8 --steps 8]

Part 1 times each stage of one training step, in one process, on the real library functions that
``depthg.step.compute_losses`` chains (data wait, frozen backbone forward, head, depth-guided sampling,
correlation losses, probes, backward, optimizer), and reports the ratio total / backbone forward
(target <= 1.1: the step should cost little beyond the frozen forward it cannot avoid), samples/s
and the peak RSS of the trainer and of a DataLoader worker.
Part 2 streams the same tiny synthetic shards through ``depthg.streaming`` from a local folder and
from a moto S3 server on loopback (started here) and compares samples/s (target S3 >= 0.9 x local); it
reports the loader's samples/s per DataLoader worker (what sizes ``train.loader_workers``: a GPU step of
B samples in T s needs about B / T / rate workers) and the storage bytes read per trained sample (the
anchor with its label and meta, and the rgb + depth of the one positive drawn, read by reference; the
data path's own costs per encoding are ``bench/datapath.py``'s).
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

from cluster.distributed import free_port, loader_workers
from cluster.world import patched_environ
from depthg import io, losses, sampling, schedules, shards, streaming
from depthg.config import load_config
from depthg.device import DEVICES, resolve_device
from depthg.step import backbone_features, dropout2d, probe_losses, stego_options
from depthg.world import World

STAGES = ("data_wait", "backbone", "head", "sampling", "loss", "probes", "backward", "optimizer")


def add_arguments(parser) -> None:
    parser.add_argument("--backbone", default="effnet_lite0")
    parser.add_argument("--weights", default="", help="'' = the backbone's offline/hub weights, 'random' for DINO offline")
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--samples", type=int, default=7, help="S: S*S sampled locations")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--shard-samples", type=int, default=96, help="samples in the benchmark shards")
    parser.add_argument("--image-size", type=int, nargs=2, default=(120, 160), help="crop size stored in the shards")
    parser.add_argument("--device", default="cpu", choices=DEVICES,
                        help="where the step runs (auto: cuda when there is one); the loader stays on CPU")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="bf16: head and probes in bf16 as DeepSpeed's bf16 engine holds them and the backbone "
                        "under bf16 autocast; fp32: everything in fp32 (depthg.step.backbone_features)")
    parser.add_argument("--skip-streaming", action="store_true", help="only the step breakdown (no moto S3 part)")


def _peak_rss_mb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


def _timed(times: dict, key: str, fn, sync=lambda: None):
    """Run ``fn`` and add its seconds to ``times[key]``; ``sync`` waits for queued GPU work on both sides."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    times[key] = times.get(key, 0.0) + time.perf_counter() - t0
    return out


def _device(name: str) -> torch.device:
    """``--device`` through the project's one device picker; no GPU for ``cuda`` is one error line."""
    try:
        return resolve_device(name)
    except RuntimeError as exc:
        raise SystemExit(f"error: --device {name}: {exc}") from None


def step_breakdown(args, root: str) -> dict:
    from depthg.models.backbones import build_backbone
    from depthg.models.heads import build_segmenter

    cfg = load_config(None, [f"model.backbone={args.backbone}", f"model.weights={args.weights}",
                             f"data.resolution={args.resolution}",
                             f"sampling.samples={args.samples}", f"sampling.min_samples={args.samples}", "model.n_classes=3"])
    device = _device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    backbone = build_backbone(cfg.model.backbone, cfg.model.weights).to(device)
    seg = build_segmenter(cfg.model, backbone.dim).to(device, dtype)
    opt = torch.optim.Adam([{"params": seg.head_parameters(), "lr": 5e-4}, {"params": seg.probe_parameters(), "lr": 5e-3}])
    spec, _ = streaming.open_split(root, "train", micro_batch=args.batch, resolution=args.resolution,
                                   shuffle_buffer=16, num_steps=args.steps + 2)
    loader = iter(streaming.make_loader(spec, args.workers))
    gen, times, sp, lc = torch.Generator().manual_seed(0), {}, cfg.sampling, cfg.loss
    for step in range(args.steps + 2):
        if step == 2:
            times, t_start = {}, time.perf_counter()
        batch = _timed(times, "data_wait", lambda: {k: v.to(device) if torch.is_tensor(v) else v
                                                    for k, v in next(loader).items()}, sync)
        feats, feats_pos = _timed(times, "backbone", lambda: backbone_features(
            backbone, torch.cat([batch["image"], batch["pos_image"]]), dtype).to(dtype), sync).chunk(2)

        def head():
            f, fp = dropout2d(feats, cfg.model.dropout, gen), dropout2d(feats_pos, cfg.model.dropout, gen)
            return f, fp, seg.head(f), seg.head(fp)
        f, fp, codes, codes_pos = _timed(times, "head", head, sync)
        grid = tuple(feats.shape[-2:])
        lam, b, s = schedules.values_at(cfg, step)
        loc, loc_pos = _timed(times, "sampling", lambda: (
            sampling.sample_locations(sp.mode, batch["depth"], grid, s, sp.fov_deg, sp.start, gen),
            sampling.sample_locations(sp.mode, batch["pos_depth"], grid, s, sp.fov_deg, sp.start, gen)), sync)

        def loss():
            terms = losses.stego_losses(f, fp, codes, codes_pos, loc.coords, loc_pos.coords, generator=gen,
                                        **stego_options(lc))
            sc = losses.sample_features(codes, loc.coords)
            depth = losses.depth_correlation_loss(lc.depth.mode, sc, sc, loc.depth, loc.depth, loc.points, loc.points, b)
            return terms["stego"] + lam * depth["depth"]
        head_loss = _timed(times, "loss", loss, sync)
        probes = _timed(times, "probes", lambda: probe_losses(seg, codes, batch["label"]), sync)["probes"]
        opt.zero_grad(set_to_none=True)
        _timed(times, "backward", lambda: (head_loss + probes).backward(), sync)
        _timed(times, "optimizer", opt.step, sync)
    wall = time.perf_counter() - t_start
    per_step = {k: 1000.0 * times.get(k, 0.0) / args.steps for k in STAGES}
    compute = sum(v for k, v in per_step.items() if k != "data_wait")
    return {"ms_per_step": per_step, "compute_ms": compute, "step_ms": 1000.0 * wall / args.steps,
            "ratio_total_over_backbone": compute / per_step["backbone"],
            "ratio_with_data_wait": (compute + per_step["data_wait"]) / per_step["backbone"],
            "samples_per_s": args.batch * args.steps / wall, "device": str(device), "precision": args.precision,
            "gpu_peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            "peak_rss_mb": {"trainer": _peak_rss_mb(resource.RUSAGE_SELF),
                            "loader_worker_max": _peak_rss_mb(resource.RUSAGE_CHILDREN)}}


def stream_rate(root: str, args, batches: int) -> dict:
    """Loader samples/s (in total and per loader worker) and storage bytes read per trained sample."""
    spec, _ = streaming.open_split(root, "train", micro_batch=args.batch, resolution=args.resolution,
                                   shuffle_buffer=16, num_steps=batches)
    it = iter(streaming.make_loader(spec, args.workers))
    first = next(it)  # worker start-up is not streaming
    t0 = time.perf_counter()
    n, read = 0, first["bytes"]
    for batch in it:
        n, read = n + 1, read + batch["bytes"]
    rate = n * args.batch / (time.perf_counter() - t0)
    return {"samples_per_s": rate, "samples_per_s_per_worker": rate / max(1, args.workers),
            "bytes_read_per_sample": read / ((n + 1) * args.batch)}


def _moto():
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def streaming_local_vs_s3(args, root: str, batches: int) -> dict:
    import boto3

    proc, endpoint = _moto()
    try:
        with patched_environ({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                              "AWS_SECRET_ACCESS_KEY": "bench"}):
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
            _write_shards("s3://bench/shards", args)
            local = stream_rate(root, args, batches)
            remote = stream_rate("s3://bench/shards", args, batches)
    finally:
        proc.terminate()
    return {"local_samples_per_s": local["samples_per_s"], "s3_samples_per_s": remote["samples_per_s"],
            "s3_over_local": remote["samples_per_s"] / local["samples_per_s"],
            "loader_samples_per_s_per_worker": {"local": local["samples_per_s_per_worker"],
                                                "s3": remote["samples_per_s_per_worker"]},
            "storage_bytes_read_per_trained_sample": {"local": local["bytes_read_per_sample"],
                                                      "s3": remote["bytes_read_per_sample"]},
            "loader_workers": args.workers, "auto_loader_workers_here": loader_workers(-1, World())}


def _write_shards(root: str, args) -> None:
    shards.write_test_shards(root, args.shard_samples, size=tuple(args.image_size), num_positives=7,
                             samples_per_shard=16)


def _table(result: dict) -> str:
    b = result["step"]
    rows = [f"{'stage':<12}{'ms/step':>10}"] + [f"{k:<12}{v:>10.1f}" for k, v in b["ms_per_step"].items()]
    rows += [f"{'compute':<12}{b['compute_ms']:>10.1f}",
             f"total/backbone forward: {b['ratio_total_over_backbone']:.2f}x (with data wait "
             f"{b['ratio_with_data_wait']:.2f}x); {b['samples_per_s']:.1f} samples/s",
             f"peak RSS MB: trainer {b['peak_rss_mb']['trainer']:.0f}, loader worker {b['peak_rss_mb']['loader_worker_max']:.0f}"]
    if b["gpu_peak_mem_mb"] is not None:
        rows.append(f"{b['device']} {b['precision']}: peak GPU memory allocated {b['gpu_peak_mem_mb']:.0f} MB")
    if "streaming" not in result:
        return "\n".join(rows)
    s = result["streaming"]
    rows.append(f"streaming samples/s: local {s['local_samples_per_s']:.1f}, S3 (moto) {s['s3_samples_per_s']:.1f} "
                f"-> {s['s3_over_local']:.2f}x")
    per, read = s["loader_samples_per_s_per_worker"], s["storage_bytes_read_per_trained_sample"]
    rows.append(f"loader samples/s per worker ({s['loader_workers']} worker(s)): local {per['local']:.1f}, "
                f"S3 {per['s3']:.1f}; storage bytes read per trained sample: local {read['local'] / 1e3:.1f} kB, "
                f"S3 {read['s3'] / 1e3:.1f} kB; train.loader_workers=-1 gives {s['auto_loader_workers_here']} here")
    return "\n".join(rows)


def run(args) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder = tempfile.mkdtemp(prefix="depthg-bench-")
    try:
        _write_shards(folder, args)
        result = {"config": {k: getattr(args, k) for k in ("backbone", "weights", "resolution", "batch", "steps", "samples",
                                                            "workers", "shard_samples", "device", "precision")},
                  "step": step_breakdown(args, folder)}
        if not args.skip_streaming:
            result["streaming"] = streaming_local_vs_s3(args, folder, batches=max(4, args.shard_samples // args.batch - 1))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(_table(result))
    return result
