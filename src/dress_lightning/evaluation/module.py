"""Evaluation inside Lightning's predict loop: answer, judge, refine, and update synced TorchMetrics.

``EvaluationModule`` reuses the rollout's trajectory machinery (``RolloutModule``): each prompt gets
one greedy answer, the judge critiques it, and for ``refinement_turns`` > 0 the judge's refinement
NLF is answered again up to K times (stopping at the top score), as DRESS's multi-turn interaction
evaluation does. The axes read the trajectories:

- helpfulness (and the judge's honesty score): first answers to benign prompts, per category;
- honesty as CHAIR: object mentions of first answers to benign prompts in ``chair_categories``;
- harmlessness: the judge's VLSafe verdicts and harmlessness score on harmful-intent prompts;
- interaction: the mean judge score (over aspects) at every turn of every trajectory;
- grounding: exact accuracy of first answers per ShapeWorld question type, the colour and shape
  questions again by how many objects fit them besides their place (beside a guess among those), and
  the share of distinct descriptions. With ``image_control`` the same prompts are answered with a blank image or with the
  image of another prompt (a blind control): the gap to the real images is how much answers depend
  on what the model sees. The judge always reads the true annotations.
- POPE: first answers to POPE prompts against their yes/no label (these prompts are not judged).

Metric states are summed across ranks by TorchMetrics when ``compute`` runs, so every rank ends
with the same results under DDP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torchmetrics import SumMetric

from dress_lightning.aspects import ASPECTS
from dress_lightning.conversation import ConversationFormatter
from dress_lightning.data.converters import POPE_CATEGORY
from dress_lightning.data.shapeworld import QUESTION_TYPES, matching_objects
from dress_lightning.data.shapeworld import SOURCE as SHAPEWORLD_SOURCE
from dress_lightning.evaluation.metrics import (
    CHAIR,
    chair_counts,
    pope_says_yes,
    shapeworld_object_counts,
    POPE,
    AnswerAccuracy,
    AspectScore,
    DistinctAnswers,
    RefinementGain,
    SafetyRate,
    ScoreByTurn,
)
from dress_lightning.feedback.annotation_judge import answers_correctly
from dress_lightning.feedback.judges import Judge, JudgeFailure, SafetyVerdict
from dress_lightning.feedback.rollout import RolloutModule, Trajectory
from dress_lightning.feedback.synonyms import COCO, SHAPEWORLD, Vocabulary, annotated_objects
from dress_lightning.decoding import GenerationSettings
from dress_lightning.tasks.base import VisionLanguageTask

VOCABULARIES: dict[str, Vocabulary] = {"coco": COCO, "shapeworld": SHAPEWORLD}
"""Object vocabularies CHAIR can count mentions with, by name."""

HARMFUL_CATEGORY = "harmful"
"""The category harmful-intent prompts are reported under (harmlessness axis)."""

ImageControl = Literal["image", "blank", "shuffled"]
"""What the model sees: the prompt's own image, a blank image, or the image of another prompt."""

GROUNDED_TYPES = tuple(t for t in QUESTION_TYPES if t != HARMFUL_CATEGORY)
"""ShapeWorld question types with an exact answer (grounding accuracy)."""

PLACED_TYPES = ("color", "shape")
"""Questions about the object at a named place ("What color is the circle at the top left?")."""

CANDIDATE_GROUPS = tuple(f"{t}: {g}" for t in PLACED_TYPES for g in ("one candidate", "2+ candidates"))
"""``accuracy_by_candidates`` keys: placed questions by how many objects fit their words besides the place.
With one candidate the place need not be read; with several, a model that sees what is there but not
where guesses among them: ``guess_by_candidates`` is that guess's expected accuracy, from the annotations."""

DESCRIBE_TYPE = "describe"
EXISTS_TYPE = "exists"


@dataclass
class Axes:
    """Which prompts each axis reads (an eval set's settings)."""

    categories: Sequence[str]
    """Helpfulness categories of the benign prompts (a benign prompt of another category is an error)."""
    vocabulary: str = "coco"
    """Object vocabulary of CHAIR: coco, or shapeworld (an object is colour + shape: ``shapeworld_object_counts``)."""
    chair_categories: Sequence[str] | None = None
    """Benign categories whose first answers CHAIR counts (None: every benign prompt)."""


class ImageSwap:
    """The images a model sees under an image control, batch by batch of one prompt stream.

    ``image``: the prompt's own. ``blank``: a uniform image of the transform's normalisation mean (all
    zeros after it). ``shuffled``: every prompt gets the image of the prompt before it in the stream
    (the first prompt of the first batch: that batch's last image), so never its own.
    """

    def __init__(self, control: ImageControl = "image") -> None:
        if control not in ("image", "blank", "shuffled"):
            raise ValueError(f"unknown image control {control!r}; valid: image, blank, shuffled")
        self.control = control
        self._previous: torch.Tensor | None = None

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> the images shown, (B, 3, H, W)."""
        if self.control == "image":
            return pixel_values
        if self.control == "blank":
            return torch.zeros_like(pixel_values)
        if self._previous is None and len(pixel_values) < 2:
            raise ValueError("the shuffled control needs a first batch of at least 2 prompts (raise batch_size)")
        previous = pixel_values[-1:] if self._previous is None else self._previous
        self._previous = pixel_values[-1:].clone()
        return torch.cat([previous, pixel_values[:-1]])


class EvaluationModule(RolloutModule):
    """Answers each prompt once (greedy by default), refines for ``refinement_turns``, updates the metrics.

    ``condition`` replaces the policy's own condition in every answer (e.g. a low score, to check that
    a CRL model follows its condition); None keeps the policy's (CRL: the target condition).
    ``image_control`` replaces the images the model sees (``ImageSwap``); the judge still reads the truth.
    """

    def __init__(
        self,
        policy: VisionLanguageTask,
        judge: Judge,
        formatter: ConversationFormatter,
        generation: GenerationSettings,
        axes: Axes,
        refinement_turns: int = 0,
        condition: str | None = None,
        image_control: ImageControl = "image",
    ) -> None:
        """``condition``: the condition text of every answer (None: no condition; ``conditions.condition_for``
        turns a spec such as ``target`` into it)."""
        if generation.num_samples != 1:
            raise ValueError(f"evaluation answers each prompt once; got generation.num_samples={generation.num_samples}")
        if axes.vocabulary not in VOCABULARIES:
            raise ValueError(f"unknown CHAIR vocabulary {axes.vocabulary!r}; valid: {', '.join(VOCABULARIES)}")
        super().__init__(policy, judge, formatter, generation, refinement_turns)
        self.condition = condition
        self.axes = axes
        self.vocabulary = VOCABULARIES[axes.vocabulary]
        categories = list(axes.categories)
        self.helpfulness = AspectScore(categories)
        self.honesty = AspectScore(categories)
        self.harmlessness = AspectScore([HARMFUL_CATEGORY])
        self.chair = CHAIR(self.vocabulary)
        self.safety = SafetyRate()
        self.interaction = RefinementGain(max(refinement_turns, 1))
        self.score_by_turn = ScoreByTurn(max(refinement_turns, 1))
        self.accuracy = AnswerAccuracy(GROUNDED_TYPES)
        self.accuracy_by_candidates = AnswerAccuracy(CANDIDATE_GROUPS)
        self.guess_by_candidates = AnswerAccuracy(CANDIDATE_GROUPS)
        self.distinct_descriptions = DistinctAnswers()
        self.pope = POPE()
        self.prompts = SumMetric()
        self.images = ImageSwap(image_control)

    def _judge(self, trajectories: Sequence[Trajectory]) -> None:
        # A POPE answer is scored against its yes/no label; it gets no feedback, hence no refinement.
        for trajectory in trajectories:
            if _pope_label(trajectory) is not None:
                trajectory.feedback.append(None)
        super()._judge([t for t in trajectories if _pope_label(t) is None])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        batch["pixel_values"] = self.images(batch["pixel_values"])
        trajectories = super().predict_step(batch, batch_idx)
        self.prompts.update(len(trajectories))
        self._update_pope([t for t in trajectories if _yes_no_label(t) is not None])
        judged = [t for t in trajectories if _pope_label(t) is None]
        verdicts = self._safety_verdicts([t for t in judged if _harmful(t)])
        self._update_scores(judged)
        self._update_chair(judged)
        self._update_interaction(judged)
        self._update_grounding(judged)
        return [self.record(t, verdicts.get(t.sample.record["id"])) for t in trajectories]

    def _update_pope(self, trajectories: Sequence[Trajectory]) -> None:
        if trajectories:
            self.pope.update([t.conversation[1]["content"] for t in trajectories],
                             torch.tensor([_yes_no_label(t) for t in trajectories]))

    def _safety_verdicts(self, harmful: Sequence[Trajectory]) -> dict[str, SafetyVerdict | JudgeFailure]:
        items = [(t.sample.record["annotations"], t.conversation[:1], t.conversation[1]["content"]) for t in harmful]
        verdicts = self.judge.safety_verdict_many(items)
        valid = [v for v in verdicts if not isinstance(v, JudgeFailure)]
        self.stats["judge failures"] += len(verdicts) - len(valid)
        if valid:
            self.safety.update(*(torch.tensor([getattr(v, k) for v in valid]) for k in ("relevant", "safe", "persuasive")))
        return {t.sample.record["id"]: v for t, v in zip(harmful, verdicts)}

    def _update_scores(self, trajectories: Sequence[Trajectory]) -> None:
        first = [t for t in trajectories if t.feedback[0] is not None]
        self.stats["unjudged first answers"] += len(trajectories) - len(first)
        benign = [t for t in first if not _harmful(t)]
        if benign:
            categories = [t.sample.record.get("category", "") for t in benign]
            for metric, aspect in ((self.helpfulness, "helpfulness"), (self.honesty, "honesty")):
                metric.update(torch.tensor([t.feedback[0]["scores"][aspect] for t in benign]), categories)
        harmful = [t for t in first if _harmful(t)]
        if harmful:
            scores = torch.tensor([t.feedback[0]["scores"]["harmlessness"] for t in harmful])
            self.harmlessness.update(scores, [HARMFUL_CATEGORY] * len(harmful))

    def _counts_in_chair(self, trajectory: Trajectory) -> bool:
        chosen = self.axes.chair_categories
        return not _harmful(trajectory) and (chosen is None or trajectory.sample.record.get("category") in chosen)

    def _chair_counts(self, trajectory: Trajectory) -> tuple[int, int]:
        """(hallucinated, all) object mentions of the first answer: colour + shape objects on ShapeWorld."""
        answer, annotations = trajectory.conversation[1]["content"], trajectory.sample.record["annotations"]
        if self.axes.vocabulary == "shapeworld":
            return shapeworld_object_counts(answer, annotations["objects"])
        return chair_counts(answer, annotated_objects(annotations, self.vocabulary), self.vocabulary)

    def _update_chair(self, trajectories: Sequence[Trajectory]) -> None:
        counts = [self._chair_counts(t) for t in trajectories if self._counts_in_chair(t)]
        if counts:
            self.chair.update_counts(counts)

    def _update_interaction(self, trajectories: Sequence[Trajectory]) -> None:
        turns = self.interaction.refinement_turns + 1
        rows, filled = [], []
        for trajectory in trajectories:
            if trajectory.feedback[0] is None:
                continue
            row = [math.nan] * turns
            for turn, feedback in enumerate(trajectory.feedback[:turns]):
                if feedback is not None:
                    row[turn] = sum(feedback["scores"][a] for a in ASPECTS) / len(ASPECTS)
            rows.append(row)
            # A trajectory stops once perfect: its score stays at the top for the turns it skipped.
            filled.append(_forward_fill(row) if trajectory.last_critique_perfect else row)
        if rows:
            self.interaction.update(torch.tensor(rows))
            self.score_by_turn.update(torch.tensor(filled))

    def _update_grounding(self, trajectories: Sequence[Trajectory]) -> None:
        """Exact accuracy of first answers to ShapeWorld questions, and distinct answers among descriptions."""
        graded, correct, descriptions, placed, placed_correct, placed_guess = [], [], [], [], [], []
        for trajectory in trajectories:
            answer = trajectory.conversation[1]["content"]
            annotations = trajectory.sample.record["annotations"]
            verdict = answers_correctly(annotations, trajectory.conversation[:1], answer)
            if verdict is None:  # not a ShapeWorld question with an exact answer
                continue
            query = annotations["queries"][0]
            graded.append(query["type"])
            correct.append(verdict)
            if query["type"] == DESCRIBE_TYPE:
                descriptions.append(answer)
            if query["type"] in PLACED_TYPES:
                group, guess = candidate_group(query, annotations["objects"])
                placed.append(f"{query['type']}: {group}")
                placed_correct.append(verdict)
                placed_guess.append(guess)
        if graded:
            self.accuracy.update(torch.tensor(correct), graded)
            self.distinct_descriptions.update(descriptions)
        if placed:
            self.accuracy_by_candidates.update(torch.tensor(placed_correct), placed)
            self.guess_by_candidates.update(torch.tensor(placed_guess), placed)

    def record(self, trajectory: Trajectory, verdict: SafetyVerdict | JudgeFailure | None) -> dict[str, Any]:
        """What ``responses.jsonl`` keeps of one prompt: the dialogue with refinements, feedback, verdict."""
        source = trajectory.sample.record
        entry = {
            "id": source["id"],
            "source": source["source"],
            "image_id": source["image_id"],
            "category": source.get("category"),
            "harmful_intent": _harmful(trajectory),
            "conversation": trajectory.conversation,
            "feedback": trajectory.feedback,
            "judge_failures": trajectory.failures,
        }
        label = _yes_no_label(trajectory)
        if label is not None:
            entry["pope"] = {"label": label, "said_yes": pope_says_yes(trajectory.conversation[1]["content"])}
        if self._counts_in_chair(trajectory):
            hallucinated, mentions = self._chair_counts(trajectory)
            entry["chair"] = {"hallucinated": hallucinated, "mentions": mentions}
        if verdict is not None:
            entry["safety_verdict"] = asdict(verdict) if isinstance(verdict, SafetyVerdict) else {
                "failure": verdict.reason
            }
        return entry

    def results(self) -> dict[str, Any]:
        """Every axis, synced across ranks (call on all ranks)."""
        return {
            "prompts": int(self.prompts.compute()),
            "helpfulness": _floats(self.helpfulness.compute()),
            "honesty_score": _floats(self.honesty.compute()),
            "harmlessness_score": _floats(self.harmlessness.compute()),
            "chair": _floats(self.chair.compute()),
            "safety": _floats(self.safety.compute()),
            "interaction": _floats(self.interaction.compute()),
            "score_by_turn": [None if math.isnan(v) else v for v in self.score_by_turn.compute().tolist()],
            "accuracy": _floats(self.accuracy.compute()),
            "distinct_descriptions": _floats({"share": self.distinct_descriptions.compute()})["share"],
            **{name: {k: v for k, v in _floats(metric.compute()).items() if k != "overall"}
               for name, metric in (("accuracy_by_candidates", self.accuracy_by_candidates),
                                    ("guess_by_candidates", self.guess_by_candidates))},
            "pope": _floats(self.pope.compute()),
        }


def candidate_group(query: dict[str, Any], objects: Sequence[dict[str, Any]]) -> tuple[str, float]:
    """Whether one object or several fit a placed question's words besides its place (a colour question
    names the shape, "the circle at the top left"; a shape question names nothing but the place), and the
    chance that a guess among them, ignoring the place, gives the right colour or shape."""
    asked = query["type"]
    candidates = matching_objects(objects, None, query.get("shape") if asked == "color" else None)
    target = next(o for o in objects if o["position"] == query["position"])
    guess = sum(o[asked] == target[asked] for o in candidates) / len(candidates)
    return ("one candidate" if len(candidates) == 1 else "2+ candidates"), guess


def _harmful(trajectory: Trajectory) -> bool:
    return bool(trajectory.sample.record["annotations"]["safety"]["harmful_intent"])


def _pope_label(trajectory: Trajectory) -> bool | None:
    """The yes/no label of a POPE prompt (``data convert-pope``); None for any other prompt."""
    queries = trajectory.sample.record["annotations"].get("queries") or [None]
    query = queries[0]
    return query["label"] == "yes" if query is not None and query["type"] == POPE_CATEGORY else None


def _yes_no_label(trajectory: Trajectory) -> bool | None:
    """The truth of a yes/no existence question: a POPE prompt's label, or whether the object a ShapeWorld
    "Is there ...?" question names is in the image (those are also judged as usual); None otherwise."""
    label = _pope_label(trajectory)
    if label is not None:
        return label
    annotations = trajectory.sample.record["annotations"]
    query = (annotations.get("queries") or [None])[0]
    if query is None or query["type"] != EXISTS_TYPE or trajectory.sample.record["source"] != SHAPEWORLD_SOURCE:
        return None
    return bool(matching_objects(annotations["objects"], query.get("color"), query["shape"]))


def _forward_fill(row: list[float]) -> list[float]:
    filled, last = [], math.nan
    for value in row:
        last = last if math.isnan(value) else value
        filled.append(last)
    return filled


def _floats(values: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """JSON-ready: tensors to floats, nan (no data) to None."""
    return {k: None if math.isnan(v := float(t)) else v for k, t in values.items()}
