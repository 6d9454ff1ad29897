"""Benchmarks: print a table and write JSON. Never timed assertions in tests.

    python launch/benchmark.py fps [--out bench/fps.json]
    python launch/benchmark.py depthgen | train | eval | quality | quality-diag | coverage | mining-io | datapath | segment | scale | reproduce

Each name maps to ``bench/<name>.py`` (``-`` read as ``_``) exposing ``add_arguments(parser)`` and
``run(args) -> dict`` (the dict is written as JSON to ``--out``, default ``bench/<name>.json``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os

from bench import machine
from launch import run

NAMES = ("fps", "depthgen", "train", "eval", "quality", "quality-diag", "coverage", "mining-io", "datapath", "segment",
         "scale", "reproduce")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True)
    modules = {}
    for name in NAMES:
        modules[name] = importlib.import_module(f"bench.{name.replace('-', '_')}")
        doc = (modules[name].__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--out", default=f"bench/{name.replace('-', '_')}.json", help="where to write the JSON result")
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    result = modules[args.name].run(args)
    result = {"benchmark": args.name, "machine": machine(), **result}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    run(main)
