"""The reproduction sweep (``cluster/reproduce.py``, ``launch/reproduce.py``).

Unit tests of the plan, the resources, the refusals and the table (no Ray), then ONE integration test on the
session's local Ray (``ray_local``): 2 rows x 2 seeds of the smoke config as real Ray Tune trials (the product's
trainer and ``launch/evaluate.py --workers 0``), one trial attempt SIGKILLed once (Tune retries it, resuming from
its checkpoint), the driver (a subprocess attached to the same Ray) SIGKILLed while a trial is paused, then resumed
with ``--resume`` (and a ``--checkpoint`` row added): no finished trial trains again (counted by the trace files each
attempt writes), the paused one resumes from its checkpoint, the checkpoint row is evaluated without training, and
the table's numbers equal every trial's eval.json. Synchronised on files, never
on sleeps racing a process (the waits are caps).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from ray import cloudpickle

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)
import train_hooks  # noqa: E402

cloudpickle.register_pickle_by_value(train_hooks)  # Ray workers get the hook classes by value

from cluster import reproduce  # noqa: E402
from depthg import shards  # noqa: E402
from depthg.config import ConfigError, load_config, to_dict  # noqa: E402

SMOKE = os.path.join(REPO, "configs", "smoke.yaml")
ROWS = ["smoke", "smoke:sampling.mode=random"]
TRIALS = ["smoke/seed0", "smoke/seed1", "smoke+sampling.mode=random/seed0", "smoke+sampling.mode=random/seed1"]
CRASHES, PAUSES = TRIALS[0], TRIALS[3]  # one attempt SIGKILLed at batch 3; the trial the first driver dies beside
TINY = ["train.num_batches=4", "train.ckpt_every=2", "train.finish=none", "train.log_every=2"]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    """Smoke-sized shards once per module: ``{prefix}/synthetic`` (smoke's own shards.root is shards/synthetic)."""
    root = tmp_path_factory.mktemp("reproduce-shards")
    folder = str(root / "synthetic")
    shards.write_test_shards(folder, 8, size=(32, 32), num_positives=2, samples_per_shard=4)
    shards.write_test_shards(folder, 4, size=(32, 32), with_positives=False, split="val")
    return str(root)


def _request(**kw) -> reproduce.Request:
    return reproduce.Request(**{"configs": ROWS, "seeds": [0, 1], **kw})


# ----------------------------------------------------------------------------- the plan
def test_paper_rows_map_shards_under_the_prefix_and_carry_the_paper_numbers(tmp_path):
    req = reproduce.Request(configs=["coco_vits8", "coco_vits8_lhp", "cityscapes_vitb8", "potsdam_vits8", "coco_vitb8"],
                            seeds=reproduce.parse_seeds("3"), overrides=["shards.root=s3://b/depthg"])
    plan = reproduce.plan_sweep(req, "s3://b/sweep")
    assert len(plan.trials) == 15 and [t.seed for t in plan.row_trials("coco_vits8")] == [0, 1, 2]
    roots = {t.row: t.shards for t in plan.trials}
    assert roots == {"coco_vits8": "s3://b/depthg/coco", "coco_vits8_lhp": "s3://b/depthg/coco",
                     "cityscapes_vitb8": "s3://b/depthg/cityscapes", "potsdam_vits8": "s3://b/depthg/potsdam",
                     "coco_vitb8": "s3://b/depthg/coco_vitb8"}
    t = plan.trials[1]
    assert t.cfg["train"]["seed"] == 1 and t.cfg["train"]["resume"] == "auto"
    assert t.cfg["train"]["output"] == t.folder == "s3://b/sweep/trials/coco_vits8/seed1"
    paper = {r.id: r.paper["cluster_crf"] for r in plan.rows}
    assert paper["coco_vits8"] == {"accuracy": 56.3, "miou": 25.6} and paper["potsdam_vits8"]["miou"] is None
    assert plan.rows[0].paper["linear_crf"] == {"accuracy": 73.7, "miou": 38.9}
    assert paper["coco_vits8_lhp"] == {"accuracy": 55.1, "miou": 26.7}
    req.checkpoints = reproduce.parse_checkpoints(["coco_vits8=s3://b/cocostuff_vits.ckpt"])
    published = reproduce.plan_sweep(req, "s3://b/sweep").trials[-1]  # evaluated beside its row, not trained
    assert (published.id, published.train, published.shards) == ("coco_vits8/published", False, "s3://b/depthg/coco")


def test_ablation_rows_are_table_4_from_the_existing_settings():
    plan = reproduce.plan_sweep(reproduce.Request(configs=["coco_vits8"], seeds=[0, 1], ablation=True), "/x")
    assert [r.id for r in plan.rows] == [f"coco_vits8+{v}" for v in ("stego", "fps", "depth", "depthg", "lhp")]
    cfg = {t.row: t.cfg for t in plan.trials}
    settings = {row: (c["loss"]["depth"]["mode"], c["sampling"]["mode"], c["loss"]["lhp"]["enabled"]) for row, c in cfg.items()}
    assert settings == {"coco_vits8+stego": ("none", "random", False), "coco_vits8+fps": ("none", "fps_reference", False),
                        "coco_vits8+depth": ("reference", "random", False),
                        "coco_vits8+depthg": ("reference", "fps_reference", False),
                        "coco_vits8+lhp": ("reference", "fps_reference", True)}
    assert {r.id: r.paper["cluster_crf"]["miou"] for r in plan.rows} == {
        "coco_vits8+stego": 24.5, "coco_vits8+fps": 24.6, "coco_vits8+depth": 24.7, "coco_vits8+depthg": 25.6,
        "coco_vits8+lhp": 26.7}
    assert {r.baseline for r in plan.rows[1:]} == {"coco_vits8+stego"} and not plan.rows[0].baseline
    # + 3D-LHP is the recipe of the paper's 55.1 / 26.7, configs/coco_vits8_lhp.yaml (mode: reference), not the
    # default loss.lhp.mode=improved: the row's config equals that file's but for the sweep's own keys
    assert cfg["coco_vits8+lhp"]["loss"]["lhp"]["mode"] == "reference"
    sibling = reproduce._flat(to_dict(load_config(os.path.join(REPO, "configs", "coco_vits8_lhp.yaml"))))
    mine = reproduce._flat(json.loads(json.dumps(cfg["coco_vits8+lhp"])))
    own = {"train.output", "train.seed", "train.resume", "shards.root"}
    assert {k: v for k, v in mine.items() if k not in own} == {k: v for k, v in sibling.items() if k not in own}
    # random-sampling rows sample a fixed S (the reference's decay is its FPS option); FPS rows keep COCO's decay
    decay = {row: (c["sampling"]["decay_every"], c["sampling"]["first_decay"]) for row, c in cfg.items()}
    assert decay == {"coco_vits8+stego": (0, 0), "coco_vits8+depth": (0, 0), "coco_vits8+fps": (1000, 1),
                     "coco_vits8+depthg": (1000, 1), "coco_vits8+lhp": (1000, 1)}
    # no _lhp sibling: the reference depth term gets the reference LHP (Potsdam's 80.4 is the reference code's)
    potsdam = reproduce.plan_sweep(reproduce.Request(configs=["potsdam_vits8"], seeds=[0], ablation=True), "/x")
    lhp = next(t.cfg for t in potsdam.trials if t.row == "potsdam_vits8+lhp")["loss"]["lhp"]
    assert (lhp["enabled"], lhp["mode"]) == (True, "reference")


def test_trial_resources_follow_the_gpu_node_types():
    g5 = [{"name": "gpu", "CPU": 48, "GPU": 4, "max_workers": 4}]
    head = [{"CPU": 0}]
    assert reproduce.trial_resources(reproduce.Request(), head, g5) == {"CPU": 12.0, "GPU": 1.0}  # none up: requested
    assert reproduce.trial_resources(reproduce.Request(), [{"CPU": 2}], None) == {"CPU": 1.0}
    assert reproduce.trial_resources(reproduce.Request(gpus_per_trial=0, cpus_per_trial=3), head, g5) == {"CPU": 3.0}
    with pytest.raises(ConfigError, match="1-GPU recipe"):
        reproduce.trial_resources(reproduce.Request(gpus_per_trial=2), head, g5)
    with pytest.raises(ConfigError, match="--gpus-per-trial 1"):
        reproduce.trial_resources(reproduce.Request(gpus_per_trial=1), [{"CPU": 2}], None)
    # the placement group: the trial's process holds the GPU and 1 CPU, its CRF tasks the other k - 1
    assert reproduce.trial_bundles({"CPU": 12.0, "GPU": 1.0}) == [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 11.0}]
    assert reproduce.crf_cpus({"CPU": 12.0, "GPU": 1.0}) == 11
    assert reproduce.trial_bundles({"CPU": 1.0}) == [{"CPU": 1.0}] and reproduce.crf_cpus({"CPU": 1.0}) == 0


def test_an_s3_output_with_a_trailing_slash_is_the_same_sweep():
    req = reproduce.Request(configs=["smoke"], seeds=[0], overrides=["shards.root=s3://b/depthg/"])
    plan = reproduce.plan_sweep(req, "s3://b/x/")
    assert plan.output == "s3://b/x" and plan.trials[0].folder == "s3://b/x/trials/smoke/seed0"
    assert plan.trials[0].shards == "s3://b/depthg/synthetic"
    stored = json.loads(json.dumps(reproduce.sweep_record(plan, None)))
    for output in ("s3://b/x", "s3://b/x/", "s3://b/x//"):  # resumed with or without the slash: not "moved"
        again = reproduce.relocated(stored, reproduce.absolute(output))
        assert again == stored and "//trials" not in json.dumps(again)
        reproduce.check_same(reproduce.plan_sweep(req, output), again)


def test_flag_ranges_are_refused_before_ray_naming_the_flag(tmp_path):
    from launch import reproduce as launch

    for kw, flag in (({"gpus_per_trial": 2}, "--gpus-per-trial 2"), ({"cpus_per_trial": -1}, "--cpus-per-trial -1"),
                     ({"max_concurrent": -1}, "--max-concurrent -1"), ({"max_failures": -7}, "--max-failures -7")):
        with pytest.raises(ConfigError, match=f"^{flag}: .*expected"):
            reproduce.plan_sweep(reproduce.Request(configs=["smoke"], **kw), str(tmp_path / "x"))
    reproduce.plan_sweep(reproduce.Request(configs=["smoke"], max_failures=-1, max_concurrent=0), str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="^--max-concurrent -1: expected >= 0"):  # from the command line, no Ray
        launch.main(["--configs", "smoke", "--max-concurrent", "-1", "--output", str(tmp_path / "y")], shared=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_checkpoint_row_id_may_hold_an_equals_sign(tmp_path):
    from launch import reproduce as launch

    def request(*argv):
        return launch.request_from(launch.build_parser().parse_args(["--configs", *ROWS, *argv]), [])

    req = request("--checkpoint", "smoke+sampling.mode=random=/p/segmenter.pt", "--checkpoint", "smoke=s3://b/a=b.pt")
    assert req.checkpoints == {"smoke+sampling.mode=random": "/p/segmenter.pt", "smoke": "s3://b/a=b.pt"}
    published = [t for t in reproduce.plan_sweep(req, str(tmp_path)).trials if not t.train]
    assert [(t.id, t.checkpoint) for t in published] == [("smoke+sampling.mode=random/published", "/p/segmenter.pt"),
                                                         ("smoke/published", "s3://b/a=b.pt")]
    with pytest.raises(ConfigError, match=r"^--checkpoint smoke\+depth=/p.pt: 'smoke\+depth' is neither a row"):
        reproduce.plan_sweep(request("--checkpoint", "smoke+depth=/p.pt"), str(tmp_path))
    with pytest.raises(ConfigError, match="^--checkpoint 'smoke': expected ROW=URL"):
        request("--checkpoint", "smoke")


def test_resume_alone_replans_from_another_working_directory(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    (tmp_path / "a" / "mine.yaml").write_text(open(SMOKE).read())
    req = reproduce.Request(configs=["./mine.yaml:sampling.mode=random"], seeds=[0],
                            overrides=["shards.root=prefix", "train.num_batches=4"],
                            checkpoints={"mine+sampling.mode=random": "seg.pt"})
    plan = reproduce.plan_sweep(req, "../sweep")
    stored = json.loads(json.dumps(reproduce.sweep_record(plan, None)))
    assert stored["request"]["configs"] == [f"{tmp_path}/a/mine.yaml:sampling.mode=random"]
    assert stored["request"]["overrides"] == [f"shards.root={tmp_path}/a/prefix", "train.num_batches=4"]
    assert stored["request"]["checkpoints"] == {"mine+sampling.mode=random": f"{tmp_path}/a/seg.pt"}
    monkeypatch.chdir(tmp_path / "b")  # --resume alone: the stored request, replanned elsewhere
    again = reproduce.plan_sweep(reproduce.Request(**stored["request"]), str(tmp_path / "sweep"))
    reproduce.check_same(again, stored)
    assert [t.shards for t in again.trials] == [f"{tmp_path}/a/prefix/synthetic"] * 2


def test_failure_lines_say_retrying_or_failed_for_good():
    line = reproduce.failure_line("coco/seed0", 1, 2, "RayActorError: died", retrying=True)
    assert line.startswith("trial coco/seed0: attempt 1 failed, retrying (retry 1 of 2, 1 left after it")
    assert "errored" not in line and line.endswith(": RayActorError: died")
    assert "no retry limit" in reproduce.failure_line("t", 5, -1, "e", retrying=True)
    assert reproduce.failure_line("t", 3, 2, "e", retrying=False) == \
        "trial t: attempt 3 failed; failed for good (3 attempts, --max-failures 2): e"


def test_the_report_writes_its_done_marker_last(tmp_path):
    from depthg import metrics, report

    result = {"confusion": {"cluster": np.eye(3, dtype=np.int64)}, "images": 1,
              "samples": [{"id": "a", "image": None, "label": None, "pred": np.zeros((2, 2))}]}  # the grid fails
    result["scores"] = metrics.score_confusions(result["confusion"])
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "eval.json").write_text("{}")  # an earlier report's marker
    with pytest.raises(Exception):  # noqa: B017 - killed between the report's files
        report.write_report(str(folder), result, {}, ["a", "b", "c"], report.dataset_style("x", 3)[1],
                            extra={"eval_config.yaml": b"x: 1\n"})
    assert not (folder / "eval.json").exists() and not report.complete(str(folder))
    result["samples"] = []
    paths = report.write_report(str(folder), result, {}, ["a", "b", "c"], report.dataset_style("x", 3)[1],
                                extra={"eval_config.yaml": b"x: 1\n"})
    assert report.complete(str(folder)) and open(paths["eval_config.yaml"]).read() == "x: 1\n"
    assert json.load(open(paths["eval.json"]))["images"] == 1
    (folder / "samples.png").unlink()  # the code before wrote eval.json first: killed after it, not done
    assert not report.complete(str(folder))


# ----------------------------------------------------------------------------- refused before any trial
def test_bad_requests_are_refused_before_ray_or_any_trial(tmp_path, prefix):
    from launch import reproduce as launch

    def refused(argv, match):
        with pytest.raises(ConfigError, match=match):
            launch.main(argv + ["--gpus-per-trial", "0"], shared=False)

    out = tmp_path / "used"
    out.mkdir()
    (out / "reproduce.md").write_text("an earlier sweep")
    refused(["--configs", "smoke", "--output", str(out)], r"already holds a sweep.*--resume")
    refused(["--output", str(tmp_path / "new"), "--resume"], "no sweep to resume")
    missing = str(tmp_path / "nowhere")
    refused(["--configs", "smoke", "--output", str(tmp_path / "a"), f"shards.root={missing}"],
            rf"no training shards at {missing}/synthetic .*python launch/generate_depth.py --config configs/smoke.yaml "
            rf"shards.root={missing}/synthetic")
    refused(["--configs", "smoke", "--output", str(tmp_path / "b"), "train.output=/elsewhere"], "use --output")
    refused(["--configs", "nonesuch", "--output", str(tmp_path / "c")], "no config named 'nonesuch'")
    refused(["--configs", "smoke", "--seeds", "0,0", "--output", str(tmp_path / "d")], "listed once")
    assert (out / "reproduce.md").read_text() == "an earlier sweep"
    assert not any((tmp_path / n).exists() for n in "abcd")  # nothing was written
    plan = reproduce.plan_sweep(_request(overrides=[f"shards.root={prefix}"]), str(tmp_path / "e"))
    with pytest.raises(ConfigError, match="a local folder, but the trials run on the cluster's nodes"):
        reproduce.check_trials(plan, shared=True)  # a driver attached to a cluster: s3:// only
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"w")
    plan = reproduce.plan_sweep(_request(overrides=["shards.root=s3://b/depthg", f"model.weights={weights}"]),
                                "s3://b/sweep")
    with pytest.raises(ConfigError, match=rf"^{weights}: a local folder, but the trials run on the cluster's nodes"):
        reproduce.check_trials(plan, shared=True)  # the weights file too


# ----------------------------------------------------------------------------- the table
def _fake_eval(folder: str, cluster_crf_miou: float) -> dict:
    from depthg import io

    scores = {h: {"accuracy": 0.5 + cluster_crf_miou / 10, "miou": cluster_crf_miou} for h, _ in reproduce.HEADS}
    for name in ("eval.md", "confusion.png", "samples.png"):  # a whole report: eval.json last
        io.write_bytes(io.join(folder, "report", name), b"")
    io.write_bytes(reproduce.eval_json(folder), json.dumps({"scores": scores}).encode())
    return scores


def test_table_means_paired_intervals_and_a_partial_table(tmp_path):
    from depthg.metrics import paired_difference

    plan = reproduce.plan_sweep(reproduce.Request(configs=["smoke"], seeds=[0, 1, 2], ablation=True), str(tmp_path))
    values = {"smoke+stego": [0.30, 0.32, 0.31], "smoke+depthg": [0.35, 0.33, 0.36]}
    for row, miou in values.items():
        for t, v in zip(plan.row_trials(row), miou):
            _fake_eval(t.folder, v)
    table = reproduce.write_table(plan, errors={"smoke+fps/seed0": "RuntimeError: boom"})
    rows = {r["id"]: r for r in table["rows"]}
    stats = rows["smoke+depthg"]["heads"]["cluster_crf"]["miou"]
    assert stats["values"] == pytest.approx([35.0, 33.0, 36.0]) and stats["mean"] == pytest.approx(104 / 3)
    assert stats["seeds"] == [0, 1, 2]  # each value's seed
    assert stats["std"] == pytest.approx(float(np.std([35.0, 33.0, 36.0], ddof=1)))
    paired = rows["smoke+depthg"]["paired"]["cluster_crf"]["miou"]
    expected = paired_difference([35, 33, 36], [30, 32, 31])
    assert paired["ci95"] == pytest.approx(expected["ci95"]) and paired["mean"] == pytest.approx(expected["mean"])
    assert rows["smoke+fps"]["done"] == 0 and rows["smoke+fps"]["trials"][0]["status"] == "failed"
    assert table["status"] == {"done": 6, "failed": 1, "pending": 8}
    md = (tmp_path / "reproduce.md").read_text()
    assert "6 of 15 trials done, 1 failed" in md and "+3.7 [" in md and "RuntimeError: boom" in md
    trial = rows["smoke+depthg"]["trials"][0]  # paths relative to the sweep's folder, the config to the repository
    assert (trial["folder"], trial["report"]) == ("trials/smoke+depthg/seed0", "trials/smoke+depthg/seed0/report/eval.md")
    assert rows["smoke+depthg"]["config"] == "configs/smoke.yaml" and str(tmp_path) not in json.dumps(table["rows"])
    assert md.count(str(tmp_path)) == 1  # "Output: ..." (outside the repository: absolute)
    assert "| [eval.md](trials/smoke+depthg/seed0/report/eval.md) | [run](trials/smoke+depthg/seed0) |" in md


def test_table_differences_to_the_paper_linear_and_the_published_checkpoint(tmp_path):
    plan = reproduce.plan_sweep(reproduce.Request(configs=["coco_vits8"], seeds=[0, 2],
                                                  checkpoints={"coco_vits8": str(tmp_path / "seg.pt")}), str(tmp_path))
    for t, miou in zip(plan.trials, (0.30, 0.34, 0.28)):  # seed 0, seed 2, the published checkpoint
        _fake_eval(t.folder, miou)
    row = reproduce.write_table(plan)["rows"][0]
    assert row["heads"]["linear_crf"]["miou"]["seeds"] == [0, 2]
    assert row["heads"]["linear_crf"]["miou"]["values"] == pytest.approx([30.0, 34.0])
    assert row["vs_paper"]["linear_crf"] == pytest.approx({"accuracy": 53.2 - 73.7, "miou": 32.0 - 38.9})
    assert row["published_vs_paper"]["cluster_crf"] == pytest.approx({"accuracy": 52.8 - 56.3, "miou": 28.0 - 25.6})
    md = (tmp_path / "reproduce.md").read_text()
    assert "| 73.7 / 38.9 | -20.5 / -6.9 | 52.8 / 28.0 | -3.5 / +2.4 |" in md, md


def test_the_partial_table_marks_a_trial_failed_for_good_at_once(tmp_path):
    from types import SimpleNamespace

    plan = reproduce.plan_sweep(reproduce.Request(configs=["smoke"], seeds=[0, 1]), str(tmp_path))
    progress = reproduce._progress(plan, 0, quiet=True)

    def trial(tid):
        return SimpleNamespace(config={"trial": {"id": tid}}, num_failures=3, max_failures=2,
                               error_file="RuntimeError: boom", last_result={})

    def status():
        return {t["id"]: t["status"] for t in json.load(open(tmp_path / "reproduce.json"))["rows"][0]["trials"]}

    progress.on_trial_error(0, [], trial("smoke/seed0"))  # Tune gave it up: the table says so now
    assert status() == {"smoke/seed0": "failed", "smoke/seed1": "pending"}
    _fake_eval(plan.trials[1].folder, 0.3)
    progress.on_trial_complete(0, [], trial("smoke/seed1"))
    assert status() == {"smoke/seed0": "failed", "smoke/seed1": "done"}
    assert "failed: RuntimeError: boom" in (tmp_path / "reproduce.md").read_text()


# ----------------------------------------------------------------------------- on Ray Tune, end to end
def _hooks(trace: str, crash_marker: str = "", pause: str = "") -> dict:
    hooks = {}
    for tid in TRIALS:
        parts = [train_hooks.TraceSamples(os.path.join(trace, reproduce._dirname(tid)))]
        if tid == CRASHES and crash_marker:
            parts.append(train_hooks.FailOnce(0, 3, crash_marker, kill=True))
        if tid == PAUSES and pause:
            parts.insert(0, train_hooks.PauseAt(3, pause))
        hooks[tid] = train_hooks.HookList(*parts)
    return hooks


def _attempts(trace: str, tid: str) -> list[int]:
    """The first batch of every training attempt of ``tid`` traced in ``trace`` (one process = one attempt)."""
    path = os.path.join(trace, reproduce._dirname(tid), "rank0.jsonl")
    if not os.path.exists(path):
        return []
    first: dict = {}
    for row in map(json.loads, open(path)):
        first.setdefault(row["pid"], row["batch"])
    return list(first.values())


def _wait(paths: list[str], proc, cap: float = 600) -> None:
    from events import wait_for_file

    for path in paths:
        assert wait_for_file(path, proc, cap), f"{path} did not appear (driver exit code {proc.poll()})"


def test_sweep_on_tune_retries_a_killed_trial_and_resumes_a_killed_driver(tmp_path, prefix, ray_local):
    from launch import reproduce as launch

    out, trace, trace2 = str(tmp_path / "sweep"), str(tmp_path / "trace"), str(tmp_path / "trace2")
    crash, pause = str(tmp_path / "crashed"), str(tmp_path / "pause")
    argv = ["--configs", *ROWS, "--seeds", "2", "--gpus-per-trial", "0", "--output", out, "--quiet",
            f"shards.root={prefix}", *TINY]
    address = ray_local.get_runtime_context().gcs_address
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, __file__, address, json.dumps(argv), trace, crash, pause],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])})
        try:  # the retried trial is done and the paused one waits: kill the driver (its trials die with it)
            _wait([os.path.join(out, "trials", *CRASHES.split("/"), "trial.json"),  # written after eval.json
                   os.path.join(pause, "paused-0")], driver)
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    folders = {tid: os.path.join(out, "trials", *tid.split("/")) for tid in TRIALS}
    done = {tid: open(reproduce.eval_json(f), "rb").read() for tid, f in folders.items()
            if os.path.exists(reproduce.eval_json(f))}
    assert os.path.exists(crash) and _attempts(trace, CRASHES) == [0, 2]  # killed at batch 3, resumed at 2
    assert len(os.listdir(os.path.join(folders[CRASHES], "attempts"))) == 2 and PAUSES not in done
    log = open(tmp_path / "driver.log").read()  # the sweep's own line: a retry, not an error (flushed before the kill)
    assert f"trial {CRASHES}: attempt 1 failed, retrying (retry 1 of 2, 1 left after it" in log, log[-3000:]

    # the sweep's folder moved elsewhere, then resumed there with the same arguments plus a checkpoint row (a trial
    # without training), each trial now of 2 CPUs (its CRF as Ray tasks on the second), in this process, which
    # started the local Ray: local folders allowed without any override (started_here). The finished crashed
    # trial's segmenter.pt evaluated again (CRF tasks) must give that trial's numbers (CRF in its process)
    moved = str(tmp_path / "moved")
    os.rename(out, moved)
    out, folders = moved, {tid: os.path.join(moved, "trials", *tid.split("/")) for tid in TRIALS}
    argv[argv.index("--output") + 1] = out
    published = os.path.join(folders[CRASHES], "segmenter.pt")
    table = launch.main([*argv, "--resume", "--cpus-per-trial", "2", "--checkpoint", f"smoke={published}"],
                        hooks=_hooks(trace2))
    assert json.load(open(os.path.join(out, "sweep.json")))["trials"][PAUSES]["cfg"]["train"]["output"] == \
        folders[PAUSES]  # the stored sweep rebased onto its new folder
    folders["smoke/published"] = os.path.join(out, "trials", "smoke", "published")
    for tid, crf in ((CRASHES, "this process"), (PAUSES, "1-CPU Ray tasks"), ("smoke/published", "1-CPU Ray tasks")):
        meta = json.load(open(reproduce.eval_json(folders[tid])))["meta"]
        assert meta["crf runs on"].startswith(crf), (tid, meta)
        assert json.load(open(os.path.join(folders[tid], "trial.json")))["crf_cpus"] == (0 if tid == CRASHES else 1)
    del folders["smoke/published"]

    for tid, before in done.items():  # finished trials: not trained again, their reports untouched
        assert _attempts(trace2, tid) == [] and open(reproduce.eval_json(folders[tid]), "rb").read() == before
    assert _attempts(trace2, PAUSES) == [2]  # the paused trial resumed from its checkpoint of batch 2
    assert table["status"] == {"done": 5, "failed": 0, "pending": 0}
    rows = {r["id"]: r for r in json.load(open(os.path.join(out, "reproduce.json")))["rows"]}
    crashed = json.load(open(reproduce.eval_json(folders[CRASHES])))["scores"]
    assert rows["smoke"]["published"]["scores"] == pytest.approx(reproduce._metrics(crashed))
    assert not os.path.exists(os.path.join(out, "trials", "smoke", "published", "ckpt"))  # evaluated, not trained
    for tid, folder in folders.items():
        scores = json.load(open(reproduce.eval_json(folder)))["scores"]
        row, seed = rows[tid.split("/")[0]], int(tid.rsplit("seed", 1)[1])
        for head in ("cluster", "cluster_crf", "linear", "linear_crf"):
            for metric in ("accuracy", "miou"):
                stats = row["heads"][head][metric]
                assert stats["values"][stats["seeds"].index(seed)] == pytest.approx(100 * scores[head][metric])
    assert "| smoke | 2/2 |" in open(os.path.join(out, "reproduce.md")).read()


if __name__ == "__main__":  # the first driver of the integration test: attached to the test's Ray, killed by it
    import ray

    from launch import reproduce as launch_reproduce

    address, argv, trace, crash, pause = sys.argv[1], json.loads(sys.argv[2]), *sys.argv[3:6]
    # this checkout's code in the trials (as ray_local's own driver; a cluster job gets it from --working-dir)
    ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    launch_reproduce.main(argv, hooks=_hooks(trace, crash, pause), shared=False)
