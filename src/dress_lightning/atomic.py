"""Files that appear whole or not at all, and named crash points for the fault-injection tests.

A reader (a resumed run, ``data inspect``, the trainer) must never see a half-written shard,
manifest or report: everything is written under a temporary name in the same directory, flushed
to disk, then renamed over the final name (``os.replace`` is atomic on POSIX file systems).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
"""Suffix of a file still being written; a crash leaves it behind, and nothing reads it."""

CRASH_AT_ENV = "DRESS_LIGHTNING_CRASH_AT"
"""Test hook: ``NAME`` or ``NAME@N`` makes the process SIGKILL itself the (N-th) time it reaches ``crash_point(NAME)``."""

_crash_points_reached: Counter = Counter()


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is complete."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def commit(partial: Path, path: Path) -> None:
    """Flush ``partial`` to disk and rename it to ``path`` in one step."""
    with open(partial, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(partial, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    partial = partial_path(path)
    partial.write_text(text, encoding="utf-8")
    commit(partial, path)


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL here if ``$DRESS_LIGHTNING_CRASH_AT`` names this point (tests only).

    SIGKILL, like a power cut or the OOM killer, runs no cleanup: what survives is what was on disk.
    """
    wanted = os.environ.get(CRASH_AT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _crash_points_reached[name] += 1
    if _crash_points_reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
