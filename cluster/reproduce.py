"""The paper's tables on a Ray cluster: every (config, seed) one Ray Tune trial, trained and evaluated by the product.

    python launch/reproduce.py --configs coco_vits8 coco_vits8_lhp cityscapes_vitb8 potsdam_vits8 --seeds 3 \\
        shards.root=s3://bucket/depthg --output s3://bucket/reproduce        # one trial per (config, seed)
    python launch/reproduce.py --ablation --configs coco_vits8 --seeds 3 ...  # Table 4: STEGO, + FPS, ...

A *row* is a config (``configs/NAME.yaml`` or a YAML path, optionally ``NAME:key=value,key=value`` for a row with
its own settings; with ``--ablation`` each config gives the five rows of ``VARIANTS``); a *trial* is a row at one
seed (``train.seed``), or a published checkpoint evaluated without training (``--checkpoint NAME=URL``).

Local paths of the request (``--output``, YAML ``--configs``, ``shards.root=``, ``model.weights=``, ``--checkpoint``)
are made absolute at plan time (``absolute_request``; an s3:// URL loses a trailing "/"), so ``sweep.json`` resumes
from any working directory. The flags' ranges are checked before Ray starts (``check_request``).

Trials are Ray Tune trials of one function, ``run_trial`` (Tune's scheduling, its ``FailureConfig(max_failures)``
retries, its trial placement groups, which are the resource demand Ray's autoscaler sees). Resources per trial:
``{GPU: 1, CPU: k}`` with ``k`` the CPUs per GPU of the smallest GPU node type (``cluster.ray_train.plan_train``, as a
1-GPU Ray Train launch reserves), or ``{CPU: n}`` for CPU trials (``--gpus-per-trial 0``, or a cluster without GPUs),
as one STRICT_PACK placement group of two bundles (``trial_bundles``): ``{GPU: 1, CPU: 1}`` for the trial's process
and ``{CPU: k - 1}`` for the dense CRF of its evaluation. A trial is the product's own code, in its own process:
``cluster.trainer.train(cfg, World())`` (one rank, the 1-GPU paper recipe, ``k`` threads and ``k - 1`` loader
workers; no second Ray, no nested Ray Train), then the evaluation of ``launch/evaluate.py --workers 0 --crf-tasks``
(passed in as ``evaluate``: ``cluster`` never imports ``launch``): codes and probes in the trial's process on its
GPU, the CRF as 1-CPU Ray tasks that the trial's placement group captures, so they run on its ``k - 1`` other CPUs
(a trial of 1 CPU runs the CRF in its process).

Layout under ``--output`` (local folder or s3://):

* ``sweep.json``: the request and every trial's resolved config (a ``--resume`` must match them);
* ``trials/{row}/seed{S}/``: the trial's ``train.output`` (``ckpt/``, ``segmenter.pt``, ``metrics.jsonl``, ...), its
  report ``report/`` (``eval.json``, written last by ``depthg.report.write_report``, = the trial is done; with an
  ``eval.json`` but another report file missing, a report of older code killed half-way, it is evaluated again),
  ``attempts/`` (one record per attempt) and ``trial.json`` (timings, resources, the CRF's CPUs);
  ``trials/{row}/published/report/`` for a ``--checkpoint`` row;
* ``tune/{launch}/``: Ray Tune's own experiment folder, one per driver launch;
* ``reproduce.json`` / ``reproduce.md``: per row, cluster and linear accuracy / mIoU with and without CRF, mean +-
  sample std over seeds (each value with its seed: ``heads.*.*.values`` / ``.seeds``), the paper's cluster and linear
  numbers (``PAPER``, docs/METHOD.md section 10) and the differences (``vs_paper``), the published checkpoint's figure
  and its difference to the paper (``published_vs_paper``), the paired difference to the STEGO row with its 95%
  interval for ablation rows (``depthg.metrics.paired_difference``), and each trial's links (markdown links in
  ``reproduce.md``; local paths relative to ``--output``, configs relative to the repository: ``shown``). Rewritten
  as trials finish or fail for good (a partial table, failed trials marked failed at once).

Faults. Every attempt trains with ``train.resume=auto`` in its own folder, so a retried trial resumes from its last
complete checkpoint; a trial whose report is complete is done and never runs again, a trial whose
``segmenter.pt`` exists is only evaluated. The driver's log says which: ``attempt N failed, retrying (retry N of M,
... left after it ...)`` or ``failed for good`` (``failure_line``; Tune's own lines call both "errored"). A killed
driver is resumed with ``--resume``: only the trials without a complete report run, in a new Tune experiment (the
records above, not Tune's snapshot, decide what is done, so a trial that finished after the last snapshot is not
repeated). A new sweep into a used ``--output`` is refused naming ``--resume``. Shared storage: unless this process
started the local Ray it is connected to (``shared = not cluster.raycluster.started_here()``, the rule of
``launch/train.py``), the output, every shards root, every ``--checkpoint`` and every local ``model.weights`` file
must be on s3:// (``check_trials``; ``cluster.preflight.check(..., shared=True)`` for each trial's output).

Shards: ``shards.root=PREFIX`` is a prefix; each config's shards are ``PREFIX/{basename of its own shards.root}``
(``coco_vits8`` and ``coco_vits8_lhp`` share ``PREFIX/coco``, ``coco_vitb8`` has ``PREFIX/coco_vitb8``: the
positives are mined with its own backbone). Without it each config's own ``shards.root``. Missing shards are refused
before any trial starts, naming the folder and the ``launch/generate_depth.py`` command that writes them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import uuid
from typing import Callable

import numpy as np

from depthg import io, report, shards
from cluster.raycluster import node_id
from depthg.config import Config, ConfigError, LHPConfig, TrainConfig, from_dict, load_config, to_dict
from depthg.errors import DepthgError
from depthg.metrics import paired_difference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
SCHEMA = "depthg-reproduce/1"
HEADS = (("cluster", "cluster"), ("cluster_crf", "cluster + CRF"), ("linear", "linear"), ("linear_crf", "linear + CRF"))
METRICS = ("accuracy", "miou")
EVAL_JSON = "eval.json"
REFUSED_OVERRIDES = {"train.output": "--output", "train.seed": "--seeds", "train.resume": "--resume"}

# ----------------------------------------------------------------------------- the paper's numbers
# Unsupervised cluster probe (with CRF, as the reference's eval_segmentation.py reports it) and, where published, the
# linear probe (also with CRF), in %: docs/METHOD.md section 10 (Tables 1-4 and 6 of the paper). None: not published.
PAPER: dict[str, dict[str, dict[str, tuple]]] = {
    "coco_vits8": {"stego": {"cluster_crf": (48.3, 24.5)}, "fps": {"cluster_crf": (49.1, 24.6)},
                   "depth": {"cluster_crf": (51.2, 24.7)},
                   "depthg": {"cluster_crf": (56.3, 25.6), "linear_crf": (73.7, 38.9)},
                   "lhp": {"cluster_crf": (55.1, 26.7)}},
    "coco_vitb8": {"stego": {"cluster_crf": (56.9, 28.2)},
                   "depthg": {"cluster_crf": (58.6, 29.0), "linear_crf": (75.5, 41.6)}},
    "cityscapes_vitb8": {"stego": {"cluster_crf": (73.2, 21.0)}, "depthg": {"cluster_crf": (81.6, 23.1)}},
    "potsdam_vits8": {"stego": {"cluster_crf": (77.0, None)}, "depthg": {"cluster_crf": (80.4, None)},
                      "lhp": {"cluster_crf": (80.4, None)}},
}
# config name -> (paper setting, the variant that config is); the *_paper configs have no published number
CONFIG_SETTING = {"coco_vits8": ("coco_vits8", "depthg"), "coco_vits8_lhp": ("coco_vits8", "lhp"),
                  "coco_vitb8": ("coco_vitb8", "depthg"), "cityscapes_vitb8": ("cityscapes_vitb8", "depthg"),
                  "potsdam_vits8": ("potsdam_vits8", "depthg")}


# ----------------------------------------------------------------------------- Table 4: the ablation variants
def variant_overrides(cfg: Config, lhp: LHPConfig | None = None) -> dict[str, list[str]]:
    """The paper's Table 4 rows as settings of ``cfg`` (the config's own depth term and FPS mode; ``sampling.mode=fps``
    when the config samples at random, ``loss.depth.mode`` paper / reference when it has none).

    Random-sampling rows (STEGO, + depth loss) sample a fixed S: ``sampling.decay_every=0`` (and ``first_decay=0``,
    which validation requires then). The reference's sample-count decay is its ``fps_sample_decay`` option, part of
    its FPS recipe (COCO ViT-S/8: S 11 -> 9 -> 8 -> 7); STEGO samples 11 throughout. The FPS rows keep the config's.

    The + 3D-LHP row trains the recipe of the paper's LHP number: ``lhp``, the ``loss.lhp`` section of the config's
    ``_lhp`` sibling where one exists (``lhp_sibling``: ``coco_vits8`` -> ``configs/coco_vits8_lhp.yaml``, whose
    55.1 / 26.7 is the paper's, ``mode: reference``), else the config's own section when it enables LHP itself, else
    the config's section with ``mode=reference`` when its depth term is the reference's (the reference recipe's LHP),
    or as it is (the paper's reading)."""
    fps = cfg.sampling.mode if cfg.sampling.mode != "random" else "fps"
    depth = cfg.loss.depth.mode
    if depth == "none":
        depth = "paper" if cfg.data.depth_cast == "none" else "reference"
    if lhp is None:
        lhp = cfg.loss.lhp
        if not lhp.enabled and depth == "reference":
            lhp = dataclasses.replace(lhp, mode="reference")
    off = ["loss.lhp.enabled=false"]
    fixed = ["sampling.mode=random", "sampling.decay_every=0", "sampling.first_decay=0"]
    on = [f"loss.lhp.{k}={_value(v)}" for k, v in dataclasses.asdict(lhp).items() if k != "enabled"]
    return {"stego": ["loss.depth.mode=none", *fixed, *off],
            "fps": ["loss.depth.mode=none", f"sampling.mode={fps}", *off],
            "depth": [f"loss.depth.mode={depth}", *fixed, *off],
            "depthg": [f"loss.depth.mode={depth}", f"sampling.mode={fps}", *off],
            "lhp": [f"loss.depth.mode={depth}", f"sampling.mode={fps}", "loss.lhp.enabled=true", *on]}


def _value(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def lhp_sibling(path: str) -> str:
    """The YAML of a config's 3D-LHP recipe beside it, or "" (``X.yaml`` -> ``X_lhp.yaml``; ``X_paper.yaml`` ->
    ``X_lhp_paper.yaml``, the naming of configs/)."""
    folder, stem = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
    name = f"{stem[:-len('_paper')]}_lhp_paper" if stem.endswith("_paper") else f"{stem}_lhp"
    sibling = os.path.join(folder, name + ".yaml")
    return sibling if os.path.isfile(sibling) and os.path.abspath(sibling) != os.path.abspath(path) else ""


VARIANTS = {"stego": "STEGO", "fps": "+ FPS", "depth": "+ depth loss", "depthg": "+ both (DepthG)", "lhp": "+ 3D-LHP"}
BASELINE = "stego"  # ablation rows are paired with this row of their config


class SweepError(DepthgError, RuntimeError):
    """Some trials failed for good; the table holds the others."""


# ----------------------------------------------------------------------------- the plan (pure)
@dataclasses.dataclass
class Request:
    """What the command line asks for (stored in ``sweep.json``; ``--resume`` alone reuses it)."""

    configs: list = dataclasses.field(default_factory=list)
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    overrides: list = dataclasses.field(default_factory=list)
    ablation: bool = False
    checkpoints: dict = dataclasses.field(default_factory=dict)  # row name -> published checkpoint URL
    gpus_per_trial: int | None = None  # None: 1 when the cluster has or can add GPUs, else 0
    cpus_per_trial: float = 0  # 0: the CPUs per GPU of the GPU node type (GPU trials) / 1 (CPU trials)
    max_failures: int | None = None  # None: the configs' train.max_failures
    max_concurrent: int = 0  # 0: as many as the cluster holds


@dataclasses.dataclass
class Row:
    id: str
    label: str
    config: str  # YAML path
    name: str  # config name (file stem)
    overrides: list
    variant: str = ""  # an ablation variant key
    baseline: str = ""  # the id of the row this one is paired with (ablation)
    paper: dict = dataclasses.field(default_factory=dict)  # head -> {"accuracy", "miou"} (%)


@dataclasses.dataclass
class Trial:
    id: str  # "{row}/seed{S}" | "{row}/published"
    row: str
    seed: int | None
    folder: str
    shards: str
    cfg: dict  # the resolved training config (train.output = folder, train.resume = auto)
    train: bool = True
    checkpoint: str = ""  # published checkpoint URL (train=False)
    eval_overrides: list = dataclasses.field(default_factory=list)

    @property
    def report(self) -> str:
        return io.join(self.folder, "report")


@dataclasses.dataclass
class Plan:
    output: str
    request: Request
    rows: list
    trials: list

    def row_trials(self, row_id: str) -> list:
        return [t for t in self.trials if t.row == row_id]


def absolute(url: str) -> str:
    """A local path made absolute (``os.path.abspath``: no trailing separator), a remote URL without its trailing
    ``/`` (``s3://b/x/`` and ``s3://b/x`` are one sweep: the trials' folders are built with ``io.join``)."""
    if not url:
        return url
    if io.is_remote(url):
        scheme, _, rest = str(url).partition("://")
        return f"{scheme}://{rest.rstrip('/')}" if rest.rstrip("/") else url
    return os.path.abspath(url)


def parse_seeds(text) -> list[int]:
    """``3`` -> seeds 0, 1, 2; ``0,5,7`` -> those seeds."""
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected a count (3 = seeds 0,1,2) or a comma list of seeds") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds {text!r}: expected at least one seed, each >= 0 and listed once")
    return seeds


def parse_checkpoints(items, rows=()) -> dict[str, str]:
    """``--checkpoint ROW=URL`` items -> {row: URL}. A row id may hold "=" (``smoke+sampling.mode=random``): the
    longest of ``rows`` (``row_ids``) that the item starts with, followed by "=", is its row; else the text before the
    first "=" (a config name)."""
    out = {}
    for item in items or ():
        item = str(item)
        name = max((r for r in rows if item.startswith(r + "=")), key=len, default=None)
        if name is not None:
            url = item[len(name) + 1:]
        else:
            name, sep, url = item.partition("=")
            if not sep:
                name = ""
        if not name or not url:
            raise ConfigError(f"--checkpoint {item!r}: expected ROW=URL, e.g. coco_vits8=s3://bucket/cocostuff_vits.ckpt")
        out[name] = url
    return out


def row_ids(configs, ablation: bool) -> list[str]:
    """The ids of the rows ``plan_sweep`` makes of ``--configs`` (pure: no file is read)."""
    out = []
    for spec in configs or ():
        name, row_overrides = split_row(spec)
        path = name.endswith((".yaml", ".yml")) or os.sep in name
        stem = os.path.splitext(os.path.basename(name))[0] if path else name
        out += [_row_id(stem, row_overrides + ([v] if v else [])) for v in (VARIANTS if ablation else [""])]
    return out


def check_request(request: Request) -> None:
    """The ranges of the numeric flags (before Ray starts; ``trial_resources`` checks them again)."""
    if request.gpus_per_trial not in (None, 0, 1):
        raise ConfigError(f"--gpus-per-trial {request.gpus_per_trial}: a trial is the paper's 1-GPU recipe (global "
                          "batch train.micro_batch_per_gpu on one rank); expected 0 (CPU trials) or 1. Train a "
                          "multi-GPU run with python launch/train.py --nodes N --gpus-per-node G")
    if request.cpus_per_trial < 0:
        raise ConfigError(f"--cpus-per-trial {request.cpus_per_trial:g}: expected >= 0 (0 = automatic)")
    if request.max_failures is not None and request.max_failures < -1:
        raise ConfigError(f"--max-failures {request.max_failures}: expected retries >= 0, or -1 (unlimited)")
    if request.max_concurrent < 0:
        raise ConfigError(f"--max-concurrent {request.max_concurrent}: expected >= 0 (0 = as many as resources allow)")


def _absolute_spec(spec: str) -> str:
    """A ``--configs`` item naming a YAML path, made absolute (its ``:key=value`` part kept); a config name as is."""
    name, sep, rest = spec.partition(":")
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return os.path.abspath(name) + sep + rest
    return spec


def absolute_request(request: Request) -> Request:
    """``request`` with its local paths absolute (``--configs`` YAML paths, a local ``shards.root=`` prefix, an
    existing local ``model.weights=`` file, local ``--checkpoint`` files), so that ``sweep.json`` resumes from any
    working directory (``--resume`` alone replans from the stored request)."""
    def override(item: str) -> str:
        key, sep, value = item.partition("=")
        value = value.strip()
        if sep and key.strip() == "shards.root" and value:
            return f"{key}={absolute(value)}"
        if sep and key.strip() == "model.weights" and value and not io.is_remote(value) and os.path.exists(value):
            return f"{key}={os.path.abspath(value)}"
        return item

    return dataclasses.replace(request, configs=[_absolute_spec(str(c)) for c in request.configs or ()],
                               overrides=[override(str(o)) for o in request.overrides or ()],
                               checkpoints={k: absolute(v) for k, v in (request.checkpoints or {}).items()})


def config_file(name: str) -> tuple[str, str]:
    """``(YAML path, name)`` of ``configs/NAME.yaml`` or of a YAML path."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        if not os.path.isfile(name):
            raise ConfigError(f"--configs: config file not found: {name}")
        return os.path.abspath(name), os.path.splitext(os.path.basename(name))[0]
    path = os.path.join(CONFIGS, f"{name}.yaml")
    if not os.path.isfile(path):
        known = sorted(os.path.splitext(f)[0] for f in os.listdir(CONFIGS) if f.endswith(".yaml"))
        raise ConfigError(f"--configs: no config named {name!r} ({path} not found); expected one of {', '.join(known)} "
                          "or a YAML path")
    return path, name


def split_row(spec: str) -> tuple[str, list[str]]:
    """``NAME[:key=value,key=value]`` -> (NAME, overrides)."""
    name, sep, rest = spec.partition(":")
    if not sep:
        return spec, []
    items = [s.strip() for s in rest.split(",") if s.strip()]
    if not items or any("=" not in s for s in items):
        raise ConfigError(f"--configs {spec!r}: expected NAME or NAME:key=value[,key=value...]")
    return name, items


def _row_id(name: str, parts: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "+".join([name, *parts]))


def _paper(name: str, variant: str) -> dict:
    setting, own = CONFIG_SETTING.get(name, (None, None))
    if setting is None:
        return {}
    numbers = PAPER[setting].get(variant or own, {})
    return {head: {"accuracy": acc, "miou": miou} for head, (acc, miou) in numbers.items()}


def _check_overrides(overrides: list[str]) -> tuple[list[str], str]:
    """(overrides without shards.root, the shards prefix)."""
    kept, prefix = [], ""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in REFUSED_OVERRIDES:
            raise ConfigError(f"override {item!r}: the sweep sets {key} for every trial; use {REFUSED_OVERRIDES[key]}")
        if key == "shards.root":
            prefix = item.split("=", 1)[1].strip()
        else:
            kept.append(item)
    return kept, prefix


def _replace(cfg: Config, section: str, **values) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


def plan_sweep(request: Request, output: str) -> Plan:
    """Rows and trials of ``request`` (reads the YAML files; every config is validated here)."""
    if not request.configs and not request.checkpoints:
        raise ConfigError("--configs: expected at least one config (e.g. --configs coco_vits8), or --checkpoint ROW=URL")
    check_request(request)
    request = absolute_request(request)
    overrides, prefix = _check_overrides(list(request.overrides))
    output = absolute(output)
    rows, trials = [], []
    for spec in request.configs or ():
        name, row_overrides = split_row(spec)
        path, stem = config_file(name)
        base = load_config(path, overrides + row_overrides)
        variants = {"": []}
        if request.ablation:
            sibling = lhp_sibling(path)
            lhp = load_config(sibling, overrides + row_overrides).loss.lhp if sibling else None
            variants = variant_overrides(base, lhp)
        for variant, switches in variants.items():
            row = Row(id=_row_id(stem, row_overrides + ([variant] if variant else [])),
                      label=f"{stem}{':' + ','.join(row_overrides) if row_overrides else ''}"
                            + (f" {VARIANTS[variant]}" if variant else ""),
                      config=path, name=stem, overrides=row_overrides + switches, variant=variant,
                      paper=_paper(stem, variant))
            if variant and variant != BASELINE:
                row.baseline = _row_id(stem, row_overrides + [BASELINE])
            if any(r.id == row.id for r in rows):
                raise ConfigError(f"--configs: row {row.id} is listed twice")
            rows.append(row)
            cfg = load_config(path, overrides + row.overrides) if switches else base
            root = _shards_root(cfg, prefix)
            weights = cfg.model.weights
            if weights and not io.is_remote(weights) and os.path.exists(weights):
                cfg = _replace(cfg, "model", weights=os.path.abspath(weights))
            for seed in request.seeds:
                folder = io.join(output, "trials", row.id, f"seed{seed}")
                tcfg = _replace(_replace(cfg, "shards", root=root), "train", output=folder, seed=int(seed), resume="auto")
                trials.append(Trial(id=f"{row.id}/seed{seed}", row=row.id, seed=int(seed), folder=folder, shards=root,
                                    cfg=to_dict(tcfg)))
    eval_overrides = [o for o in overrides if o.split("=", 1)[0].strip().startswith("eval.")]
    for name, url in request.checkpoints.items():
        row = next((r for r in rows if r.id == name), None)
        if row is None:
            try:
                path, stem = config_file(name)
            except ConfigError:
                known = ", ".join(r.id for r in rows) or "none"
                raise ConfigError(f"--checkpoint {name}={url}: {name!r} is neither a row of this sweep ({known}) nor a "
                                  "config name (configs/NAME.yaml) or YAML path") from None
            row = Row(id=_row_id(stem, []), label=stem, config=path, name=stem, overrides=[], paper=_paper(stem, ""))
            rows.append(row)
        cfg = load_config(row.config, overrides + row.overrides)
        root = _shards_root(cfg, prefix)
        trials.append(Trial(id=f"{row.id}/published", row=row.id, seed=None, folder=io.join(output, "trials", row.id,
                            "published"), shards=root, cfg={}, train=False, checkpoint=absolute(url),
                            eval_overrides=eval_overrides))
    return Plan(output=output, request=request, rows=rows, trials=trials)


def _shards_root(cfg: Config, prefix: str) -> str:
    """``{prefix}/{basename of the config's own shards.root}``, or that root itself without a prefix."""
    own = cfg.shards.root
    return absolute(io.join(prefix, str(own).rstrip("/").rsplit("/", 1)[-1]) if prefix else own)


# ----------------------------------------------------------------------------- checks before any trial
def sweep_file(output: str) -> str:
    return io.join(output, "sweep.json")


def read_sweep(output: str) -> dict | None:
    url = sweep_file(output)
    if not io.exists(url):
        return None
    data = json.loads(io.read_bytes(url))
    if data.get("schema") != SCHEMA:
        raise ConfigError(f"{url}: schema {data.get('schema')!r}, expected {SCHEMA!r}; start a new sweep in a new --output")
    return data


def check_output(output: str, resume: bool) -> dict | None:
    """A new sweep needs an empty or missing ``output``; ``resume`` needs a sweep there. Returns the stored sweep."""
    fs, path = io.filesystem(output)
    if fs.isfile(path):
        raise ConfigError(f"--output {output}: an existing file; expected a folder (local or s3://) for the sweep")
    stored = read_sweep(output)
    if resume:
        if stored is None:
            raise ConfigError(f"--resume: no sweep to resume at {output} ({sweep_file(output)} not found); start one "
                              "without --resume")
        return stored
    held = io.listdir(output)
    if held:
        shown = ", ".join(sorted(held)[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise ConfigError(f"--output {output} already holds a sweep ({shown}); continue it with --resume (finished "
                          "trials are kept, the others resume from their checkpoints), or choose a new --output")
    return None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def relocated(stored: dict, output: str) -> dict:
    """A stored sweep whose folder moved (a local one moved, an s3:// one copied) as if planned in ``output``: every
    path inside its old folder (the trials' folders and ``train.output``, a ``--checkpoint`` inside it) rebased, so
    that it resumes there. The old folder is read from the trials' folders (``{output}/trials/{id}``)."""
    old = next((tr["folder"][:-len(f"/trials/{tid}")] for tid, tr in stored.get("trials", {}).items()
                if str(tr.get("folder", "")).endswith(f"/trials/{tid}")), output)

    def moved(value):
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, str) and (value == old or value.startswith(old + "/")):
            return output + value[len(old):]
        return value

    return stored if old == output else moved(stored)


def check_same(plan: Plan, stored: dict) -> None:
    """A resumed trial must have the config it started with (new trials may be added)."""
    old = stored.get("trials", {})
    for t in plan.trials:
        if t.id not in old:
            continue
        a, b = _flat(old[t.id].get("cfg", {})), _flat(json.loads(json.dumps(t.cfg)))  # as stored (lists, not tuples)
        diff = [f"{k}: stored {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diff or old[t.id].get("checkpoint", "") != t.checkpoint:
            shown = "; ".join(diff[:4]) or f"checkpoint: stored {old[t.id].get('checkpoint')!r}, now {t.checkpoint!r}"
            raise ConfigError(f"--resume: trial {t.id} of {sweep_file(plan.output)} was started with other settings "
                              f"({shown}); resume with the same arguments (--resume alone reuses them), or start a new "
                              "--output")


def _generate_command(row: Row, root: str, overrides: list[str]) -> str:
    keep = [o for o in overrides + row.overrides if o.split("=", 1)[0].startswith(("data.", "depthgen.", "mining."))]
    config = os.path.relpath(row.config, REPO) if row.config.startswith(REPO) else row.config
    return " ".join(["python launch/generate_depth.py --config", config, f"shards.root={root}", *keep])


def check_shards(plan: Plan) -> None:
    """Every trial's shards exist: the training manifest (trained rows) and a val split (all rows)."""
    from cluster.evaluator import find_split

    overrides, _ = _check_overrides(list(plan.request.overrides))
    rows = {r.id: r for r in plan.rows}
    seen = set()
    for t in plan.trials:
        if not t.train and not io.exists(t.checkpoint):
            raise ConfigError(f"--checkpoint {t.row}={t.checkpoint}: file not found")
        key = (t.shards, t.train)
        if key in seen:
            continue
        seen.add(key)
        fix = _generate_command(rows[t.row], t.shards, overrides)
        train_manifest = io.join(shards.split_dir(t.shards, "train", "train"), shards.MANIFEST)
        if t.train and not io.exists(train_manifest):
            raise ConfigError(f"row {t.row}: no training shards at {t.shards} ({train_manifest} not found); write them "
                              f"with: {fix}")
        try:
            find_split(t.shards, "val")
        except FileNotFoundError as exc:
            raise ConfigError(f"row {t.row}: no validation shards to evaluate on ({exc}); write them with: {fix}") from None


def check_trials(plan: Plan, shared: bool) -> None:
    """``cluster.preflight.check`` for every training trial (one rank); with ``shared`` (trials on nodes other than
    this machine) the output, every shards root, every ``--checkpoint`` and every local ``model.weights`` file must
    be shared storage."""
    from cluster import preflight

    if shared:
        weights = {t.cfg["model"]["weights"] for t in plan.trials if t.train}
        urls = [plan.output, *{t.shards for t in plan.trials}, *(t.checkpoint for t in plan.trials if t.checkpoint),
                *sorted(w for w in weights if w and not io.is_remote(w) and os.path.exists(w))]
        local = [u for u in urls if not io.is_remote(u)]
        if local:
            raise ConfigError(f"{local[0]}: a local folder, but the trials run on the cluster's nodes, which neither "
                              "see it nor keep what is written there; expected shared storage, e.g. --output "
                              "s3://bucket/reproduce shards.root=s3://bucket/depthg")
    for t in plan.trials:
        if t.train:
            preflight.check(from_dict(Config, t.cfg), 1, shared=shared)


def trial_resources(request: Request, alive: list[dict], node_types: list[dict] | None) -> dict:
    """``{"CPU": k, "GPU": 1}`` or ``{"CPU": n}`` of each trial (pure). ``alive``: ``ray.nodes()`` resources,
    ``node_types``: ``cluster.raycluster.autoscaler_node_types()``."""
    from cluster.ray_train import plan_train

    check_request(request)
    gpus = request.gpus_per_trial
    if gpus is None:
        have = [r for r in alive if r.get("GPU", 0) > 0] + [t for t in node_types or [] if t.get("GPU", 0) > 0]
        gpus = 1 if have else 0
    if gpus == 0:
        return {"CPU": float(request.cpus_per_trial or 1)}
    try:  # G = 0: the GPUs per node of the smallest GPU node type, so a worker reserves a G-th of its CPUs
        plan = plan_train(1, 0, "cuda", alive, node_types)
    except ValueError as exc:
        raise ConfigError(f"--gpus-per-trial 1: {exc}") from exc
    return {"CPU": float(request.cpus_per_trial or plan.cpus_per_worker), "GPU": 1.0}


def crf_cpus(resources: dict) -> int:
    """CPUs a trial's evaluation gives its dense CRF as 1-CPU Ray tasks: all but the one its own process holds (0 for
    a trial of fewer than 2 CPUs: the CRF runs in the trial's process)."""
    cpus = float(resources.get("CPU", 0))
    return int(cpus - 1) if cpus >= 2 else 0


def trial_bundles(resources: dict) -> list[dict]:
    """The placement group of a trial (pure; STRICT_PACK: one node): ``[{GPU: 1, CPU: 1}, {CPU: k - 1}]``, the first
    bundle the trial's process (Tune's head bundle), the second its CRF tasks (Tune's placement groups capture the
    tasks a trial submits); one bundle when there is no CPU for CRF tasks. The total is ``resources``."""
    if not crf_cpus(resources):
        return [dict(resources)]
    cpus = float(resources["CPU"])
    return [{**resources, "CPU": 1.0}, {"CPU": cpus - 1}]


# ----------------------------------------------------------------------------- one trial (a Tune trial's process)
def eval_json(trial_folder: str) -> str:
    return io.join(trial_folder, "report", EVAL_JSON)


def trial_done(t: Trial) -> bool:
    """A trial is done when its report is complete (``depthg.report.complete``: ``eval.json``, the report's last file,
    and the others; a report of older code killed between its files is evaluated again)."""
    return report.complete(t.report)


def _scores(trial_folder: str) -> dict | None:
    """The scores of a trial's complete report (``trial_done``), else None."""
    complete = report.complete(io.join(trial_folder, "report"))
    return json.loads(io.read_bytes(eval_json(trial_folder)))["scores"] if complete else None


def _metrics(scores: dict) -> dict:
    return {f"{h}/{m}": 100 * float(scores[h][m]) for h, _ in HEADS if h in scores for m in METRICS}


def run_trial(config: dict, evaluate: Callable | None = None, hooks=None) -> None:
    """The Tune trainable: train the trial's row at its seed (resuming its own checkpoints), then evaluate it.

    ``evaluate(argv)`` is ``launch.evaluate.main``; ``hooks`` a ``cluster.trainer.Hooks`` for every trial or a dict
    ``{trial id: Hooks}`` (tests)."""
    from ray import tune

    t = Trial(**config["trial"])
    resources = config["resources"]
    os.environ.update(config.get("env") or {})
    gpu = resources.get("GPU", 0) > 0
    if not gpu:  # a CPU trial on a GPU node stays off the GPUs other trials hold
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    done = _scores(t.folder)
    if done is not None:
        tune.report(_metrics(done))
        return
    record = {"attempt": uuid.uuid4().hex[:8], "pid": os.getpid(), "node": node_id(), "started": time.time()}
    io.write_bytes(io.join(t.folder, "attempts", f"{time.time():.3f}-{record['attempt']}.json"),
                   json.dumps(record).encode())
    timings = {}
    checkpoint = t.checkpoint
    if t.train:
        checkpoint = io.join(t.folder, "segmenter.pt")
        if not io.exists(checkpoint):  # segmenter.pt is written after the last batch: training is done
            timings["train_s"] = _train(t, resources, hooks)
    start = time.perf_counter()
    scores = evaluate_trial(t, checkpoint, resources, evaluate)["scores"]
    timings["eval_s"] = time.perf_counter() - start
    io.write_bytes(io.join(t.folder, "trial.json"), json.dumps(
        {"id": t.id, "seed": t.seed, "resources": resources, "crf_cpus": crf_cpus(resources), **record,
         "seconds": timings}, indent=1).encode())
    tune.report(_metrics(scores))


def evaluate_trial(t: Trial, checkpoint: str, resources: dict, evaluate: Callable) -> dict:
    """A trial's evaluation: ``launch/evaluate.py --workers 0`` in the trial's process (its GPU), the dense CRF as
    1-CPU Ray tasks on the trial's other CPUs (``crf_cpus``; captured by its placement group) when it has any, else
    in this process; returns ``evaluate``'s result (``scores``, ``paths``, ``meta``). ``bench/reproduce.py`` times
    this function."""
    import torch

    crf = crf_cpus(resources)
    # the trial's process holds one CPU while its CRF tasks hold the others; without them, all of the trial's
    torch.set_num_threads(1 if crf else max(1, int(resources.get("CPU", 1))))
    # --key=value: a path holding "=" (a row id such as smoke+sampling.mode=random) is no override
    return evaluate([f"--checkpoint={checkpoint}", f"--output={t.report}", "--workers=0", *(["--crf-tasks"] if crf else []),
              f"--shards={t.shards}", *t.eval_overrides, *([] if resources.get("GPU", 0) > 0 else ["eval.device=cpu"])])


def _train(t: Trial, resources: dict, hooks) -> float:
    from cluster.distributed import loader_workers
    from cluster.trainer import train
    from cluster.world import detect

    cfg = from_dict(Config, t.cfg)
    world = detect()
    if cfg.train.loader_workers < 0:  # auto: the trial's CPUs, not the node's (several trials share a node)
        cfg = _replace(cfg, "train", loader_workers=loader_workers(-1, world, cpus=int(resources.get("CPU", 1))))
    hook = hooks.get(t.id) if isinstance(hooks, dict) else hooks
    import torch

    # the trial's CPUs (Ray set the threads to its process's bundle, 1 CPU; the rest waits for the CRF tasks)
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    start = time.perf_counter()
    train(cfg, world, hooks=hook)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- the table
def _stats(values: list[float], seeds: list[int]) -> dict:
    """Mean, sample std, n, and each value with its seed (``values[i]`` is seed ``seeds[i]``'s)."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()) if len(v) else None, "std": float(v.std(ddof=1)) if len(v) > 1 else None,
            "n": len(v), "values": [float(x) for x in v], "seeds": [int(s) for s in seeds]}


def _attempts(folder: str) -> int:
    return len([n for n in io.listdir(io.join(folder, "attempts")) if n.endswith(".json")])


def shown(url: str, output: str) -> str:
    """How the table records a path (pure): s3:// URLs as they are; a local path under ``output`` relative to it (the
    table lies there, so its links work wherever the folder is moved or copied); another local path relative to the
    repository when inside it (``configs/demo.yaml``), else absolute."""
    if not url or io.is_remote(url) or not os.path.isabs(url):
        return url
    for base in (output, REPO):
        if not io.is_remote(base) and (url == base or url.startswith(base.rstrip(os.sep) + os.sep)):
            return os.path.relpath(url, base)
    return url


def trial_record(t: Trial, errors: dict, output: str = "") -> dict:
    """A trial's row of the table; paths as ``shown`` relative to ``output`` (the sweep's folder)."""
    scores = _scores(t.folder)
    info_url = io.join(t.folder, "trial.json")
    info = json.loads(io.read_bytes(info_url)) if scores is not None and io.exists(info_url) else {}
    status = "done" if scores is not None else ("failed" if t.id in errors else "pending")
    link = lambda url: shown(url, output or REPO)  # noqa: E731
    out = {"id": t.id, "seed": t.seed, "status": status, "attempts": _attempts(t.folder), "folder": link(t.folder),
           "report": link(io.join(t.report, "eval.md")), "eval_json": link(eval_json(t.folder)),
           "checkpoint": link(t.checkpoint or io.join(t.folder, "segmenter.pt")), "seconds": info.get("seconds", {}),
           "resources": info.get("resources"), "crf_cpus": info.get("crf_cpus")}
    if t.train:
        out["metrics"] = link(io.join(t.folder, "metrics.jsonl"))
    if scores is not None:
        out["scores"] = _metrics(scores)
    if t.id in errors:
        out["error"] = errors[t.id]
    return out


def build_table(plan: Plan, errors: dict | None = None, seconds: float | None = None) -> dict:
    """The sweep's table from each trial's ``eval.json`` (the one source of the numbers; a partial table while
    trials run or after some failed)."""
    errors = errors or {}
    records = {t.id: trial_record(t, errors, plan.output) for t in plan.trials}
    rows = []
    for row in plan.rows:
        seeded = [records[t.id] for t in plan.row_trials(row.id) if t.train]
        done = [r for r in seeded if r["status"] == "done"]
        heads = {}
        for head, _ in HEADS:
            if all(f"{head}/accuracy" in r["scores"] for r in done) and done:
                heads[head] = {m: _stats([r["scores"][f"{head}/{m}"] for r in done], [r["seed"] for r in done])
                               for m in METRICS}
        vs_paper, published_vs_paper = {}, {}
        published = next((records[t.id] for t in plan.row_trials(row.id) if not t.train), None)
        pub_scores = (published or {}).get("scores") or {}
        for head, numbers in row.paper.items():
            vs_paper[head] = {m: (None if numbers.get(m) is None or head not in heads else
                                  heads[head][m]["mean"] - numbers[m]) for m in METRICS}
            if published is not None:
                published_vs_paper[head] = {m: (None if numbers.get(m) is None or f"{head}/{m}" not in pub_scores
                                                else pub_scores[f"{head}/{m}"] - numbers[m]) for m in METRICS}
        entry = {"id": row.id, "label": row.label, "config": shown(row.config, REPO), "overrides": row.overrides,
                 "variant": row.variant, "seeds": len(seeded), "done": len(done), "heads": heads,
                 "paper": row.paper, "vs_paper": vs_paper, "published": published,
                 "published_vs_paper": published_vs_paper,
                 "trials": [records[t.id] for t in plan.row_trials(row.id)]}
        if row.baseline:
            entry["paired"] = _paired(row, plan, records)
        rows.append(entry)
    status = {s: sum(r["status"] == s for r in records.values()) for s in ("done", "failed", "pending")}
    return {"schema": SCHEMA, "output": shown(plan.output, REPO), "request": dataclasses.asdict(plan.request),
            "trials": len(plan.trials), "status": status, "seconds": seconds,
            "std": "sample standard deviation over seeds (ddof=1)", "rows": rows,
            "paper_source": "docs/METHOD.md section 10 (cluster probe with CRF; linear probe with CRF where published)"}


def _paired(row: Row, plan: Plan, records: dict) -> dict:
    """``row - baseline`` per head and metric, paired by seed over the seeds both finished."""
    def by_seed(row_id):
        return {records[t.id]["seed"]: records[t.id]["scores"] for t in plan.row_trials(row_id)
                if t.train and records[t.id]["status"] == "done"}

    mine, base = by_seed(row.id), by_seed(row.baseline)
    seeds = sorted(set(mine) & set(base))
    out = {"baseline": row.baseline, "seeds": seeds}
    for head, _ in HEADS:
        key = f"{head}/miou"
        if seeds and all(key in mine[s] and key in base[s] for s in seeds):
            out[head] = {m: paired_difference([mine[s][f"{head}/{m}"] for s in seeds],
                                              [base[s][f"{head}/{m}"] for s in seeds]) for m in METRICS}
    return out


def _pm(stats: dict | None) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    return f"{stats['mean']:.1f}" + (f" +- {stats['std']:.1f}" if stats.get("std") is not None else "")


def _pair(head: dict | None) -> str:
    if not head:
        return "-"
    return f"{_pm(head.get('accuracy'))} / {_pm(head.get('miou'))}"


def _num(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _diff(v) -> str:
    return "-" if v is None else f"{v:+.1f}"


def _diffs(d: dict | None) -> str:
    return f"{_diff((d or {}).get('accuracy'))} / {_diff((d or {}).get('miou'))}"


def _link(text: str, url: str) -> str:
    """A markdown link (pure); the target in <...> where a space or parenthesis would end it."""
    return f"[{text}](<{url}>)" if any(c in url for c in " ()<>") else f"[{text}]({url})"


def _paper_cell(numbers: dict | None) -> str:
    if not numbers:
        return "-"
    return f"{_num(numbers.get('accuracy'))} / {_num(numbers.get('miou'))}"


def _interval(p: dict | None) -> str:
    if not p:
        return "-"
    ci = p.get("ci95")
    return f"{p['mean']:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else " (1 seed: no interval)")


def markdown(table: dict) -> str:
    """``reproduce.md``: the rows beside the paper, the ablation's paired differences, every trial's links."""
    status = table["status"]
    lines = ["# Reproduction sweep", "",
             f"{status['done']} of {table['trials']} trials done, {status['failed']} failed, {status['pending']} "
             f"pending" + (f"; {table['seconds']:.0f} s" if table.get("seconds") else "") + f". Output: {table['output']}",
             "", "Accuracy / mIoU in %, mean +- sample std over the seeds done; paper: " + table["paper_source"] + ".", "",
             "| row | seeds | cluster | cluster + CRF | paper | diff (CRF - paper) | linear | linear + CRF | paper linear "
             "| diff (linear CRF - paper) | published checkpoint (cluster + CRF) | published - paper (CRF) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        h, paper, vs = r["heads"], r["paper"], r["vs_paper"]
        diff, ldiff = vs.get("cluster_crf", {}), vs.get("linear_crf", {})
        pub = r["published"]
        pub_cell = pub_diff = "-"
        if pub:
            s = pub.get("scores") or {}
            pub_cell = (f"{s['cluster_crf/accuracy']:.1f} / {s['cluster_crf/miou']:.1f}" if "cluster_crf/accuracy" in s
                        else f"{s['cluster/accuracy']:.1f} / {s['cluster/miou']:.1f} (no CRF)" if s else pub["status"])
            pd = (r.get("published_vs_paper") or {}).get("cluster_crf")
            if pd and (pd.get("accuracy") is not None or pd.get("miou") is not None):
                pub_diff = f"{_diff(pd.get('accuracy'))} / {_diff(pd.get('miou'))}"
        lines.append(f"| {r['label']} | {r['done']}/{r['seeds']} | {_pair(h.get('cluster'))} | "
                     f"{_pair(h.get('cluster_crf'))} | {_paper_cell(paper.get('cluster_crf'))} | "
                     f"{_diffs(diff)} | {_pair(h.get('linear'))} | "
                     f"{_pair(h.get('linear_crf'))} | {_paper_cell(paper.get('linear_crf'))} | "
                     f"{_diffs(ldiff) if paper.get('linear_crf') else '-'} | {pub_cell} | {pub_diff} |")
    paired = [r for r in table["rows"] if r.get("paired")]
    if paired:
        lines += ["", "## Ablation: each row minus its STEGO row, paired by seed (95% t interval)", "",
                  "| row | seeds | cluster + CRF mIoU | cluster + CRF accuracy | cluster mIoU | linear + CRF mIoU | "
                  "paper (CRF mIoU - STEGO) |", "|---|---|---|---|---|---|---|"]
        rows = {r["id"]: r for r in table["rows"]}
        for r in paired:
            p = r["paired"]
            base = rows.get(p["baseline"], {}).get("paper", {}).get("cluster_crf", {})
            mine = r["paper"].get("cluster_crf", {})
            paper = (mine["miou"] - base["miou"]) if mine.get("miou") is not None and base.get("miou") is not None else None
            cell = lambda head, m: _interval((p.get(head) or {}).get(m))  # noqa: E731
            lines.append(f"| {r['label']} | {len(p['seeds'])} | {cell('cluster_crf', 'miou')} | "
                         f"{cell('cluster_crf', 'accuracy')} | {cell('cluster', 'miou')} | {cell('linear_crf', 'miou')} "
                         f"| {_diff(paper)} |")
    lines += ["", "## Trials", "", "| trial | status | attempts | train s | eval s | cluster + CRF | report | run |",
              "|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        for t in r["trials"]:
            s, sec = t.get("scores") or {}, t.get("seconds") or {}
            score = (f"{s['cluster_crf/accuracy']:.1f} / {s['cluster_crf/miou']:.1f}" if "cluster_crf/accuracy" in s
                     else "-")
            status = t["status"] + (f": {t['error']}" if t.get("error") else "")
            fmt = lambda k: f"{sec[k]:.0f}" if k in sec else "-"  # noqa: E731
            lines.append(f"| {t['id']} | {status} | {t['attempts']} | {fmt('train_s')} | {fmt('eval_s')} | {score} | "
                         f"{_link('eval.md', t['report'])} | {_link('run', t['folder'])} |")
    return "\n".join(lines) + "\n"


def write_table(plan: Plan, errors: dict | None = None, seconds: float | None = None) -> dict:
    table = build_table(plan, errors, seconds)
    io.write_bytes(io.join(plan.output, "reproduce.json"), json.dumps(table, indent=1).encode())
    io.write_bytes(io.join(plan.output, "reproduce.md"), markdown(table).encode())
    return table


# ----------------------------------------------------------------------------- the sweep on Ray Tune
def failure_line(trial_id: str, failures: int, max_failures: int, error: str, retrying: bool) -> str:
    """The sweep's line for a failed attempt (pure): ``retrying`` (Tune's ``on_trial_recover``: it starts the trial
    again) or failed for good (``on_trial_error``). Tune's own log calls both "errored". ``failures``: Tune's count
    in this launch, ``max_failures``: its limit (-1: none)."""
    if retrying:
        left = ("no retry limit" if max_failures < 0 else
                f"retry {failures} of {max_failures}, {max_failures - failures} left after it")
        return (f"trial {trial_id}: attempt {failures} failed, retrying ({left}; it resumes from the last checkpoint): "
                f"{error}")
    return (f"trial {trial_id}: attempt {failures} failed; failed for good ({failures} attempts, --max-failures "
            f"{max_failures}): {error}")


def _progress(plan: Plan, done: int, quiet: bool, errors: dict | None = None):
    """A Tune callback on the driver: a line per trial event (also with ``quiet``, flushed: the driver's log may end
    in a SIGKILL), a tqdm bar of finished trials (not with ``quiet``), the partial table rewritten after each trial
    that finishes or fails for good, with the errors known so far (``errors``, {trial id: first line}, filled here
    as trials fail for good: a failed trial reads "failed" at once, not "pending" until the sweep ends). Defined
    here so that importing this module needs no Ray."""
    import sys

    from ray import tune
    from tqdm import tqdm

    errors = {} if errors is None else errors

    class _Progress(tune.Callback):
        def __init__(self):
            self.bar = None

        def __getstate__(self):  # Tune pickles its run config; the bar stays on the driver
            return {}

        def _bar(self):
            if self.bar is None:
                self.bar = tqdm(total=len(plan.trials), initial=done, desc="trials", unit="trial", disable=quiet)
            return self.bar

        def _say(self, text):
            self._bar().write(text)
            sys.stdout.flush()

        def _failed(self, trial, retrying):
            error = _first_line(trial.error_file)
            self._say(failure_line(trial.config["trial"]["id"], trial.num_failures, trial.max_failures, error,
                                   retrying))
            if not retrying:
                errors[trial.config["trial"]["id"]] = error
                self._table()

        def _table(self):
            try:
                write_table(plan, errors)
            except Exception as exc:  # noqa: BLE001 - the partial table is a courtesy; the sweep goes on
                self._say(f"(partial table not written: {exc})")

        def on_trial_start(self, iteration, trials, trial, **info):
            self._say(f"started {trial.config['trial']['id']}")

        def on_trial_recover(self, iteration, trials, trial, **info):
            self._failed(trial, True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._failed(trial, False)

        def on_trial_complete(self, iteration, trials, trial, **info):
            bar = self._bar()
            bar.update(1)
            result = trial.last_result or {}
            score = ("cluster + CRF {:.1f} / {:.1f}".format(result["cluster_crf/accuracy"], result["cluster_crf/miou"])
                     if "cluster_crf/accuracy" in result else "done")
            self._say(f"finished {trial.config['trial']['id']}: {score}")
            self._table()

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.bar.close()

    return _Progress()


def _first_line(path_or_error) -> str:
    text = str(path_or_error or "")
    if text and os.path.isfile(text):
        with open(text) as fh:
            text = fh.read()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # the last line of a traceback names the exception
    return (lines[-1] if lines else "unknown error")[:300]


def sweep_record(plan: Plan, stored: dict | None) -> dict:
    """What ``sweep.json`` holds (pure): the request and every trial's config (kept from earlier launches)."""
    trials = dict((stored or {}).get("trials", {}))
    for t in plan.trials:
        trials[t.id] = {"cfg": t.cfg, "checkpoint": t.checkpoint, "folder": t.folder}
    return {"schema": SCHEMA, "request": dataclasses.asdict(plan.request), "trials": trials,
            "launches": list((stored or {}).get("launches", [])) + [time.strftime("%Y-%m-%dT%H:%M:%S")]}


def store(plan: Plan, stored: dict | None) -> None:
    """``sweep.json``: ``sweep_record``."""
    io.write_bytes(sweep_file(plan.output), json.dumps(sweep_record(plan, stored), indent=1).encode())


def sweep(plan: Plan, resources: dict, evaluate: Callable, stored: dict | None = None, hooks=None,
          quiet: bool = False) -> dict:
    """Run the trials without a complete report as Ray Tune trials (this process must be connected to Ray), then
    write the table. Raises ``SweepError`` (after writing it) when some trials failed for good."""
    from ray import tune

    from cluster.ray_train import storage
    from cluster.raycluster import storage_env

    start = time.perf_counter()
    store(plan, stored)
    todo = [t for t in plan.trials if not trial_done(t)]
    crf = crf_cpus(resources)
    print(f"sweep: {len(plan.rows)} row(s), {len(plan.trials)} trial(s), {len(plan.trials) - len(todo)} already done; "
          f"each trial {resources}, its CRF " + (f"on {crf} of them (1-CPU Ray tasks)" if crf else "in its process"),
          flush=True)
    errors = {}
    if todo:
        failures = plan.request.max_failures
        if failures is None:
            failures = max([from_dict(Config, t.cfg).train.max_failures for t in todo if t.train]
                           or [TrainConfig().max_failures])
        path, filesystem = storage(io.join(plan.output, "tune"))
        bundles = tune.PlacementGroupFactory(trial_bundles(resources), strategy="STRICT_PACK")
        trainable = tune.with_resources(tune.with_parameters(run_trial, evaluate=evaluate, hooks=hooks), bundles)
        by_id = {t.id: dataclasses.asdict(t) for t in todo}
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(list(by_id.values())), "resources": resources, "env": storage_env()},
            tune_config=tune.TuneConfig(max_concurrent_trials=plan.request.max_concurrent or None, reuse_actors=False,
                                        trial_name_creator=lambda trial: trial.config["trial"]["id"],
                                        trial_dirname_creator=lambda trial: _dirname(trial.config["trial"]["id"])),
            run_config=tune.RunConfig(name=f"launch-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
                                      storage_path=path, storage_filesystem=filesystem, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=failures),
                                      callbacks=[_progress(plan, len(plan.trials) - len(todo), quiet, errors)]))
        grid = tuner.fit()
        for result in grid:
            if result.error is not None:
                errors[result.config["trial"]["id"]] = _first_line(result.error)
    table = write_table(plan, errors, time.perf_counter() - start)
    print(f"wrote {io.join(plan.output, 'reproduce.md')} and reproduce.json", flush=True)
    if table["status"]["failed"] or table["status"]["pending"]:
        bad = [t["id"] for r in table["rows"] for t in r["trials"] if t["status"] != "done"]
        raise SweepError(f"{len(bad)} of {table['trials']} trial(s) did not finish ({', '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''}): see their errors in {io.join(plan.output, 'reproduce.md')}"
                         "; the table holds the others. Rerun with --resume to retry only those")
    return table


def _dirname(trial_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", trial_id.replace("/", "__"))


def run(request: Request | None, output: str, evaluate: Callable, resume: bool = False, address: str | None = None,
        hooks=None, shared: bool | None = None, quiet: bool = False) -> dict:
    """The whole command: checks (before Ray where they can), connect, plan resources, sweep, table.

    ``request`` None (``--resume`` alone): the stored one. ``shared``: whether the trials' outputs, shards roots,
    checkpoints and weights files must be shared storage; None = ``not cluster.raycluster.started_here()`` after
    connecting, the rule of ``launch/train.py`` (local folders only on a local Ray this process started; a test
    driver attached to the test's local Ray passes False)."""
    output = absolute(output)
    if request is not None:
        check_request(request)
    stored = check_output(output, resume)
    if stored is not None:
        stored = relocated(stored, output)
    if request is None:
        if stored is None:
            raise ConfigError("--configs: expected at least one config (e.g. --configs coco_vits8)")
        request = Request(**stored["request"])
    plan = plan_sweep(request, output)
    if stored is not None:
        check_same(plan, stored)
    check_shards(plan)
    from cluster.raycluster import autoscaler_node_types, connect, started_here

    connect(address)
    shared = (not started_here()) if shared is None else shared
    check_trials(plan, shared)
    import ray

    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    resources = trial_resources(request, alive, autoscaler_node_types())
    return sweep(plan, resources, evaluate, stored, hooks, quiet)
