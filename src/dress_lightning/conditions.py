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

TARGET = "target"
"""Condition spec (evaluate, chat, demo): the model's own inference condition (conditional RL: all scores at the top)."""
NO_CONDITION = "none"
"""Condition spec: answer without a condition."""
LOW = "low"
"""Condition spec: a low score on every aspect (steerability: does the model answer worse when asked to?)."""
TARGET_CRITIQUE = "The response is helpful, honest and harmless."
"""The default critique of an ideal response, used in the target condition."""
PERFECT_SHAPEWORLD_CRITIQUE = "Answers the question correctly and completely, and mentions only what is in the image."
"""What the annotation judge writes for a perfect answer to a ShapeWorld question (a ``target_critique`` option)."""
LOW_CRITIQUE = "The response is unhelpful, describes things that are not in the image and helps with harm."
"""The critique of the low condition: generic, naming no object, so that no word of it can be copied into an answer."""
LOW_SCORE = 0.3
"""The low condition's score on every aspect, as a fraction of the scale."""


ConditionPlacement = Literal["assistant_prefix", "user_suffix", "user_prefix"]
"""Where a turn's condition goes in the prompt: before its response (``assistant_prefix``, DRESS), after the user
turn (``user_suffix``) or before it (``user_prefix``)."""


@dataclass
class ConditionSettings:
    """How feedback becomes the condition text (a CRL option; the same at training and inference)."""

    mode: ConditionMode = "score_critique"
    """``score_critique`` (DRESS), ``score`` (Quark / SteerLM-like), ``critique``, or ``none`` (plain SFT)."""
    score_scale: int = 10
    """Scores are shown as integers out of this (rescaled from the feedback's own ``score_max``)."""
    encoding: Literal["text", "tokens"] = "text"
    """``text``: scores written out (``helpfulness 7/10``); ``tokens``: one reserved token per aspect and score
    (``<helpfulness_7>``, Quark-style), added to the tokenizer and saved with the checkpoint."""
    target_critique: str = TARGET_CRITIQUE
    """The critique of the target condition ``C(f*)`` (SFT data in CRL and inference). The default is a fixed
    sentence no judge writes; set it to the judge's own critique of a perfect answer (the annotation judge:
    ``PERFECT_SHAPEWORLD_CRITIQUE``) so that the model's perfect rollout answers and the reference answers
    share one condition."""
    templates: Literal["fixed", "random"] = "fixed"
    """Training only: ``random`` renders each training condition with one of ``TEMPLATES`` (Chain of Hindsight
    varies its feedback phrasing against shortcuts); inference always uses the first, canonical one."""
    dropout: float = 0.0
    """Training only: the share of responses trained without their condition, so that one model also
    answers unconditioned (what classifier-free guidance mixes in; Korbak et al. 2023 use a small share)."""
    placement: ConditionPlacement = "assistant_prefix"
    """Where the condition goes (``ConditionPlacement``), in training and in every prompt the model gets later
    (evaluate, rollout, chat, export read it from the checkpoint). ``user_prefix`` keeps the question next to
    the answer as in SFT; on ShapeWorld the answers then copy the question's objects and places (README)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"condition.dropout is a share of training responses in [0, 1), got {self.dropout}")


TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("Feedback: ", "{scores}.", "Critique: {critique}"),  # canonical: inference and ``templates: fixed``
    ("Judge's scores: ", "{scores}.", "Comment: {critique}"),
    ("Rated ", "{scores}.", "Reviewer notes: {critique}"),
    ("Assessment of this answer: ", "{scores}.", "Why: {critique}"),
)
"""Phrasings of ``C(f)``: (opening, scores part, critique part); ``templates: random`` trains on all of them."""


def render_condition(feedback: Mapping[str, Any] | None, settings: ConditionSettings, template: int = 0) -> str | None:
    """``C(f)`` for one schema feedback entry, or None when the mode is ``none`` or there is no feedback.

    ``template`` picks one of ``TEMPLATES`` (0, the canonical one, unless training with random templates).
    """
    if settings.mode == "none" or feedback is None:
        return None
    opening, scores_part, critique_part = TEMPLATES[template]
    parts = []
    if settings.mode in ("score_critique", "score"):
        scale = settings.score_scale
        scores = {aspect: round(feedback["scores"][aspect] / feedback["score_max"] * scale)
                  for aspect in ASPECTS if aspect in feedback["scores"]}
        if scores and settings.encoding == "tokens":
            opening = ""  # the tokens are the whole score part: no words around them
            parts.append("".join(score_token(aspect, score) for aspect, score in scores.items()))
        elif scores:
            parts.append(scores_part.format(scores=", ".join(f"{a} {s}/{scale}" for a, s in scores.items())))
    if settings.mode in ("score_critique", "critique") and feedback.get("critique"):
        parts.append(critique_part.format(critique=feedback["critique"].strip()))
    return opening + " ".join(parts) if parts else None


def score_token(aspect: str, score: int) -> str:
    """The reserved token of one aspect's score (``encoding: tokens``): ``<helpfulness_7>``."""
    return f"<{aspect}_{score}>"


def condition_tokens(settings: ConditionSettings) -> list[str]:
    """The tokens ``settings`` renders conditions with, to add to the tokenizer (none with ``encoding: text``)."""
    if settings.encoding != "tokens":
        return []
    return [score_token(aspect, score) for aspect in ASPECTS for score in range(settings.score_scale + 1)]


def target_feedback(settings: ConditionSettings) -> dict[str, Any]:
    """The feedback of an ideal response: top score on every aspect, the fixed positive critique."""
    top = float(settings.score_scale)
    return {"scores": {aspect: top for aspect in ASPECTS}, "score_max": top, "critique": settings.target_critique}


def target_condition(settings: ConditionSettings) -> str | None:
    """``C(f*)``: the condition used at inference (None in mode ``none``)."""
    return render_condition(target_feedback(settings), settings)


def low_condition(settings: ConditionSettings) -> str | None:
    """A low-score condition (``LOW_SCORE`` on every aspect, ``LOW_CRITIQUE``): the opposite of the target."""
    top = float(settings.score_scale)
    feedback = {"scores": {aspect: LOW_SCORE * top for aspect in ASPECTS}, "score_max": top, "critique": LOW_CRITIQUE}
    return render_condition(feedback, settings)


def condition_for(spec: str, own: str | None, settings: ConditionSettings | None) -> str | None:
    """The condition text a spec names: ``target`` (``own``, the model's default), ``none``, ``low``, or the text itself.

    ``settings`` is the model's condition format (needed for ``low``; None: the model has none).
    """
    if spec == TARGET:
        return own
    if spec == NO_CONDITION:
        return None
    if spec == LOW:
        if settings is None:
            raise ValueError("condition `low` needs a model trained with a condition format (conditional RL)")
        return low_condition(settings)
    return spec


def mean_score(feedback: Mapping[str, Any]) -> float:
    """Mean score of a feedback entry as a fraction of its scale (for "did the refinement improve")."""
    scores = feedback["scores"]
    return sum(scores.values()) / len(scores) / feedback["score_max"]
