"""On-disk cache of judge answers, so an interrupted or repeated job makes no repeated (paid) calls.

One sqlite file holds one row per answer, keyed by (judge endpoint, prompt version, prompt hash):
the endpoint names the server and the model (the ``model`` column), the hash covers the full
rendered messages and the decoding parameters. Each answer is committed as
soon as it arrives, and WAL mode lets several processes (ranks) share the file. Only the raw answer
text is stored: no request headers, so no API key.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    answer TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (model, prompt_version, prompt_hash)
)
"""


def prompt_hash(messages: Sequence[Mapping[str, str]], decoding: Mapping[str, Any]) -> str:
    """sha256 of the rendered chat messages and decoding parameters (canonical JSON)."""
    payload = json.dumps({"messages": list(messages), "decoding": dict(decoding)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """A sqlite file of judge answers; safe to share between threads, survives restarts."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the judge's worker threads, serialised by the lock.
        self._connection = sqlite3.connect(self.path, check_same_thread=False, timeout=60.0)
        self._lock = threading.Lock()
        with self._lock, self._connection:
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute(_SCHEMA)

    def get(self, model: str, prompt_version: str, key: str) -> str | None:
        """The cached answer of endpoint ``model`` for ``key`` (a ``prompt_hash``), or None."""
        with self._lock:
            row = self._connection.execute(
                "SELECT answer FROM answers WHERE model = ? AND prompt_version = ? AND prompt_hash = ?",
                (model, prompt_version, key),
            ).fetchone()
        return None if row is None else row[0]

    def put(self, model: str, prompt_version: str, key: str, answer: str) -> None:
        """Store an answer and commit it at once (an interrupted job keeps every answer it got)."""
        with self._lock, self._connection:
            self._connection.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                (model, prompt_version, key, answer, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._connection.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._connection.close()
