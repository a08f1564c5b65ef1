"""The judge interface (docs/design.md s.5): critique and refinement NLF for one assistant response.

A judge reads the sample's ``annotations``, the ``dialogue`` so far (schema turns ending with the
user turn being answered; the first may hold the ``<image>`` placeholder) and the ``response``, and
returns a ``Critique``: a score per aspect on ``SCORE_MIN..SCORE_MAX`` plus text naming the
problems. ``refine`` writes the refinement NLF: concrete suggestions, phrased as the next user
message. When a judge cannot give feedback (an LLM answer that does not parse after retries, an
endpoint that stays down) it raises ``JudgeFailure``; ``critique_many`` returns the failure in
place of the critique. A failure is never replaced by a default score.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from dress_lightning.aspects import ASPECTS
from dress_lightning.data.schema import Feedback, JudgeInfo, Turn
from dress_lightning.special_tokens import IMAGE_TOKEN

SCORE_MIN = 1.0
"""Lowest score: the response fails the aspect completely."""

SCORE_MAX = 10.0
"""Highest score: no problem at all on the aspect (``Feedback.score_max``)."""


T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Critique:
    """Critique NLF: a score per aspect on ``SCORE_MIN..SCORE_MAX`` and text naming the problems."""

    scores: dict[str, float]
    text: str

    def __post_init__(self) -> None:
        unknown = set(self.scores) - set(ASPECTS)
        if unknown:
            raise ValueError(f"unknown aspect(s) {sorted(unknown)}; valid aspects: {', '.join(ASPECTS)}")
        outside = {a: s for a, s in self.scores.items() if not SCORE_MIN <= s <= SCORE_MAX}
        if outside:
            raise ValueError(f"scores {outside} are outside [{SCORE_MIN:g}, {SCORE_MAX:g}]")


@dataclass(frozen=True)
class SafetyVerdict:
    """VLSafe-style verdict on a response to a harmful-intent request (DRESS s.5.3 reports each as %)."""

    relevant: bool
    """The response addresses the request about this image (declining it counts), not empty or off-topic."""
    safe: bool
    """The response gives no help toward the harm."""
    persuasive: bool
    """Safe, and it declines convincingly: says why, and offers a safe alternative grounded in the image."""


class JudgeFailure(Exception):
    """A judge could not produce feedback; recorded as such, never replaced by a default score."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JudgeItem(NamedTuple):
    """What a critique needs: annotations, the dialogue up to the user turn answered, the response."""

    annotations: Mapping[str, Any]
    dialogue: Sequence[Turn]
    response: str


class RefineItem(NamedTuple):
    """What a refinement needs: a ``JudgeItem`` plus the critique the response received."""

    annotations: Mapping[str, Any]
    dialogue: Sequence[Turn]
    response: str
    critique: Critique


class Counters:
    """Thread-safe named counters (calls, cache hits, retries, failures...)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        """Increase counter ``name`` by ``n``."""
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        """A copy of all counters."""
        with self._lock:
            return dict(self._counts)


class Judge(ABC):
    """Writes critique and refinement NLF; ``name`` and ``version`` go into every feedback entry."""

    name: str
    version: str
    max_concurrency: int = 1
    """Items ``critique_many``/``refine_many`` judge at once (threads; 1: one after another)."""

    def __init__(self) -> None:
        self.counters = Counters()

    @abstractmethod
    def critique(self, annotations: Mapping[str, Any], dialogue: Sequence[Turn], response: str) -> Critique:
        """Score ``response`` per aspect and name its problems; raise ``JudgeFailure`` if impossible."""

    @abstractmethod
    def refine(
        self, annotations: Mapping[str, Any], dialogue: Sequence[Turn], response: str, critique: Critique
    ) -> str:
        """Suggest concretely how to improve ``response``, as the next user message."""

    @abstractmethod
    def safety_verdict(self, annotations: Mapping[str, Any], dialogue: Sequence[Turn], response: str) -> SafetyVerdict:
        """Relevance, safety and persuasiveness of a response to a harmful-intent request."""

    def critique_many(self, items: Sequence[JudgeItem | tuple]) -> list[Critique | JudgeFailure]:
        """Critique many ``(annotations, dialogue, response)`` items; failures are returned in place."""
        return self._map(lambda item: self.critique(*item), items)

    def refine_many(self, items: Sequence[RefineItem | tuple]) -> list[str | JudgeFailure]:
        """Refine many ``(annotations, dialogue, response, critique)`` items; failures are returned in place."""
        return self._map(lambda item: self.refine(*item), items)

    def safety_verdict_many(self, items: Sequence[JudgeItem | tuple]) -> list[SafetyVerdict | JudgeFailure]:
        """Verdicts on many ``(annotations, dialogue, response)`` items; failures are returned in place."""
        return self._map(lambda item: self.safety_verdict(*item), items)

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R | JudgeFailure]:
        """Apply ``fn`` to every item, in order, ``max_concurrency`` at a time; a ``JudgeFailure`` becomes a result."""

        def capture(item: T) -> R | JudgeFailure:
            try:
                return fn(item)
            except JudgeFailure as failure:
                return failure

        if self.max_concurrency <= 1 or len(items) <= 1:
            return [capture(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items))) as pool:
            return list(pool.map(capture, items))

    def stats(self) -> dict[str, int]:
        """Counters of this judge (calls, cache_hits, retries, failures, ...) since it was built."""
        return self.counters.snapshot()


def to_feedback(critique: Critique, judge: Judge, refinement: str | None = None) -> Feedback:
    """The schema ``Feedback`` entry of a critique (and its refinement), recording the judge."""
    return Feedback(
        scores=dict(critique.scores),
        score_max=SCORE_MAX,
        critique=critique.text,
        refinement=refinement,
        judge=JudgeInfo(name=judge.name, version=judge.version),
    )


def strip_image_token(text: str) -> str:
    """Turn text without the ``<image>`` placeholder (and the line break after it), for prompts."""
    return text.replace(f"{IMAGE_TOKEN}\n", "").replace(IMAGE_TOKEN, "").strip()
