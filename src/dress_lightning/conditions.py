"""The condition text ``C(f)`` of conditional RL: one versioned template for training, generation and evaluation.

A feedback entry (scores per aspect + critique) is rendered as, e.g.::

    Feedback: helpfulness 7/10, honesty 3/10, harmlessness 10/10. Critique: mentions a blue square that is not there.

and placed before the response it describes (see ``conversation.py``). The *target condition*
``C(f*)`` has every score at the top of the scale and a fixed positive critique; it is what the
model is conditioned on at inference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dress_lightning.aspects import ASPECTS

CONDITION_FORMAT_VERSION = "dress-condition-v1"
"""Version of the rendering below; recorded with checkpoints and generated data."""

ConditionMode = Literal["score_critique", "score", "critique", "none"]

TARGET_CRITIQUE = "The response is helpful, honest and harmless."
"""The critique of an ideal response, used in the target condition."""


@dataclass
class ConditionSettings:
    """How feedback becomes the condition text (a CRL option; the same at training and inference)."""

    mode: ConditionMode = "score_critique"
    """``score_critique`` (DRESS), ``score`` (Quark / SteerLM-like), ``critique``, or ``none`` (plain SFT)."""
    score_scale: int = 10
    """Scores are shown as integers out of this (rescaled from the feedback's own ``score_max``)."""


def render_condition(feedback: Mapping[str, Any] | None, settings: ConditionSettings) -> str | None:
    """``C(f)`` for one schema feedback entry, or None when the mode is ``none`` or there is no feedback."""
    if settings.mode == "none" or feedback is None:
        return None
    parts = []
    if settings.mode in ("score_critique", "score"):
        scale = settings.score_scale
        scores = [
            f"{aspect} {round(feedback['scores'][aspect] / feedback['score_max'] * scale)}/{scale}"
            for aspect in ASPECTS
            if aspect in feedback["scores"]
        ]
        if scores:
            parts.append(", ".join(scores) + ".")
    if settings.mode in ("score_critique", "critique") and feedback.get("critique"):
        parts.append(f"Critique: {feedback['critique'].strip()}")
    return "Feedback: " + " ".join(parts) if parts else None


def target_feedback(settings: ConditionSettings) -> dict[str, Any]:
    """The feedback of an ideal response: top score on every aspect, the fixed positive critique."""
    top = float(settings.score_scale)
    return {"scores": {aspect: top for aspect in ASPECTS}, "score_max": top, "critique": TARGET_CRITIQUE}


def target_condition(settings: ConditionSettings) -> str | None:
    """``C(f*)``: the condition used at inference (None in mode ``none``)."""
    return render_condition(target_feedback(settings), settings)


def mean_score(feedback: Mapping[str, Any]) -> float:
    """Mean score of a feedback entry as a fraction of its scale (for "did the refinement improve")."""
    scores = feedback["scores"]
    return sum(scores.values()) / len(scores) / feedback["score_max"]
