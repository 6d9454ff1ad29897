"""The paper's tables in one command: every config x seed a Ray Tune trial (training, then evaluation), one table.

    python launch/reproduce.py --configs coco_vits8 coco_vits8_lhp cityscapes_vitb8 potsdam_vits8 --seeds 3 \\
        shards.root=s3://bucket/depthg --output s3://bucket/reproduce [--gpus-per-trial 1]
    python launch/reproduce.py --ablation --configs coco_vits8 --seeds 3 shards.root=... --output ...  # Table 4
    python launch/reproduce.py --configs coco_vits8 --checkpoint coco_vits8=s3://bucket/cocostuff_vits.ckpt ...
    python launch/reproduce.py --output s3://bucket/reproduce --resume      # after a killed driver
    python launch/reproduce.py --configs demo --seeds 3                     # here: local Ray, CPU trials

Each trial trains its config at one seed (``train.seed``) with the product's trainer on one rank (the 1-GPU paper
recipe; a CPU trial here trains 1 rank on 1 CPU where the demo's ``launch/train.py`` uses 2 workers) and evaluates
the result as ``launch/evaluate.py --workers 0 --crf-tasks`` does: on the trial's GPU, with the dense CRF as 1-CPU
Ray tasks on the other CPUs the trial reserved (11 of a g5.12xlarge trial's 12; a 1-CPU trial runs it in its
process). Trials run concurrently as far as the cluster's GPUs (or CPUs) allow; their requests are what Ray's
autoscaler sees. Configs: names in configs/ or YAML paths; ``NAME:key=value,key=value`` is a row with its own
settings. ``--ablation`` turns each config into the paper's Table 4 rows (STEGO and + depth loss with random sampling
at a fixed sample count, + FPS, + both, + 3D-LHP with the recipe of the config's ``_lhp`` sibling).
``--checkpoint ROW=URL`` evaluates a published checkpoint (docs/IMPORT.md) on that row's shards, as a trial without
training (ROW: a row id, which may hold "=", or a config name). ``key=value`` overrides apply to every trial;
``shards.root=PREFIX`` is a prefix: a config's shards are ``PREFIX/{basename of its own shards.root}``.

Writes ``{output}/reproduce.md`` and ``reproduce.json`` (mean +- std over seeds beside the paper's numbers and the
differences, the published checkpoint's figure and its difference, paired intervals for ablation rows, links to
every trial's run and report), rewritten as trials finish or fail. A failed trial is retried by Tune
(``--max-failures``), resuming from its checkpoints (the log says ``attempt N failed, retrying (retry N of M ...)``
or ``failed for good``); a new sweep into a used ``--output`` is refused: ``--resume`` continues it, running only
the trials without a complete report (``eval.json``, written last). Unless this command started the local Ray itself
(on a cluster: ``RAY_ADDRESS``, ``--address`` or a local ``ray start``) the output, shards, checkpoints and weights
files must be on s3://.
Everything that needs no trial is checked before the first one starts (``error: ...``; the flags' ranges before Ray
starts). Local paths (``--output``, YAML ``--configs``, ``shards.root=``, ``--checkpoint``) are stored absolute, so
``--resume`` works from any working directory. Layout and details:
``cluster/reproduce.py``, docs/REPRODUCE.md.
"""
from __future__ import annotations

import argparse
import sys

from launch import run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, metavar="NAME",
                   help="config names (configs/NAME.yaml) or YAML paths; NAME:key=value,... for a row with settings")
    p.add_argument("--seeds", default="3", help="a count (3 = seeds 0,1,2) or a comma list of seeds (default 3)")
    p.add_argument("--ablation", action="store_true", help="the paper's Table 4 rows of each config (default coco_vits8)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="ROW=URL",
                   help="evaluate a published checkpoint (segmenter.pt or reference .ckpt) beside row ROW (a row id, "
                        "which may hold '=', e.g. smoke+sampling.mode=random, or a config name); repeatable")
    p.add_argument("--output", default="runs/reproduce", help="the sweep's folder, local or s3:// (default runs/reproduce)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep in --output: finished trials are kept, the others resume (alone: with "
                        "the arguments it was started with); a sweep folder moved or copied to --output resumes there")
    p.add_argument("--gpus-per-trial", type=int, default=None,
                   help="1: GPU trials (the paper's 1-GPU recipe); 0: CPU trials (nothing else is accepted); default: "
                        "1 when the cluster has or can add GPU nodes")
    p.add_argument("--cpus-per-trial", type=float, default=0,
                   help="CPUs each trial reserves, >= 0 (0 = default: a GPU node type's CPUs per GPU; 1 for CPU "
                        "trials); its evaluation runs the dense CRF on all but one of them")
    p.add_argument("--max-failures", type=int, default=None,
                   help="Tune retries per trial, >= 0 or -1 = unlimited (default: the configs' train.max_failures)")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="at most this many trials at once, >= 0 (0 = as resources allow)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, a local ray start, "
                   "else a private local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the lines per trial event stay)")
    return p


def request_from(args, overrides):
    """The ``cluster.reproduce.Request`` of the command line; None for ``--resume`` without rows (the stored one)."""
    from cluster import reproduce

    if args.resume and not (args.configs or args.ablation or args.checkpoint):
        if overrides:
            from depthg.config import ConfigError

            raise ConfigError(f"--resume with overrides ({' '.join(overrides)}) but no --configs: --resume alone "
                              "reuses the stored arguments; give the same --configs and overrides to change nothing")
        return None
    configs = args.configs or (["coco_vits8"] if args.ablation else [])
    checkpoints = reproduce.parse_checkpoints(args.checkpoint, reproduce.row_ids(configs, args.ablation))
    request = reproduce.Request(configs=list(configs), seeds=reproduce.parse_seeds(args.seeds),
                                overrides=list(overrides), ablation=args.ablation, checkpoints=checkpoints,
                                gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial,
                                max_failures=args.max_failures, max_concurrent=args.max_concurrent)
    reproduce.check_request(request)  # the flags' ranges, before Ray starts
    return request


def main(argv=None, hooks=None, shared=None) -> dict:
    """``hooks``: a ``cluster.trainer.Hooks`` or ``{trial id: Hooks}`` for the trials' training (tests);
    ``shared``: override the shared-storage rule ``not started_here()`` (a test driver attached to the test's local
    Ray)."""
    from cluster import reproduce
    from depthg.config import split_cli
    from launch import evaluate

    overrides, rest = split_cli(sys.argv[1:] if argv is None else argv, value_flags=("--checkpoint",))
    args = build_parser().parse_args(rest)
    return reproduce.run(request_from(args, overrides), args.output, evaluate.main, resume=args.resume,
                         address=args.address, hooks=hooks, shared=shared, quiet=args.quiet)


if __name__ == "__main__":
    run(main)
