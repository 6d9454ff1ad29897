"""ray_cluster.yaml, checked offline: Ray's own autoscaler config validation plus the facts the schema
cannot know (instance sizes, what the image and setup commands install, where S3 credentials come
from, the IAM and bucket files in cluster/iam/ the recipe creates).

PRIVATE API: ``ray.autoscaler._private.util.prepare_config`` and ``validate_config`` are what
``ray up`` runs first, but they are internal and change between Ray releases, so the tests that call
them are pinned: skipped unless Ray is installed and its version starts with "2.60" (move the pin
after checking both functions still exist and behave). For ``provider.type: aws`` they are offline:
``prepare_config`` merges ``ray/autoscaler/aws/defaults.yaml`` and fills per-type min/max workers,
``validate_config`` checks the JSON schema and the cross-field rules (head type exists, sum of
``min_workers`` <= ``max_workers``). Every boto3/EC2 call (AMI, subnets, IAM, instance-type
resources) lives in ``_private/aws/config.bootstrap_aws``, which ``ray up`` calls afterwards and this
test never does. The checks of our own (``_own_checks``) need only PyYAML and always run.
"""
from __future__ import annotations

import copy
import os
import re

import pytest
import yaml

from cluster import lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAML_PATH = os.path.join(REPO, "ray_cluster.yaml")
README_PATH = os.path.join(REPO, "cluster", "README.md")
IAM_DIR = os.path.join(REPO, "cluster", "iam")

# Published EC2 sizes (vCPU, NVIDIA GPUs) of the instance types this file may use: a node type that
# advertises other numbers would make Ray over- or under-schedule actors on it.
INSTANCE_SPECS = {
    "m5.2xlarge": (8, 0),
    "g5.12xlarge": (48, 4),
    "p4d.24xlarge": (96, 8),
}
# launch/train.py --nodes 4 --gpus-per-node 4 in cluster/README.md needs this many GPUs at once
# (test_readme_commands_fit_the_cluster keeps the two in step).
README_TRAIN_GPUS = 16
CREDENTIAL = re.compile(r"AKIA[0-9A-Z]{16}|(?i:aws_(secret_access_key|access_key_id|session_token)\s*[:=])")
DLAMI = re.compile(r"^(resolve:ssm:/aws/service/deeplearning/ami/x86_64/\S+|ami-[0-9a-f]{8,17})$")


def _text() -> str:
    with open(YAML_PATH) as fh:
        return fh.read()


def _load() -> dict:
    return yaml.safe_load(_text())


def _p4d_block() -> dict:
    """The commented-out p4d node type, uncommented and parsed (it must stay valid YAML)."""
    lines = _text().splitlines()
    start = next(i for i, l in enumerate(lines) if "BEGIN p4d.24xlarge alternative" in l)
    end = next(i for i, l in enumerate(lines) if "END p4d.24xlarge alternative" in l)
    body = [l for l in lines[start + 1:end] if re.match(r"^  #   |^  # \S+:$", l)]
    assert body, "no commented node type between the p4d BEGIN/END markers"
    return yaml.safe_load("\n".join(l.replace("  # ", "", 1) for l in body))


@pytest.fixture(scope="module")
def ray_util():
    ray = pytest.importorskip("ray")
    if not ray.__version__.startswith("2.60"):
        pytest.skip(f"private autoscaler API pinned to Ray 2.60, found {ray.__version__}")
    from ray.autoscaler._private import util

    return util


def _ray_validate(util, cfg: dict) -> dict:
    prepared = util.prepare_config(copy.deepcopy(cfg))
    util.validate_config(prepared)
    return prepared


def _own_checks(cfg: dict) -> None:
    """Raise AssertionError naming the field when the cluster cannot run this project's recipe."""
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert cfg["provider"]["type"] == "aws", "provider.type"
    for name, spec in types.items():
        node = spec["node_config"]
        assert node["InstanceType"] in INSTANCE_SPECS, f"{name}.node_config.InstanceType unknown to the test"
        cpus, gpus = INSTANCE_SPECS[node["InstanceType"]]
        if name == head:  # the head does no work: no task or actor may be placed on it
            assert spec["resources"] == {"CPU": 0, "GPU": 0}, f"{name}.resources must be CPU 0, GPU 0"
        else:
            assert spec["resources"] == {"CPU": cpus, "GPU": gpus}, f"{name}.resources != {node['InstanceType']}"
            assert 0 <= spec["min_workers"] <= spec["max_workers"] <= cfg["max_workers"], f"{name} bounds"
        assert DLAMI.match(node["ImageId"]), f"{name}.node_config.ImageId is not a Deep Learning AMI"
        assert "IamInstanceProfile" in node, f"{name}: every node needs an instance profile for s3://"
        for dev in node["BlockDeviceMappings"]:
            ebs = dev["Ebs"]
            assert ebs["VolumeType"] == "gp3" and ebs.get("Throughput", 0) > 125, f"{name}: gp3 throughput not set"
            assert ebs["Throughput"] <= 0.25 * ebs.get("Iops", 3000), f"{name}: gp3 allows 0.25 MiB/s per IOPS"
    gpu_types = [t for t in types.values() if t["resources"]["GPU"] > 0]
    assert gpu_types, "no GPU worker node type"
    reachable = max(min(t["max_workers"], cfg["max_workers"]) * t["resources"]["GPU"] for t in gpu_types)
    assert reachable >= README_TRAIN_GPUS, "max_workers too small for the README training command"


def test_cluster_yaml_passes_ray_validation(ray_util):
    cfg = _load()
    prepared = _ray_validate(ray_util, cfg)
    # our explicit lists replace Ray's defaults (which would pip-install a Ray nightly wheel)
    assert prepared["setup_commands"] == cfg["setup_commands"]
    assert prepared["head_setup_commands"] == cfg["setup_commands"] + cfg["head_setup_commands"]
    assert prepared["available_node_types"][cfg["head_node_type"]]["max_workers"] == 0
    _own_checks(prepared)


def test_p4d_alternative_is_valid_when_uncommented(ray_util):
    cfg = _load()
    block = _p4d_block()
    assert list(block) == ["gpu_a100_x8"]
    assert block["gpu_a100_x8"]["resources"] == {"CPU": 96, "GPU": 8}
    cfg["available_node_types"].update(block)
    _own_checks(_ray_validate(ray_util, cfg))


def test_own_checks_pass():
    _own_checks(_load())


def test_setup_installs_this_project_with_matching_ray():
    import ray

    cfg = _load()
    assert cfg["file_mounts"] == {"~/depthg": "."}, "repository root synced to ~/depthg"
    assert os.path.exists(os.path.join(REPO, "pyproject.toml"))
    assert ".venv" in cfg["rsync_exclude"], "the local venv (GBs) must not be synced"
    install = [c for c in cfg["setup_commands"] if "pip install" in c and "-e" in c]
    assert len(install) == 1 and "cd ~/depthg" in install[0] and '".[all]"' in install[0]
    # Ray (like every package) is pinned by the lock the install is constrained with
    assert "-c cluster/constraints.txt" in install[0], "cluster nodes must install the versions CI tested"
    pin = lock.read()["packages"].get("ray")
    assert pin, "Ray must be pinned on the cluster (cluster/constraints.txt)"
    assert pin == ray.__version__, "cluster Ray pin differs from the local Ray (the `ray` CLI)"
    assert any("boto3" in c for c in cfg["head_setup_commands"]), "the autoscaler on the head needs boto3"
    # the image brings Python, Ray (same version) and the CUDA runtime; so does the baked alternative
    image = cfg["docker"]["image"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-(gpu|cu\d+)", image), image
    with open(os.path.join(REPO, "cluster", "Dockerfile")) as fh:
        assert f"FROM {image}" in fh.read()


def test_nodes_mount_datasets_from_s3_and_a_fast_cache_disk():
    cfg = _load()
    init = "\n".join(cfg["initialization_commands"])
    assert "mount-s3 --read-only" in init and "BUCKET /mnt/datasets" in init, "datasets are read from S3, not copied"
    assert "aws s3 sync" not in _text() and "aws s3 cp" not in _text(), "no copy of the datasets per node"
    assert "Instance Storage" in init and "/mnt/local" in init, "the NVMe instance store is the cache disk"
    assert "580.65.06" in init, "the driver check for torch's CUDA 13.0 build"
    run = " ".join(cfg["docker"]["run_options"])
    assert "/mnt/local:/mnt/local" in run and "/mnt/datasets:/mnt/datasets" in run
    assert "DEPTHG_CACHE_DIR=/mnt/local" in run, "mining's per-node cache goes to the fast disk"
    assert cfg["provider"]["cache_stopped_nodes"] is False, "restarted nodes would skip the mounts"


def test_iam_files_are_least_privilege_and_created_by_the_script():
    import json

    with open(os.path.join(IAM_DIR, "s3-policy.json")) as fh:
        s3_policy = json.load(fh)
    for statement in s3_policy["Statement"]:
        assert all(a.startswith("s3:") and "*" not in a for a in statement["Action"]), statement
        assert statement["Resource"] in ("arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/*"), statement
    with open(os.path.join(IAM_DIR, "head-policy.json")) as fh:
        head = json.load(fh)
    passrole = [s for s in head["Statement"] if "iam:PassRole" in s["Action"]]
    assert passrole and all("depthg-worker" in r for s in passrole for r in s["Resource"])
    assert not any(a.startswith("s3:") for s in head["Statement"] for a in s["Action"]), "S3 comes from s3-policy.json"
    with open(os.path.join(IAM_DIR, "bucket-lifecycle.json")) as fh:
        rule = json.load(fh)["Rules"][0]
    assert rule["Status"] == "Enabled" and rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] >= 1
    with open(os.path.join(IAM_DIR, "create.sh")) as fh:
        script = fh.read()
    for name in ("ec2-trust.json", "s3-policy.json", "head-policy.json", "bucket-lifecycle.json"):
        assert name in script, f"create.sh does not use {name}"
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in _load()["available_node_types"].values()}
    assert profiles == {"depthg-head", "depthg-worker"}
    assert all(f"role {p} " in script for p in profiles), "create.sh creates every profile the YAML names"
    assert os.access(os.path.join(IAM_DIR, "create.sh"), os.X_OK)


def test_start_commands():
    cfg = _load()
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--num-cpus=0" in head, "the head does no work"
    assert "--address=$RAY_HEAD_IP:6379" in worker
    assert cfg["head_start_ray_commands"][0] == cfg["worker_start_ray_commands"][0] == "ray stop"


def test_no_credentials_in_file():
    assert not CREDENTIAL.search(_text()), "credentials belong in the environment / instance role"
    assert CREDENTIAL.search("aws_secret_access_key: abc") and CREDENTIAL.search("AKIA" + "A" * 16)


def _set(cfg, path, value):
    node = cfg
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_DELETE = object()
BROKEN = [
    # (what breaks, path, value)
    ("GPU count of the wrong type", ("available_node_types", "gpu_a10g_x4", "resources", "GPU"), "four"),
    ("misspelt node-type key", ("available_node_types", "gpu_a10g_x4", "node_cfg"), {}),
    ("node type without resources", ("available_node_types", "gpu_a10g_x4", "resources"), _DELETE),
    ("head type that does not exist", ("head_node_type",), "head_gpu"),
    ("min_workers above max_workers", ("available_node_types", "gpu_a10g_x4", "min_workers"), 5),
    ("negative max_workers", ("max_workers",), -1),
    ("GPU count that does not match g5.12xlarge", ("available_node_types", "gpu_a10g_x4", "resources", "GPU"), 8),
    ("worker without S3 role", ("available_node_types", "gpu_a10g_x4", "node_config", "IamInstanceProfile"), _DELETE),
    ("head that takes work", ("available_node_types", "head_cpu", "resources", "CPU"), 8),
    ("gp3 throughput left at the baseline",
     ("available_node_types", "gpu_a10g_x4", "node_config", "BlockDeviceMappings", 0, "Ebs", "Throughput"), _DELETE),
    ("autoscaling bound too small for 16 GPUs", ("available_node_types", "gpu_a10g_x4", "max_workers"), 2),
]


@pytest.mark.parametrize("what,path,value", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_is_rejected(ray_util, what, path, value):
    cfg = _load()
    _ray_validate(ray_util, cfg)  # the unbroken file passes
    _set(cfg, path, value)
    jsonschema = pytest.importorskip("jsonschema")
    # schema errors, Ray's cross-field ValueErrors and our AssertionErrors; never a crash (KeyError...)
    with pytest.raises((jsonschema.ValidationError, ValueError, AssertionError)):
        _own_checks(_ray_validate(ray_util, cfg))


def _readme() -> str:
    with open(README_PATH) as fh:
        return fh.read()


def test_readme_commands_fit_the_cluster():
    """The largest `--nodes N --gpus-per-node G` in the recipe is what _own_checks provisions for."""
    sizes = [int(n) * int(g) for n, g in re.findall(r"--nodes (\d+)\s+(?:\\\n\s*)?--gpus-per-node (\d+)", _readme())]
    assert sizes, "no launch/train.py --nodes/--gpus-per-node command found in cluster/README.md"
    assert max(sizes) == README_TRAIN_GPUS


def test_readme_paths_exist_or_are_marked_pending():
    """Every repository file the recipe names exists, or the recipe says it is pending."""
    text = _readme()
    named = set(re.findall(r"\b((?:launch|cluster|configs|depthg|tests)/[\w/]+\.(?:py|yaml))\b", text))
    assert {"launch/train.py", "launch/evaluate.py", "configs/coco_vits8.yaml"} <= named
    missing = sorted(p for p in named if not os.path.exists(os.path.join(REPO, p)))
    unmarked = [p for p in missing if not re.search(r"pending[^\n]*`" + re.escape(p) + "`", text)]
    assert not unmarked, f"cluster/README.md names files that do not exist and are not marked pending: {unmarked}"


def _docker_pattern(rule: str) -> str:
    """An rsync exclude (or .gitignore) rule as a .dockerignore line: Docker's patterns are relative to the context
    root, so an anchored "/x" is "x" and an unanchored rule, which rsync matches at any depth, is "**/x"."""
    negate, rule = rule.startswith("!"), rule.lstrip("!").rstrip("/")
    return ("!" if negate else "") + (rule[1:] if rule.startswith("/") else "**/" + rule)


def test_the_image_leaves_out_what_the_nodes_copy_leaves_out():
    """Issue 28.6: cluster/Dockerfile's ``COPY .`` took the whole checkout (.git, .venv, shards, runs). .dockerignore
    is rsync_filter's .gitignore then rsync_exclude (Docker: the last match wins; rsync: the first)."""
    cfg = _load()
    assert cfg["rsync_filter"] == [".gitignore"]
    with open(os.path.join(REPO, ".gitignore")) as fh:
        gitignore = [l.strip() for l in fh if l.strip() and not l.startswith("#")]
    expected = [_docker_pattern(r) for r in gitignore] + [_docker_pattern(r) for r in cfg["rsync_exclude"]]
    with open(os.path.join(REPO, ".dockerignore")) as fh:
        lines = [l.strip() for l in fh if l.strip() and not l.startswith("#")]
    assert lines == expected
    with open(os.path.join(REPO, "cluster", "Dockerfile")) as fh:
        assert "COPY --chown=ray:users . /home/ray/depthg" in fh.read()  # the context root, filtered by .dockerignore


# ----------------------------------------------------------------------------- the node start-up check (issue 28.5)
def _node_check(tmp_path, driver: str | None) -> tuple[int, str]:
    """Run the YAML's driver check as `ray up` would, with a fake nvidia-smi reporting ``driver`` (None: no GPU)."""
    import subprocess

    cmd = next(c for c in _load()["initialization_commands"] if "nvidia-smi --query-gpu=driver_version" in c)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\n" + (f'case "$1" in -L) echo "GPU 0: NVIDIA A10G";; *) echo "{driver}";; esac\n'
                                     if driver else "exit 9\n"))
    fake.chmod(0o755)
    report = tmp_path / "node-check.txt"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DEPTHG_NODE_CHECK": str(report)}
    run = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)
    return run.returncode, report.read_text()


def test_a_node_with_an_old_driver_fails_once_with_a_message(tmp_path):
    """Before, the check exited 1: a failed update, which makes the autoscaler terminate the node and launch another
    from the same AMI for as long as work waits for GPUs. Now the command succeeds, the message goes to the node's
    check file, the node joins Ray labelled, and its workers (or the next launch) stop naming it."""
    import subprocess

    rc, report = _node_check(tmp_path, "535.104.05")
    assert rc == 0 and "NVIDIA driver 535.104.05 is older than 580.65.06" in report
    assert _node_check(tmp_path, "580.95.05") == (0, "")  # the AMI's driver passes
    assert _node_check(tmp_path, None) == (0, "")  # the head: no GPU, nothing to check
    cfg = _load()
    start = cfg["worker_start_ray_commands"][-1]
    for content, labelled in (("NVIDIA driver 535.104.05 is older ...", True), ("", False)):
        (tmp_path / "node-check.txt").write_text(content)
        shim = f"ray() {{ echo \"$@\"; }}; {start}"  # what `ray start` would be given
        out = subprocess.run(["bash", "-c", shim], env={**os.environ, "DEPTHG_NODE_CHECK": str(tmp_path / "node-check.txt"),
                                                       "RAY_HEAD_IP": "10.0.0.1"}, capture_output=True, text=True).stdout
        assert ("--labels=depthg/node-check=failed" in out) is labelled, out
    # the package check never fails the setup either, and the head (never relaunched) fails `ray up` once
    node = [c for c in cfg["setup_commands"] if "--node-check" in c]
    assert node and node[0].endswith("|| true") and '--report "${DEPTHG_NODE_CHECK:-/mnt/local/depthg-node-check.txt}"' in node[0]
    assert any("exit 1" in c and "DEPTHG_NODE_CHECK" in c for c in cfg["head_setup_commands"])
    assert not any("exit 1" in c for c in cfg["initialization_commands"] + cfg["setup_commands"]
                   + cfg["worker_start_ray_commands"])


def test_work_refuses_a_node_whose_check_failed(tmp_path, monkeypatch):
    from cluster import ray_train

    rows = [{"Alive": True, "NodeManagerAddress": "10.0.0.5", "Labels": {"depthg/node-check": "failed"}},
            {"Alive": True, "NodeManagerAddress": "10.0.0.6", "Labels": {}},
            {"Alive": False, "NodeManagerAddress": "10.0.0.7", "Labels": {"depthg/node-check": "failed"}}]
    assert ray_train.failed_nodes(rows) == ["10.0.0.5"]
    report = tmp_path / "node-check.txt"
    monkeypatch.setenv("DEPTHG_NODE_CHECK", str(report))
    ray_train.check_node()  # no file: a node without the check (a local Ray)
    report.write_text("NVIDIA driver 535.104.05 is older than 580.65.06 ...\n")
    with pytest.raises(RuntimeError, match=r"failed its start-up check .*535\.104\.05 is older"):
        ray_train.check_node()
