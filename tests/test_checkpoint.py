"""Segmenter checkpoints: round trip (local and on a real S3 server), weights_only, clear mismatch errors."""
from __future__ import annotations

import io
import pathlib

import pytest
import torch

from depthg import io as dio
from depthg.checkpoint import FORMAT, CheckpointError, load_segmenter, read_header, save_segmenter
from depthg.config import load_config
from depthg.models import build_segmenter

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _setup(lhp: bool = True, extra_clusters: int = 2):
    cfg = load_config(None, ["model.backbone=tiny_vit", "model.code_dim=6", "model.n_classes=4",
                             f"model.extra_clusters={extra_clusters}", "loss.depth.mode=distance"])
    torch.manual_seed(0)
    seg = build_segmenter(cfg.model, feat_dim=32, lhp_enabled=lhp)
    return cfg, seg


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_roundtrip_local(tmp_path):
    cfg, seg = _setup()
    url = str(tmp_path / "run" / "segmenter.pt")
    save_segmenter(url, cfg, seg, extra={"batch": 17, "miou": 0.25})
    # plain containers and tensors only: loadable by torch with weights_only=True
    raw = torch.load(url, weights_only=True)
    assert raw["format"] == FORMAT and raw["backbone"] == "tiny_vit" and raw["feat_dim"] == 32
    cfg2, seg2, extra = load_segmenter(url)
    assert cfg2 == cfg and extra == {"batch": 17, "miou": 0.25}
    assert seg2.lhp is not None and seg2.cluster_probe.n_clusters == 6
    _assert_same(seg, seg2)
    feats = torch.randn(1, 32, 3, 3)
    assert torch.equal(seg(feats), seg2(feats))
    assert read_header(url)["segmenter"]["lhp"] is True


def test_roundtrip_without_lhp_and_extra(tmp_path):
    cfg, seg = _setup(lhp=False, extra_clusters=0)
    url = str(tmp_path / "s.pt")
    save_segmenter(url, cfg, seg)
    _, seg2, extra = load_segmenter(url)
    assert seg2.lhp is None and extra == {}
    _assert_same(seg, seg2)


def test_roundtrip_s3(s3):
    cfg, seg = _setup()
    url = f"{s3}/runs/a/segmenter.pt"
    save_segmenter(url, cfg, seg, extra={"step": 3})
    assert dio.exists(url)
    cfg2, seg2, extra = load_segmenter(url)
    assert cfg2 == cfg and extra == {"step": 3}
    _assert_same(seg, seg2)


def _write(path, payload):
    buf = io.BytesIO()
    torch.save(payload, buf)
    path.write_bytes(buf.getvalue())


def test_wrong_format_named(tmp_path):
    cfg, seg = _setup()
    bad = tmp_path / "other.pt"
    _write(bad, {"format": "something/2", "state_dict": {}})
    with pytest.raises(CheckpointError, match=r"other.pt.*something/2.*depthg-segmenter/1"):
        load_segmenter(str(bad))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_segmenter(str(junk))
    with pytest.raises(FileNotFoundError):
        load_segmenter(str(tmp_path / "missing.pt"))


def test_shape_mismatch_names_the_key(tmp_path):
    cfg, seg = _setup()
    url = tmp_path / "seg.pt"
    save_segmenter(str(url), cfg, seg)
    payload = torch.load(url, weights_only=True)
    payload["state_dict"]["linear_probe.conv.weight"] = torch.zeros(9, 6, 1, 1)
    _write(url, payload)
    with pytest.raises(CheckpointError, match=r"seg.pt.*linear_probe.conv.weight.*\(9, 6, 1, 1\)"):
        load_segmenter(str(url))
    payload["segmenter"]["code_dim"] = 99
    _write(url, payload)
    with pytest.raises(CheckpointError, match=r"seg.pt.*code_dim"):
        load_segmenter(str(url))


def test_config_with_unknown_key_is_rejected_naming_file(tmp_path):
    cfg, seg = _setup()
    url = tmp_path / "seg.pt"
    save_segmenter(str(url), cfg, seg)
    payload = torch.load(url, weights_only=True)
    payload["config"]["model"]["no_such_key"] = 1
    _write(url, payload)
    with pytest.raises(CheckpointError, match=r"seg.pt.*no_such_key"):
        load_segmenter(str(url))


def _import_graph(package: str = "depthg") -> dict[str, set[str]]:
    """``{module: the package's modules it imports}`` from the source, imports inside functions included; an import
    between a package and its own submodules (re-exports) is left out."""
    import ast

    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}
        graph[name] = {m for m in found if m in files and m != name
                       and not m.startswith(name + ".") and not name.startswith(m + ".")}
    return graph


def test_the_library_has_no_import_cycle_and_config_stays_small():
    """depthg's modules import in one direction (checkpoint -> reference, config -> overrides, both -> errors; no
    cycle, not even through an import inside a function), and depthg/config.py stays under 400 lines."""
    graph = _import_graph()
    assert "depthg.reference" in graph["depthg.checkpoint"] and "depthg.checkpoint" not in graph["depthg.reference"]
    cycles, done = [], set()

    def walk(node, path):
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                walk(nxt, path + [nxt])
        done.add(node)

    for module in sorted(graph):
        walk(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert len((ROOT / "depthg" / "config.py").read_text().splitlines()) < 400
