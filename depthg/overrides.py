"""Config text before it is checked: dotted ``key=value`` overrides from the command line, sparse mappings merged.

``split_cli(argv)`` separates ``key=value`` overrides from ``--flags``; ``parse_overrides(items)`` turns them into
a nested mapping with YAML's scalar rules (``8`` -> 8, ``true`` -> True, ``1e-3`` -> 0.001, ``s3://b/p`` -> str);
``merge(base, diff)`` lays one sparse mapping over another. ``depthg.config.load_config`` builds and checks the
``Config`` from the result (re-exported there, so ``from depthg.config import split_cli`` keeps working).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import yaml

from depthg.errors import ConfigError


def parse_scalar(text: str) -> Any:
    """One override value by YAML's scalar rules, plus ``1e-3`` (YAML 1.1 reads it as a string) as a float."""
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", text):
        return float(text)
    return yaml.safe_load(text) if text != "" else ""


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "loss.depth.mode=distance"]`` -> nested dict."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override")
        node[parts[-1]] = parse_scalar(text.strip())
    return nested


def merge(base: Mapping, diff: Mapping) -> dict:
    """``diff`` laid over ``base``: nested mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in diff.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def split_cli(argv: Iterable[str], value_flags: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Split ``key=value`` overrides from the other (``--flag``) arguments. Never an override: a token that is the
    value of one of ``value_flags`` (``--checkpoint ROW=URL``), or whose key holds a colon (a sweep's row
    override ``NAME:key=value``; no config key has one)."""
    argv, value_flags = list(argv), set(value_flags)
    overrides, rest = [], []
    for i, arg in enumerate(argv):
        key = arg.split("=", 1)[0]
        is_value = i > 0 and argv[i - 1] in value_flags
        (overrides if ("=" in arg and not arg.startswith("-") and ":" not in key and not is_value) else rest).append(arg)
    return overrides, rest
