"""Preference pairs for DPO from judged NLF trajectories: the better-scored answer to a question over the worse.

Pairs come from two places:

* the first responses of different trajectories of the same prompt (rollout ``num_samples`` > 1);
* consecutive turns of one trajectory (a response and its refinement): the better-scored one over the
  other, both as answers to the first question.

A pair needs mean scores at least ``margin`` apart; closer ones are ties. Failed judgements, prompts
with a single judged response and ties are skipped and counted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dress_lightning.conversation import ConversationFormatError, ConversationFormatter
from dress_lightning.data.encoders import SampleEncoder, collate
from dress_lightning.data.judged import (
    FAILED_JUDGEMENT,
    JudgedDataModule,
    JudgedResponse,
    SelectionReport,
    derived_record,
    judged_turns,
)
from dress_lightning.data.schema import Sample
from dress_lightning.data.shards import expand_shard_urls, iter_samples
from dress_lightning.data.skips import SkipLog, SkipRecord

PREFERENCE_KEY = "preference"
"""Record field of a pair sample: ``kind``, ``chosen`` (origin) and ``rejected`` (origin + ``content``)."""

SINGLE_RESPONSE = "single response"
"""Skip reason: a prompt with fewer than two judged first responses (no sample pair); counted per prompt."""
TIE = "tie"
"""Skip reason: two responses whose scores differ by less than ``margin``; counted per candidate pair."""
IDENTICAL = "identical responses"
"""Skip reason: two responses with the same text (scored apart by a noisy judge); counted per candidate pair."""

_SCORE_TOLERANCE = 1e-9
"""Score fractions are inexact in floating point (0.7 - 0.6 < 0.1): a difference this close to the margin meets it."""


@dataclass
class PairSelection:
    """Which judged responses become preference pairs."""

    margin: float = 0.1
    """Smallest difference of mean scores (a fraction of the scale, 0-1) between chosen and rejected; above 0."""
    refinement_pairs: bool = True
    """Also pair consecutive turns of a trajectory (a response and its refinement)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.margin <= 1.0:
            raise ValueError(f"data.init_args.pairs.margin is a score difference in (0, 1], got {self.margin}: "
                             "equal scores never make a pair.")


def preference_pairs(groups: dict[str, list[Sample]], selection: PairSelection) -> tuple[list[Sample], SelectionReport]:
    """The preference pairs of each prompt's trajectories, as samples (see the module docstring)."""
    report, pairs = SelectionReport(), []

    def pair(a: JudgedResponse, b: JudgedResponse, kind: str) -> None:
        chosen, rejected = (a, b) if a.score >= b.score else (b, a)
        if chosen.score - rejected.score < selection.margin - _SCORE_TOLERANCE:
            report.skipped[TIE] += 1
        elif chosen.text.strip() == rejected.text.strip():
            report.skipped[IDENTICAL] += 1
        else:
            report.kept[kind] += 1
            pairs.append(pair_sample(chosen, rejected, kind))

    for trajectories in groups.values():
        turns = [judged_turns(trajectory) for trajectory in trajectories]
        report.skipped[FAILED_JUDGEMENT] += sum(t[0] is None for t in turns)
        first = [t[0] for t in turns if t[0] is not None]
        if len(first) < 2:
            report.skipped[SINGLE_RESPONSE] += 1
        for a, b in itertools.combinations(first, 2):
            pair(a, b, "samples")
        if selection.refinement_pairs:
            for trajectory_turns in turns:
                report.skipped[FAILED_JUDGEMENT] += trajectory_turns[1:].count(None)
                for a, b in zip(trajectory_turns, trajectory_turns[1:]):
                    if a is not None and b is not None:
                        pair(a, b, "refinement")
    report.skipped = +report.skipped  # drop reasons that never occurred
    return pairs, report


def pair_sample(chosen: JudgedResponse, rejected: JudgedResponse, kind: str) -> Sample:
    """A pair as a sample: the first question answered by ``chosen``; ``preference`` holds the rejected answer."""
    question = chosen.trajectory.record["conversation"][0]
    sample_id = (f"{chosen.trajectory.record['id']}-t{chosen.turn}-over-"
                 f"{rejected.trajectory.record['id']}-t{rejected.turn}")
    preference = {"kind": kind, "chosen": chosen.origin, "rejected": {**rejected.origin, "content": rejected.text}}
    record = derived_record(chosen, [question, {"role": "assistant", "content": chosen.text}], id=sample_id,
                            **{PREFERENCE_KEY: preference})
    return Sample(record=record, image=chosen.trajectory.image, image_ext=chosen.trajectory.image_ext)


class PairEncoder(SampleEncoder):
    """A pair sample -> its chosen and rejected answers to the same prompt, each labelled on the answer only."""

    packable = False  # the loss compares row i (chosen) with row B + i (rejected)

    def __call__(self, sample: Sample) -> dict[str, Any]:
        chosen = super().__call__(sample)
        conversation = sample.record["conversation"]
        answer = {"role": "assistant", "content": sample.record[PREFERENCE_KEY]["rejected"]["content"]}
        rejected = self.formatter.encode([*conversation[:-1], answer])
        return {**chosen, "rejected_input_ids": torch.tensor(rejected.input_ids),
                "rejected_labels": torch.tensor(rejected.labels),
                "num_truncated": chosen["num_truncated"] + rejected.num_truncated}

    def collate(self, examples: Sequence[dict[str, Any]], pad_to_multiple_of: int = 1) -> dict[str, Any]:
        """Chosen rows first, then the rejected rows in the same order: one batch of 2B rows, one forward.

        ``ids`` (2B) repeat the pair ids; ``pixel_values`` (2B, 3, H, W) the images.
        """
        rejected = [{**e, "input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"], "num_truncated": 0}
                    for e in examples]
        return collate([*examples, *rejected], self.formatter.tokenizer.pad_token_id, pad_to_multiple_of)


class DPODataModule(JudgedDataModule):
    """Preference pairs from ``nlf_shards`` for DPO; ``val_shards`` (SFT data) validate with the plain LM loss."""

    derived_name = "dpo_pairs"

    def __init__(self, pairs: PairSelection | None = None, **kwargs) -> None:
        """
        Args:
            pairs: Which judged responses become preference pairs.
            **kwargs: Everything ``JudgedDataModule`` takes.
        """
        super().__init__(**kwargs)
        self.pairs = pairs or PairSelection()

    def derive(self, groups: dict[str, list[Sample]]) -> tuple[list[Sample], SelectionReport]:
        return preference_pairs(groups, self.pairs)

    def make_derived_encoder(self, formatter: ConversationFormatter, image_transform: Callable) -> SampleEncoder:
        return PairEncoder(formatter, image_transform)

    def pair_batches(self) -> Iterator[dict[str, Any]]:
        """Every pair once, in shard order, in batches of ``batch_size`` pairs (for reference log-probabilities).

        Read in this process and whole on every rank (a resampled stream may draw any pair on any rank);
        pairs the training stream refuses (too long, malformed) are left out here too.
        """
        if self.encoder is None:
            self.setup()
        encoder = self.make_derived_encoder(self.encoder.formatter, self.encoder.image_transform)
        examples = []
        for sample in iter_samples(expand_shard_urls([str(self.derived_path)]), SkipLog()):
            try:
                examples.append(encoder(sample))
            except (ConversationFormatError, SkipRecord):
                continue
            if len(examples) == self.batch_size:
                yield encoder.collate(examples, self.pad_to_multiple_of)
                examples = []
        if examples:
            yield encoder.collate(examples, self.pad_to_multiple_of)
