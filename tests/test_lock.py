"""The lock (cluster/constraints.txt) is what CI installs and tests, and what every cluster node installs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest

from cluster import lock

REPO = lock.REPO
LOCKED = lock.read()


def _text(rel: str) -> str:
    with open(os.path.join(REPO, rel)) as fh:
        return fh.read()


def _requirement_names(spec_list) -> set[str]:
    return {lock._norm(re.match(r"[A-Za-z0-9_.\-]+", spec)[0]) for spec in spec_list}


def test_this_environment_runs_the_locked_versions():
    """CI installs with the lock, so every locked package this environment has is at the locked version
    (a lock regenerated from another venv, or an install without ``-c``, fails here)."""
    here = lock.installed()
    assert LOCKED["packages"], "the lock lists no packages"
    differ = {name: (version, here[name]) for name, version in LOCKED["packages"].items()
              if name in here and here[name] != version}
    assert not differ, f"installed versions differ from cluster/constraints.txt: {differ}"
    for core in ("torch", "deepspeed", "ray", "timm", "webdataset", "s3fs", "triton"):
        assert here.get(core) == LOCKED["packages"].get(core), core


def test_every_dependency_of_the_project_is_locked():
    project = tomllib.loads(_text("pyproject.toml"))["project"]
    wanted = _requirement_names(project["dependencies"])
    for extra, specs in project.get("optional-dependencies", {}).items():
        wanted |= _requirement_names(s for s in specs if not s.startswith("depthg"))
    missing = sorted(wanted - set(LOCKED["packages"]))
    assert not missing, f"pyproject.toml dependencies missing from the lock: {missing}"
    assert "depthg" not in LOCKED["packages"] and "pip" not in LOCKED["packages"]


def test_every_install_uses_the_lock():
    """.ci/run, the README's first command, every ray_cluster.yaml node and the node image install with it."""
    ci = _text(".ci/run")
    assert re.search(r'pip" install -q --build-constraint cluster/build-constraints\.txt -c cluster/constraints\.txt '
                     r'-e "\.\[all\]"', ci)
    assert "cluster/constraints.txt" in re.search(r"hash=\$\((.*)\)", ci)[1], "CI's venv cache ignores the lock"
    first = next(line for line in _text("README.md").splitlines() if "pip install" in line)
    assert "-c cluster/constraints.txt" in first, first
    yaml_text = _text("ray_cluster.yaml")
    installs = [line for line in yaml_text.splitlines() if re.match(r"\s*- .*pip install", line)]
    assert installs and all("-c cluster/constraints.txt" in line for line in installs), installs
    assert "-c cluster/constraints.txt" in _text("cluster/Dockerfile")


def test_cluster_image_driver_and_python_follow_the_lock():
    """The image's Ray is the locked Ray (the CLI and the cluster must match), its Python the lock's, and the
    driver check names the oldest driver of the locked torch's CUDA."""
    yaml_text = _text("ray_cluster.yaml")
    image = re.search(r"image:\s*rayproject/ray:(\S+)-py(\d)(\d+)-gpu", yaml_text)
    assert image, "ray_cluster.yaml has no rayproject/ray:<version>-py<XY>-gpu image"
    assert image[1] == LOCKED["packages"]["ray"]
    assert f"{image[2]}.{image[3]}" == ".".join(LOCKED["python"].split(".")[:2])
    assert f"FROM rayproject/ray:{image[1]}-py{image[2]}{image[3]}-gpu" in _text("cluster/Dockerfile")
    assert LOCKED["driver"] == lock.DRIVER_FOR_CUDA[LOCKED["cuda"]]
    check = next(line for line in yaml_text.splitlines() if "nvidia-smi --query-gpu=driver_version" in line)
    assert set(re.findall(r"\d+\.\d+\.\d+", check)) == {LOCKED["driver"]}, check


def test_lock_cuda_is_the_installed_torch_build():
    torch = pytest.importorskip("torch")
    assert LOCKED["cuda"] == torch.version.cuda


def test_check_reports_a_stale_lock(tmp_path):
    """``--check`` passes on this environment's own lock and names the package that differs in a stale one."""
    fresh = tmp_path / "constraints.txt"
    run = lambda *a: subprocess.run([sys.executable, "-m", "cluster.lock", "--out", str(fresh), *a],
                                    cwd=REPO, capture_output=True, text=True)
    assert run().returncode == 0
    ok = run("--check")
    assert ok.returncode == 0, ok.stderr
    fresh.write_text(re.sub(r"^torch==\S+$", "torch==0.0.1", fresh.read_text(), flags=re.M))
    stale = run("--check")
    assert stale.returncode == 1
    assert stale.stderr.startswith("error:") and "torch lock 0.0.1" in stale.stderr


# ----------------------------------------------------------------------------- the builds (issue 28.4)
BUILD = os.path.join(REPO, "cluster", "build-constraints.txt")


def test_builds_from_source_are_pinned_everywhere_the_project_installs():
    """pip applies -c to the install, not to the isolated environments that build deepspeed and pydensecrf2: every
    install passes the build constraints (pip, setuptools, wheel as this environment has them; Cython as
    pydensecrf2 pins it), after installing that pip (older ones know no --build-constraint); CI's cache key hashes
    them. Before, each node built with that day's setuptools."""
    pins = lock.read(BUILD)["packages"]
    here = lock.build_tools()
    assert {k: pins[k] for k in lock.BUILD_TOOLS} == here and pins["cython"] == lock.BUILD_ONLY["cython"]
    ci = _text(".ci/run")
    assert "cluster/build-constraints.txt" in re.search(r"hash=\$\((.*)\)", ci)[1], "CI's venv cache ignores the build pins"
    assert 'pip" install -q -c cluster/build-constraints.txt pip setuptools wheel' in ci
    for name in ("ray_cluster.yaml", "cluster/Dockerfile"):
        text = _text(name)
        installs = [l for l in text.splitlines() if '-e ".[all]"' in l and not l.lstrip().startswith("#")]
        assert installs and all("--build-constraint cluster/build-constraints.txt" in l for l in installs), name
        assert "-c cluster/build-constraints.txt pip" in text, name  # a pip that knows --build-constraint first


def test_a_nodes_build_is_checked_against_ci(tmp_path):
    """The lock records what built each source-built package here (its wheel's Generator); ``--node-check`` on a
    node names every locked version and build that differs (this environment: none)."""
    assert set(LOCKED["built"]) == set(lock.SOURCE_BUILT)
    assert LOCKED["built"] == lock.generators()  # CI's venv built them with the pinned setuptools
    assert lock.node_problems() == []
    stale = tmp_path / "constraints.txt"
    text = _text("cluster/constraints.txt")
    text = re.sub(r"^# built from source: pydensecrf2 by .*$", "# built from source: pydensecrf2 by setuptools (1.0)",
                  text, flags=re.M)
    stale.write_text(re.sub(r"^timm==\S+$", "timm==0.0.1", text, flags=re.M))
    problems = lock.node_problems(str(stale))
    assert any(p.startswith("timm ") and "(lock 0.0.1)" in p for p in problems), problems
    assert any(p.startswith("pydensecrf2 built by setuptools") and "(CI: setuptools (1.0))" in p for p in problems)
    report = tmp_path / "node-check.txt"
    run = subprocess.run([sys.executable, "-m", "cluster.lock", "--node-check", "--out", str(stale), "--report",
                          str(report)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.startswith("error: the node's packages differ") and "timm" in report.read_text()
