"""CPU smoke test: the one-command pipeline's main() end to end on a tiny config.

Real stages: Ray depth + mining actors write shards, 2 torchrun/gloo DeepSpeed workers train, Ray
evaluation actors score the val split (with the dense CRF) and the report is written.
"""
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    from launch import pipeline

    shards_root, output = str(tmp_path / "shards"), str(tmp_path / "run")
    result = pipeline.main(["--config", os.path.join(REPO, "configs", "smoke.yaml"), "--quiet",
                            f"shards.root={shards_root}", f"train.output={output}", "--eval-workers", "2"])

    manifest = json.load(open(os.path.join(shards_root, "train", "manifest.json")))
    assert manifest["total"] == 6 * 5  # five crops per training scene, every one present
    report = os.path.join(output, "report")
    for name in ("eval.md", "eval.json", "confusion.png", "samples.png"):
        assert os.path.getsize(os.path.join(report, name)) > 0, name
    scores = json.load(open(os.path.join(report, "eval.json")))["scores"]
    for head in ("cluster", "cluster_crf", "linear", "linear_crf"):
        assert 0.0 < scores[head]["accuracy"] <= 1.0, head
        assert 0.0 <= scores[head]["miou"] <= 1.0, head
    assert result["scores"]["cluster"]["accuracy"] == scores["cluster"]["accuracy"]
    assert set(result["timings"]) == {"data_s", "train_s", "eval_s"}


def test_pipeline_into_a_used_output_is_refused_before_any_stage(tmp_path):
    """A rerun of the one command into the folder of an earlier run stops before stage 1's minutes of work."""
    from depthg.config import ConfigError
    from launch import pipeline

    output = tmp_path / "run"
    output.mkdir()
    (output / "segmenter.pt").write_bytes(b"an earlier run")
    shards_root = tmp_path / "shards"
    with pytest.raises(ConfigError, match="already holds a run.*--resume auto"):
        pipeline.main(["--config", os.path.join(REPO, "configs", "smoke.yaml"), "--quiet",
                       f"shards.root={shards_root}", f"train.output={output}"])
    assert not shards_root.exists()  # no stage ran
    assert (output / "segmenter.pt").read_bytes() == b"an earlier run"
