"""Files that appear whole or not at all, claims on work, and named crash points for the fault-injection tests.

A reader (a resumed run, ``data inspect``, the trainer) must never see a half-written shard,
manifest or report: everything is written under a temporary name in the same directory, flushed
to disk, then renamed over the final name (``os.replace`` is atomic on POSIX file systems).
Processes sharing a directory claim a piece of work with a file created exclusively (``claim``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

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


STALE_CLAIM_SECONDS = 60.0
"""A claim file still without a process id after this long was left by a process that died creating it."""


@contextmanager
def claim(path: Path, done: Callable[[], bool], name: str, poll_seconds: float = 10.0) -> Iterator[bool]:
    """Claim a piece of work for this process with ``path``, created exclusively and holding its process id.

    Yields whether to do the work: False when ``done()`` (another process finished it). While another live
    process holds the claim, waits; a claim whose process is gone is taken over. The claim is released on exit.
    """
    waiting = False
    while not try_claim(path, name):
        if done():
            yield False
            return
        if not waiting:
            log.warning("%s: process %s is on it (%s); waiting for it.", name, _claim_owner(path), path)
            waiting = True
        time.sleep(poll_seconds)
    try:
        yield not done()
    finally:
        path.unlink(missing_ok=True)


def try_claim(path: Path, name: str) -> bool:
    """Create the claim ``path`` for this process unless another live process holds it (then False, at once).

    A claim whose process is gone is taken over. The caller releases a claim it got by deleting ``path``.
    """
    while not _create_claim(path):
        owner = _claim_owner(path)
        if owner is None and time.time() - _mtime(path) < STALE_CLAIM_SECONDS:
            time.sleep(0.1)  # just created: its process id is not written yet
            continue
        if owner is None or not _alive(owner):
            log.warning("%s: the process that claimed it (%s) is gone; taking it over.", name, owner)
            path.unlink(missing_ok=True)
            continue
        return False
    return True


def _create_claim(path: Path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def _claim_owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


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
