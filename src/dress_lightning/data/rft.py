"""Rejection-sampling fine-tuning data (ReST / RAFT / best-of-n SFT): the best judged responses of each prompt.

A baseline to conditional RL on the same NLF: instead of conditioning every response on its feedback,
keep the responses the judge scored best (``top_k`` per prompt and / or a ``min_score``) and train on
them with the plain LM loss, unconditioned, mixed with SFT data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from dress_lightning.conversation import ConversationFormatter
from dress_lightning.data.encoders import SampleEncoder
from dress_lightning.data.pipeline import Source
from dress_lightning.data.judged import (
    FAILED_JUDGEMENT,
    JudgedDataModule,
    JudgedResponse,
    SelectionReport,
    derived_record,
    judged_turns,
)
from dress_lightning.data.schema import Sample

BELOW_MIN_SCORE = "below min_score"
"""Skip reason: a judged response scored under ``min_score``; counted per response."""
BEYOND_TOP_K = "beyond top_k"
"""Skip reason: a judged response ranked after the prompt's ``top_k`` best; counted per response."""


@dataclass
class ResponseSelection:
    """Which judged responses of each prompt rejection-sampling fine-tuning keeps."""

    top_k: int | None = 1
    """Keep the k best-scored responses of each prompt (ties: the earlier trajectory and turn first); None: all."""
    min_score: float | None = None
    """Keep only responses whose mean score, as a fraction of the scale (0-1), reaches this; None: no threshold."""
    turns: Literal["first", "all"] = "first"
    """``first``: first responses only; ``all``: refined responses too, each trained in its dialogue."""

    def __post_init__(self) -> None:
        if self.top_k is None and self.min_score is None:
            raise ValueError("data.init_args.selection keeps every response with top_k and min_score both null: "
                             "set top_k (e.g. 1, best-of-n) and / or min_score (e.g. 0.8).")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"data.init_args.selection.top_k must be at least 1 (or null), got {self.top_k}.")
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"data.init_args.selection.min_score is a fraction of the score scale in [0, 1], "
                             f"got {self.min_score}.")


def select_responses(
    groups: dict[str, list[Sample]], selection: ResponseSelection
) -> tuple[list[Sample], SelectionReport]:
    """The kept responses of each prompt's trajectories, each as a sample ending with it.

    Failed judgements are skipped and counted; the rest are ranked by score within their prompt.
    """
    report, kept = SelectionReport(), []
    for trajectories in groups.values():
        candidates: list[JudgedResponse] = []
        for trajectory in trajectories:
            turns = judged_turns(trajectory)[: 1 if selection.turns == "first" else None]
            report.skipped[FAILED_JUDGEMENT] += turns.count(None)
            candidates += [response for response in turns if response is not None]
        ranked = sorted(candidates, key=lambda response: -response.score)  # stable: ties keep trajectory order
        kept_here = 0
        for response in ranked:
            if selection.min_score is not None and response.score < selection.min_score:
                report.skipped[BELOW_MIN_SCORE] += 1
            elif selection.top_k is not None and kept_here >= selection.top_k:
                report.skipped[BEYOND_TOP_K] += 1
            else:
                kept_here += 1
                report.kept["first response" if response.turn == 0 else "refined response"] += 1
                kept.append(selected_sample(response))
    report.skipped = +report.skipped  # drop reasons that never occurred
    return kept, report


def selected_sample(response: JudgedResponse) -> Sample:
    """The trajectory up to ``response``, as a sample of its own (``selected`` records where it comes from)."""
    trajectory = response.trajectory
    record = derived_record(response, response.dialogue, id=f"{trajectory.record['id']}-t{response.turn}",
                            selected=response.origin)
    return Sample(record=record, image=trajectory.image, image_ext=trajectory.image_ext)


class LastResponseEncoder(SampleEncoder):
    """Trains on the last response of a conversation only, unconditioned; earlier turns are context."""

    def select(self, sample: Sample) -> tuple[list[dict], None, list[bool]]:
        conversation = sample.record["conversation"]
        responses = sum(turn["role"] == "assistant" for turn in conversation)
        return conversation, None, [False] * (responses - 1) + [True]


class RFTDataModule(JudgedDataModule):
    """Rejection-sampling fine-tuning: the kept responses of ``nlf_shards`` mixed with SFT data (``train_shards``).

    Everything is unconditioned (plain SFT format); generation prompts too.
    """

    derived_name = "rft_data"

    def __init__(self, selection: ResponseSelection | None = None, sft_weight: float = 0.3, **kwargs) -> None:
        """
        Args:
            selection: Which judged responses are kept per prompt.
            sft_weight: Fraction of training samples drawn from ``train_shards`` (SFT data).
            **kwargs: Everything ``JudgedDataModule`` takes.
        """
        super().__init__(**kwargs)
        if not 0.0 <= sft_weight < 1.0:
            raise ValueError(f"data.init_args.sft_weight must be in [0, 1), got {sft_weight}.")
        self.selection = selection or ResponseSelection()
        self.sft_weight = sft_weight

    def derive(self, groups: dict[str, list[Sample]]) -> tuple[list[Sample], SelectionReport]:
        return select_responses(groups, self.selection)

    def make_derived_encoder(self, formatter: ConversationFormatter, image_transform: Callable) -> SampleEncoder:
        return LastResponseEncoder(formatter, image_transform)

    def train_sources(self) -> list[Source]:
        sources = [self.derived_source(1.0 - self.sft_weight)]
        if self.train_shards is not None and self.sft_weight > 0:
            sources.append(self._source(self.train_shards, "train_shards", self.encoder, self.sft_weight))
        return sources
