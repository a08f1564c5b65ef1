"""Conditional-RL data (docs/design.md s.4): NLF trajectories conditioned on their feedback, mixed with SFT data.

Every assistant turn gets a condition ``C(f)`` rendered from the feedback it received; SFT samples
(ground truth, an ideal response) get the target condition ``C(f*)``. Which turns carry loss:

* critique objective: the first response of every trajectory, conditioned on its critique;
* refinement objective: the later responses (answers to refinement NLF given as user turns), kept
  if the score improved over the previous turn or reached ``score_threshold`` (or all of them).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from dress_lightning.conditions import (
    TEMPLATES,
    ConditionSettings,
    condition_tokens,
    mean_score,
    render_condition,
    target_condition,
    target_feedback,
)
from dress_lightning.conversation import ConversationFormatter
from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.data.encoders import SampleEncoder
from dress_lightning.data.pipeline import Source
from dress_lightning.data.schema import Sample
from dress_lightning.models.factory import VisionLanguageConfig
from dress_lightning.data.shapeworld import reference_for_turn
from dress_lightning.data.skips import SkipRecord

log = logging.getLogger(__name__)


@dataclass
class TurnSelection:
    """Which responses of an NLF trajectory are trained on."""

    refinement: bool = True
    """Train on refined turns too (refinement objective); False keeps first responses only."""
    max_turns: int = 3
    """Assistant turns kept per trajectory (the first K + 1)."""
    keep_refined: Literal["all", "improved"] = "improved"
    """``improved``: a refined turn carries loss only if its mean score beat the previous turn's."""
    score_threshold: float | None = None
    """With ``improved``: a refined turn reaching this mean score fraction (0-1) is kept as well."""
    refinement_target: Literal["own", "reference"] = "own"
    """What a kept refined turn is trained to say: the model's own improved answer (DRESS), or the reference
    answer where the annotations determine one (ShapeWorld), under the target condition (it is ideal)."""


def with_condition_tokens(config: VisionLanguageConfig, condition: ConditionSettings) -> VisionLanguageConfig:
    """``config`` with the reserved tokens of ``condition`` (``encoding: tokens``) among its added tokens.

    The task and its data both apply it, so their tokenizers agree; a checkpoint's model config, rebuilt
    by the task, carries them to evaluation, rollouts and chat.
    """
    missing = [t for t in condition_tokens(condition) if t not in config.added_tokens]
    return replace(config, added_tokens=[*config.added_tokens, *missing]) if missing else config


class ConditionedEncoder(SampleEncoder):
    """Conditions every response on its feedback (NLF samples) or on the target (SFT samples)."""

    def __init__(
        self,
        formatter: ConversationFormatter,
        image_transform: Callable,
        condition: ConditionSettings,
        turns: TurnSelection,
    ) -> None:
        super().__init__(formatter, image_transform)
        self.condition = condition
        self.turns = turns

    def select(self, sample: Sample) -> tuple[list[dict], list[str | None], list[bool]]:
        conversation = sample.record["conversation"]
        assistant_at = [i for i, turn in enumerate(conversation) if turn["role"] == "assistant"]
        feedback = sample.record.get("feedback")
        if not feedback:
            # Ground truth is the ideal response: condition it on the target, train on every turn.
            target = target_feedback(self.condition)
            conditions = [render_condition(target, self.condition, self._template(sample, k))
                          for k in range(len(assistant_at))]
            return conversation, self._dropped(sample, conditions), [True] * len(assistant_at)
        keep = min(len(assistant_at), self.turns.max_turns if self.turns.refinement else 1)
        train = [self._trains(feedback, k) for k in range(keep)]
        if not any(train):
            raise SkipRecord("no trainable turn")
        conditions = [render_condition(f, self.condition, self._template(sample, k))
                      for k, f in enumerate(feedback[:keep])]
        conversation = conversation[: assistant_at[keep - 1] + 1]
        if self.turns.refinement_target == "reference":
            conversation = [dict(turn) for turn in conversation]
            for k in range(1, keep):
                reference = reference_for_turn(sample.record["annotations"], conversation[: assistant_at[k]])
                if train[k] and reference is not None:
                    conversation[assistant_at[k]]["content"] = reference
                    conditions[k] = target_condition(self.condition)
        return conversation, self._dropped(sample, conditions), train

    def _template(self, sample: Sample, turn: int) -> int:
        """The ``TEMPLATES`` phrasing of a turn's condition: the canonical one, or one per (sample, turn) by hash."""
        if self.condition.templates == "fixed":
            return 0
        return zlib.crc32(f"template/{sample.record['id']}/{turn}".encode()) % len(TEMPLATES)

    def _dropped(self, sample: Sample, conditions: list[str | None]) -> list[str | None]:
        """Conditions with ``condition.dropout`` of them removed, each by a hash of (sample, turn).

        A hash, not an RNG: the choice is the same in every loader worker and run, so a resumed fit
        sees the same data.
        """
        if self.condition.dropout == 0:
            return conditions
        return [None if zlib.crc32(f"{sample.record['id']}/{k}".encode()) / 2**32 < self.condition.dropout else c
                for k, c in enumerate(conditions)]

    def _trains(self, feedback: list[dict | None], k: int) -> bool:
        if feedback[k] is None:  # the judge failed on this turn: no condition to learn from
            return False
        if k == 0 or self.turns.keep_refined == "all":
            return True
        score = mean_score(feedback[k])
        improved = feedback[k - 1] is not None and score > mean_score(feedback[k - 1])
        reached = self.turns.score_threshold is not None and score >= self.turns.score_threshold
        return improved or reached


class CRLDataModule(ShardDataModule):
    """Mixes NLF trajectories (``nlf_shards``) with SFT data (``train_shards``) for conditional RL.

    The stream is resampled (mixing needs it): set ``epoch_length``. Generation prompts
    (``predict``) are conditioned on the target condition unless ``predict_condition`` is given.
    """

    def __init__(
        self,
        nlf_shards: str | list[str] | None = None,
        nlf_rollout_config: str | None = None,
        sft_weight: float = 0.3,
        condition: ConditionSettings | None = None,
        turns: TurnSelection | None = None,
        epoch_length: int | None = 4096,
        **kwargs,
    ) -> None:
        """
        Args:
            nlf_shards: NLF shards (rollout output or converted ``LVLM_NLF``): trajectories with feedback.
            nlf_rollout_config: Deprecated and ignored: missing NLF shards are built by the stage graph
                (``dress_lightning.stages``) before training starts.
            sft_weight: Fraction of training samples drawn from ``train_shards`` (SFT data, target-conditioned).
            condition: How feedback is rendered as condition text (link it to the task's: ``${model.init_args.condition}``).
            turns: Which trajectory turns carry loss.
            epoch_length: Samples per epoch over all ranks (the mixed stream is resampled).
            **kwargs: Everything ``ShardDataModule`` takes (``train_shards`` holds the SFT data).
        """
        condition = condition or ConditionSettings()
        if kwargs.get("condition_placement") not in (None, condition.placement):
            raise ValueError(
                f"data.init_args.condition_placement={kwargs['condition_placement']!r} disagrees with the condition's "
                f"placement {condition.placement!r}: set model.init_args.condition.placement (the checkpoint records "
                "it, so evaluation and chat prompt the same way) and drop the data option."
            )
        kwargs["condition_placement"] = condition.placement
        super().__init__(resampled=True, epoch_length=epoch_length, **kwargs)  # jsonargparse reads **kwargs from here
        if not 0.0 <= sft_weight < 1.0:
            raise ValueError(f"sft_weight must be in [0, 1), got {sft_weight}.")
        if nlf_shards is None:
            raise ValueError("data.init_args.nlf_shards is required for conditional RL.")
        self.nlf_shards = nlf_shards
        if nlf_rollout_config is not None:
            log.warning("data.init_args.nlf_rollout_config is deprecated and ignored: the stage graph "
                        "(dress_lightning.stages) builds missing NLF shards before training starts.")
        self.sft_weight = sft_weight
        self.condition = condition
        self.model_config = with_condition_tokens(self.model_config, self.condition)
        self.turns = turns or TurnSelection()
        if self.predict_condition is None:
            self.predict_condition = target_condition(self.condition)

    def make_encoder(self, formatter: ConversationFormatter, image_transform: Callable) -> SampleEncoder:
        return ConditionedEncoder(formatter, image_transform, self.condition, self.turns)

    def train_sources(self) -> list[Source]:
        sources = [self._source(self.nlf_shards, "nlf_shards", self.encoder, 1.0 - self.sft_weight)]
        if self.train_shards is not None and self.sft_weight > 0:
            sources.append(self._source(self.train_shards, "train_shards", self.encoder, self.sft_weight))
        return sources
