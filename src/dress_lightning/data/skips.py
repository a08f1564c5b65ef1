"""Inputs skipped for a counted reason: the exception that skips one and the log that counts them.

Converters, image decoding, shard writing and reading, and the training stream all skip bad inputs
this way, never silently. Torch-free and webdataset-free, like the schema beside it, so that the
converters and judges can use it cheaply.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class SkipRecord(Exception):
    """Raised by a record-to-sample function to skip an input record for a counted reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SkippedRecord:
    """One input that could not be turned into a sample."""

    where: str
    reason: str
    detail: str


@dataclass
class SkipLog:
    """Every skipped input with its reason."""

    records: list[SkippedRecord] = field(default_factory=list)

    def add(self, where: str, reason: str, detail: str = "") -> None:
        """Record one skipped input."""
        self.records.append(SkippedRecord(where, reason, detail))

    def counts(self) -> dict[str, int]:
        """Number of skipped inputs per reason, most frequent first."""
        return dict(Counter(r.reason for r in self.records).most_common())

    def first_example(self, reason: str) -> SkippedRecord:
        """The first input skipped for a reason, to show in summaries."""
        return next(r for r in self.records if r.reason == reason)
