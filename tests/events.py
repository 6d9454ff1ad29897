"""Synchronisation points for tests that run a job in another process (no sleeps racing it).

``PauseAfterFirst(folder)`` is an ``on_unit`` hook: after the first complete unit it writes
``folder/first.json`` (the unit's result) and blocks until ``folder/go`` exists, so the test acts
(sends SIGINT, kills a node) at a known point while the job is paused with work in flight.

Run a launch script's ``main`` with that hook in a subprocess:

    python tests/events.py EVENTS_DIR generate_depth [script arguments...]
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time


class PauseAfterFirst:
    def __init__(self, folder: str):
        self.folder, self.seen = folder, 0

    def __call__(self, result: dict) -> None:
        self.seen += 1
        if self.seen != 1:
            return
        os.makedirs(self.folder, exist_ok=True)
        tmp = os.path.join(self.folder, ".first.json")
        with open(tmp, "w") as fh:
            json.dump({k: v for k, v in result.items() if isinstance(v, (str, int, float, list, type(None)))}, fh)
        os.replace(tmp, os.path.join(self.folder, "first.json"))  # appears complete or not at all
        while not os.path.exists(os.path.join(self.folder, "go")):
            time.sleep(0.05)  # waiting for the test's signal, not for the job


def wait_for_file(path: str, proc, timeout: float = 600) -> bool:
    """True once ``path`` exists; False if ``proc`` exits first or ``timeout`` (a generous cap) passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        if proc.poll() is not None:
            return os.path.exists(path)
        time.sleep(0.05)
    return False


if __name__ == "__main__":
    # Ctrl-C as a terminal delivers it: a job started from a background shell (`cmd &`, as CI runners may run
    # the suite) inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler at all
    signal.signal(signal.SIGINT, signal.default_int_handler)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)
    events, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    importlib.import_module(f"launch.{script}").main(args, on_unit=PauseAfterFirst(events))
