"""Judged responses of NLF trajectories, grouped by prompt, and the DataModule of objectives that train on a
selection of them (rejection-sampling fine-tuning, DPO) instead of on every trajectory (conditional RL).

Such objectives compare the responses to one prompt, which a stream of single samples cannot do. So
``prepare_data`` reads the NLF shards once, groups the trajectories by prompt (the rollout's
``provenance.prompt_id``; a trajectory without one, e.g. converted ``LVLM_NLF``, is a group of its own),
lets the subclass derive its training samples (kept responses, preference pairs) and writes them as
shards, which then stream, resampled, through the same pipeline as every other data set. What the
selection leaves out is counted by reason, logged, and written to ``summary.json`` beside the shards.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dress_lightning.atomic import atomic_write_text
from dress_lightning.conditions import mean_score
from dress_lightning.conversation import ConversationFormatter
from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.data.encoders import SampleEncoder
from dress_lightning.data.pipeline import Source
from dress_lightning.data.schema import Sample, Turn
from dress_lightning.data.shards import existing_shards, expand_shard_urls, iter_samples, write_samples
from dress_lightning.data.skips import SkipLog

log = logging.getLogger(__name__)

FAILED_JUDGEMENT = "failed judgement"
"""Skip reason: a response whose critique failed (no score to rank it by); counted per response."""

NO_FEEDBACK = "no feedback"
"""Skip reason: a sample of the NLF shards without feedback (not a trajectory); counted per sample."""

DERIVED_PREFIX = "derived"
"""File prefix of the derived shards."""


@dataclass(frozen=True)
class JudgedResponse:
    """One assistant turn of an NLF trajectory with the mean score its critique gave (a fraction of the scale)."""

    trajectory: Sample
    turn: int
    """Index among the trajectory's assistant turns: 0 is the first response, later ones answer refinement NLF."""
    score: float

    @property
    def dialogue(self) -> list[Turn]:
        """The conversation up to and including this response (turns alternate, starting with the user)."""
        return self.trajectory.record["conversation"][: 2 * self.turn + 2]

    @property
    def text(self) -> str:
        """The response itself."""
        return self.dialogue[-1]["content"]

    @property
    def origin(self) -> dict[str, str | int | float]:
        """Where the response comes from, recorded in the samples derived from it."""
        return {"id": self.trajectory.record["id"], "turn": self.turn, "score": self.score}


def judged_turns(trajectory: Sample) -> list[JudgedResponse | None]:
    """Every assistant turn of ``trajectory`` with its score; None where the judge failed (the feedback is null)."""
    return [None if feedback is None else JudgedResponse(trajectory, turn, mean_score(feedback))
            for turn, feedback in enumerate(trajectory.record["feedback"])]


def prompt_id(trajectory: Sample) -> str:
    """The prompt a trajectory answers: the rollout's ``provenance.prompt_id``, else the trajectory's own id."""
    return trajectory.record.get("provenance", {}).get("prompt_id", trajectory.record["id"])


def group_by_prompt(trajectories: Iterable[Sample]) -> dict[str, list[Sample]]:
    """Trajectories by prompt, sorted by prompt id and then trajectory id (the same whatever the shard order)."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for trajectory in trajectories:
        groups[prompt_id(trajectory)].append(trajectory)
    return {prompt: sorted(group, key=lambda t: t.record["id"]) for prompt, group in sorted(groups.items())}


def derived_record(response: JudgedResponse, conversation: list[Turn], **fields) -> dict:
    """The record of a sample derived from ``response``'s trajectory: its image and annotations, a new dialogue.

    The trajectory's feedback is dropped (it described the whole trajectory); ``fields`` say what was derived.
    """
    record = {key: value for key, value in response.trajectory.record.items() if key != "feedback"}
    annotations = dict(record["annotations"])
    if "queries" in annotations:  # one entry per user turn at most
        annotations["queries"] = annotations["queries"][: sum(turn["role"] == "user" for turn in conversation)]
    return {**record, "annotations": annotations, "conversation": conversation, **fields}


@dataclass
class SelectionReport:
    """What a selection derived (by kind) and left out (by reason; each reason says what it counts)."""

    kept: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        """One line for the log: ``12 (first response: 9, refined response: 3); skipped: tie 4``."""
        kept = ", ".join(f"{kind}: {count}" for kind, count in self.kept.most_common())
        skipped = ", ".join(f"{reason} {count}" for reason, count in self.skipped.most_common()) or "none"
        return f"{sum(self.kept.values())} ({kept or 'none'}); skipped: {skipped}"


class JudgedDataModule(ShardDataModule):
    """Trains on samples derived from judged NLF trajectories (``nlf_shards``); subclasses say which (``derive``).

    ``prepare_data`` writes the derived samples into ``derived_dir`` on every fit (the selection options
    may have changed); the training stream is resampled from there, so set ``epoch_length``.
    """

    derived_name = "derived_data"
    """Directory of the derived shards under ``trainer.default_root_dir`` when ``derived_dir`` is not set."""

    def __init__(
        self,
        nlf_shards: str | list[str] | None = None,
        derived_dir: str | None = None,
        derived_shard_size: int = 256,
        epoch_length: int | None = 4096,
        **kwargs,
    ) -> None:
        """
        Args:
            nlf_shards: NLF shards (rollout output or converted ``LVLM_NLF``): trajectories with per-turn feedback.
            derived_dir: Where the derived shards and ``summary.json`` are written (None: a directory in the
                Trainer's ``default_root_dir``).
            derived_shard_size: Samples per derived shard.
            epoch_length: Samples per epoch over all ranks (the stream is resampled).
            **kwargs: Everything ``ShardDataModule`` takes (``val_shards`` validate with the plain LM loss).
        """
        super().__init__(resampled=True, epoch_length=epoch_length, **kwargs)
        if nlf_shards is None:
            raise ValueError(f"data.init_args.nlf_shards is required for {type(self).__name__}: point it at the "
                             "rollout's output directory (feedback rollout --out).")
        self.nlf_shards = nlf_shards
        self.derived_dir = derived_dir
        self.derived_shard_size = derived_shard_size
        self.report: SelectionReport | None = None
        """What ``prepare_data`` derived and left out (on the process that ran it)."""

    def derive(self, groups: dict[str, list[Sample]]) -> tuple[list[Sample], SelectionReport]:
        """The training samples derived from the trajectories of each prompt, and what was left out."""
        raise NotImplementedError

    def make_derived_encoder(self, formatter: ConversationFormatter, image_transform: Callable) -> SampleEncoder:
        """The encoder of the derived samples (``self.encoder``, the plain one, encodes validation data)."""
        raise NotImplementedError

    @property
    def derived_path(self) -> Path:
        """The directory of the derived shards."""
        if self.derived_dir is not None:
            return Path(self.derived_dir)
        if self.trainer is None:
            raise ValueError("data.init_args.derived_dir is not set and no Trainer gives a default_root_dir to "
                             "write the derived shards into: set derived_dir.")
        return Path(self.trainer.default_root_dir) / self.derived_name

    def prepare_data(self) -> None:
        super().prepare_data()
        shards = [self.nlf_shards] if isinstance(self.nlf_shards, str) else self.nlf_shards
        unread = SkipLog()
        samples = list(iter_samples(expand_shard_urls(shards), unread))
        trajectories = [s for s in samples if s.record.get("feedback")]
        if not trajectories:
            raise FileNotFoundError(
                f"data.init_args.nlf_shards={self.nlf_shards!r} holds no trajectory with feedback (unreadable: "
                f"{unread.counts() or 'none'}): point it at the rollout's output (feedback rollout --out).")
        groups = group_by_prompt(trajectories)
        derived, report = self.derive(groups)
        if len(samples) > len(trajectories):
            report.skipped[NO_FEEDBACK] += len(samples) - len(trajectories)
        if not derived:
            raise ValueError(f"{type(self).__name__} derived no training sample from {len(trajectories)} trajectories "
                             f"in {self.nlf_shards}: {report.describe()}. Loosen the selection options.")
        out = self.derived_path
        for stale in existing_shards(out, DERIVED_PREFIX):  # an earlier fit's, perhaps more of them
            stale.unlink()
        written = write_samples(((s.record["id"], s) for s in derived), lambda s: s, out, DERIVED_PREFIX,
                                shard_size=self.derived_shard_size, tool=type(self).__name__)
        report.skipped.update(written.skips.counts())
        self.report = report
        summary = {"nlf_shards": self.nlf_shards, "trajectories": len(trajectories), "prompts": len(groups),
                   "written": written.written, "kept": dict(report.kept), "skipped": dict(report.skipped),
                   "unreadable": unread.counts()}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        log.info("%s: %d trajectories of %d prompts -> %s; written to %s.", type(self).__name__, len(trajectories),
                 len(groups), report.describe(), out)

    def derived_source(self, weight: float = 1.0) -> Source:
        """The derived shards as a source of the training stream."""
        encoder = self.make_derived_encoder(self.encoder.formatter, self.encoder.image_transform)
        return self._source(str(self.derived_path), "derived_dir", encoder, weight)

    def train_sources(self) -> list[Source]:
        return [self.derived_source()]
