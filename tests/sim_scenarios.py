"""Job drivers for the simulated-cluster tests (tests/test_cluster_sim.py), each run in its own
process: a driver connects to one cluster for its lifetime, and the test process keeps its own
local Ray (``ray_local``) untouched. Each scenario writes a JSON of what it observed.

    python tests/sim_scenarios.py fake-driver ADDRESS ROOT OUT.json
    python tests/sim_scenarios.py fake-train ADDRESS ROOT OUTPUT_URL OUT.json
    python tests/sim_scenarios.py multinode ROOT OUT.json
    python tests/sim_scenarios.py mining-bytes ROOT OUT.json
    python tests/sim_scenarios.py segment-node-loss ROOT OUT.json
"""
from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # train_hooks

from depthg.config import load_config  # noqa: E402

BASE = ["data.dataset=synthetic", "data.height=48", "data.width=64", "shards.samples_per_shard=1",
        "model.backbone=tiny_vit", "data.resolution=32", "mining.k=4", "mining.num_positives=2",
        "mining.batch_size=8", "eval.resolution=32", "eval.batch_size=2", "eval.crf=true", "eval.report_images=2"]


def fake_driver(address: str, root: str, out: str) -> None:
    """generate_depth on the fake autoscaling cluster: GPU actors requested, fake GPU nodes added."""
    import ray

    from cluster.depthgen import depth_group, generate_depth
    from cluster.raycluster import connect

    connect(address)
    before = ray.cluster_resources()
    cfg = load_config(None, BASE + ["data.num_train=4", f"shards.root={root}", "depthgen.device=auto"])
    units = []
    with depth_group(cfg) as group:
        manifest = generate_depth(cfg, "train", progress=False, group=group,
                                  on_unit=lambda r: units.append(r["node"]))
        plan = {k: v for k, v in group.plan.items() if k != "options"}
        plan["options"] = {k: v for k, v in group.plan["options"].items() if k in ("num_gpus", "num_cpus")}
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    head = next(n for n, r in nodes.items() if "node:__internal_head__" in r)
    _write(out, {"resources_before": before, "plan": plan, "unit_nodes": units, "nodes": nodes, "head": head,
                 "total": manifest["total"]})


def fake_train(address: str, root: str, output: str, out: str) -> None:
    """``launch/train.py --nodes 1 --gpus-per-node 1`` on the fake autoscaling cluster before any GPU node is up:
    the training worker's GPU request makes the autoscaler add a GPU node (not a CPU one) and runs there.
    ``output``: shared storage (s3://), as on any cluster this driver did not start."""
    import ray

    import train_hooks
    from cluster.raycluster import connect
    from depthg import io, shards
    from launch import train as launch_train

    connect(address)
    before = ray.cluster_resources()
    data, trace = os.path.join(root, "data"), os.path.join(root, "trace")
    shards.write_test_shards(data, 8, size=(32, 32), num_positives=2, samples_per_shard=4)
    result = launch_train.main(["--nodes", "1", "--gpus-per-node", "1", "--address", address, "--config",
                                os.path.join(REPO, "configs", "smoke.yaml"), f"shards.root={data}", f"train.output={output}",
                                "train.num_batches=2", "train.val_every=0", "train.micro_batch_per_gpu=2",
                                "train.finish=none"], hooks=train_hooks.TraceSamples(trace))
    with open(os.path.join(trace, "start.jsonl")) as fh:
        starts = [json.loads(line) for line in fh]
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    head = next(n for n, r in nodes.items() if "node:__internal_head__" in r)
    _write(out, {"resources_before": before, "plan": result["plan"], "starts": starts, "nodes": nodes, "head": head,
                 "segmenter": io.exists(io.join(output, "segmenter.pt"))})


def multinode(root: str, out: str) -> None:
    """Depth (losing a node after the first shard), mining and evaluation on a 3-node cluster."""
    from cluster import evaluator
    from cluster.depthgen import generate_depth
    from cluster.mining import mine_neighbors, mining_group
    from cluster.simcluster import node_of, private_cluster
    from depthg import shards

    nodes = [{"num_cpus": 1, "num_gpus": 0}, {"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 1, "num_gpus": 1}]
    cfg = load_config(None, BASE + ["data.num_train=8", "data.num_val=4", f"shards.root={root}",
                                    "depthgen.num_actors=2", "mining.num_actors=2", "eval.num_workers=2"])
    seen = {"depth": [], "mining": [], "killed": None, "added": None}
    with private_cluster(nodes, pythonpath=REPO) as cluster:
        seen["head"] = cluster.head_node.node_id

        def lose_a_node(result):  # after the first complete shard, while the next units run
            seen["depth"].append(result["node"])
            if seen["killed"] is None:
                seen["killed"] = result["node"]
                cluster.remove_node(node_of(cluster, result["node"]), allow_graceful=False)
                seen["added"] = cluster.add_node(num_cpus=1, num_gpus=1).node_id  # the autoscaler's replacement

        depth = generate_depth(cfg, "train", progress=False, on_unit=lose_a_node)
        generate_depth(cfg, "val", progress=False)
        seen["depth_keys"] = [raw["__key__"] for url in shards.shard_urls(root, "train", "depth")
                              for raw in shards.iter_shard(url)]
        with mining_group(cfg) as group:
            mined = {s: mine_neighbors(cfg, s, progress=False, group=group,
                                       on_unit=lambda r: seen["mining"].append(r["node"])) for s in ("train", "val")}
        cfg.model.n_classes = depth["n_classes"]
        model = evaluator.RandomModel("tiny_vit", "random", 16, depth["n_classes"], 0)
        urls = evaluator.shard_list(root, "val")
        dist = evaluator.evaluate(cfg, model, urls)
    local = evaluator.evaluate(cfg, model, urls, workers=0)  # the same evaluation in this process, no Ray
    seen.update({"depth_total": depth["total"], "mined": {s: m["total"] for s, m in mined.items()},
                 "eval_nodes": dist["nodes"], "eval_workers": dist["workers"],
                 "eval_equal": all((dist["confusion"][k] == local["confusion"][k]).all() for k in local["confusion"])
                 and set(dist["confusion"]) == set(local["confusion"]), "eval_heads": sorted(local["confusion"])})
    _write(out, seen)


def mining_bytes(root: str, out: str) -> None:
    """Stage 2 with two real MiningWorker actors on each of two simulated nodes; depth-shard bytes counted per
    node by the counting file system of ``bench/mining_io.py`` (the benchmark's own run, smaller)."""
    import argparse

    from bench.mining_io import mining_run

    args = argparse.Namespace(nodes=2, gpus_per_node=2, samples=64, per_shard=2, positives=3)
    os.makedirs(root, exist_ok=True)
    _write(out, mining_run(args, root))


def segment_node_loss(root: str, out: str) -> None:
    """Segment a folder with 2 actors (CRF as Ray tasks) on a 3-node cluster; the node of the first finished unit
    is removed right then (and a replacement added): its actor restarts, every image ends in exactly one unit."""
    import numpy as np
    from PIL import Image

    from cluster import evaluator, segmentation
    from cluster.simcluster import node_of, private_cluster
    from depthg import inference
    from depthg.checkpoint import save_segmenter
    from depthg.config import Config

    images = os.path.join(root, "images")
    os.makedirs(images)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(os.path.join(images, f"im{i:02d}.png"))
    cfg = Config()
    cfg.model.backbone, cfg.model.weights, cfg.model.code_dim, cfg.model.n_classes = "tiny_vit", "random", 8, 3
    ckpt = os.path.join(root, "segmenter.pt")
    save_segmenter(ckpt, cfg, evaluator.RandomModel("tiny_vit", "random", 8, 3, 0, seed=1)()[1], {})
    output = os.path.join(root, "labels")
    settings = {"checkpoint": ckpt, "input": images, "output": output, "probe": "cluster", "crf": True,
                "resolution": 32, "flip": True, "mapping": None, "palette": [[i * 60, 0, 0] for i in range(3)],
                "overlays": False, "probs": True, "unit_size": 2, "batch_size": 2}
    items = inference.list_inputs(images)
    nodes = [{"num_cpus": 1, "num_gpus": 0}, {"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 1, "num_gpus": 1}]
    seen = {"units": [], "killed": None, "added": None}
    with private_cluster(nodes, pythonpath=REPO) as cluster:
        seen["head"] = cluster.head_node.node_id

        def lose_a_node(record):  # after the first complete unit, while the others run
            seen["units"].append({"unit": record["unit"], "node": record["node"],
                                  "sources": [e["source"] for e in record["images"]]})
            if seen["killed"] is None:
                seen["killed"] = record["node"]
                cluster.remove_node(node_of(cluster, record["node"]), allow_graceful=False)
                seen["added"] = cluster.add_node(num_cpus=1, num_gpus=1).node_id

        manifest = segmentation.segment(settings, evaluator.CheckpointModel(ckpt), items, workers=2, progress=False,
                                        on_unit=lose_a_node, device="cuda")
    seen.update({"inputs": [f for f, _ in items], "manifest": manifest,
                 "records": [{"unit": r["unit"], "sources": [e["source"] for e in r["images"]], "node": r["node"]}
                             for r in segmentation.read_records(output)],
                 "labels": sorted(f for f in os.listdir(output) if f.endswith("_label.png"))})
    _write(out, seen)


def _write(path: str, data: dict) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1, default=str)


if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    {"fake-driver": fake_driver, "fake-train": fake_train, "multinode": multinode, "mining-bytes": mining_bytes,
     "segment-node-loss": segment_node_loss}[name](*args)
