"""Rollouts with NLF: sample responses, judge them, refine over turns, write NLF shards.

Generation runs inside Lightning's predict loop (``RolloutModule.predict_step``), so the Trainer's
strategy and device settings spread it over GPUs and nodes; each rank writes its own shards
(``NLFShardWriter``). Per prompt, ``num_samples`` first responses are drawn; each starts a
trajectory: critique -> refinement (a user turn) -> the model answers it -> critique again, for up
to ``refinement_turns`` turns or until every aspect reaches the top score.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from lightning.pytorch.callbacks import BasePredictionWriter

from dress_lightning.aspects import ASPECTS
from dress_lightning.atomic import PARTIAL_SUFFIX, atomic_write_text, commit, crash_point, partial_path
from dress_lightning.conditions import condition_for
from dress_lightning.conversation import FORMAT_VERSION, ConversationFormatter, PromptTooLongError
from dress_lightning.data.encoders import left_pad
from dress_lightning.data.schema import Sample, Turn, encode_sample, validate_sample
from dress_lightning.data.shards import SHARD_MTIME, SHARD_SUFFIX, iter_samples
from dress_lightning.data.skips import SkipLog
from dress_lightning.feedback.judges import Critique, Judge, JudgeFailure, to_feedback
from dress_lightning.decoding import GenerationSettings
from dress_lightning.tasks.base import VisionLanguageTask
from dress_lightning.version import __version__

log = logging.getLogger(__name__)

ROLLOUT_SOURCE = "rollout"


@dataclass
class Trajectory:
    """One sampled answer and its refinements, with per-turn feedback."""

    sample: Sample
    index: int
    conversation: list[dict[str, str]]
    feedback: list[dict[str, Any] | None] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def last_critique_perfect(self) -> bool:
        last = self.feedback[-1] if self.feedback else None
        return bool(last) and all(last["scores"].get(a) == last["score_max"] for a in ASPECTS)


class RolloutModule(L.LightningModule):
    """Wraps a trained policy for ``Trainer.predict``: each step turns a prompt batch into trajectories."""

    def __init__(
        self,
        policy: VisionLanguageTask,
        judge: Judge,
        formatter: ConversationFormatter,
        generation: GenerationSettings,
        refinement_turns: int = 2,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.judge = judge
        self.formatter = formatter
        self.generation = generation
        self.refinement_turns = refinement_turns
        self.condition = policy.generation_condition()
        """Condition of refinement answers (the first answers' comes with the prompt batch): the policy's own."""
        self.negative_condition = condition_for(generation.negative_condition, None, getattr(policy, "condition", None))
        """The condition of classifier-free guidance's second pass (used when ``generation.guidance_scale`` != 1)."""
        self.stats: Counter = Counter()

    def _judge(self, trajectories: Sequence[Trajectory]) -> None:
        """Critique the last response of each trajectory (concurrently) and append the feedback."""
        items = [(t.sample.record["annotations"], t.conversation[:-1], t.conversation[-1]["content"])
                 for t in trajectories]
        for trajectory, result in zip(trajectories, self.judge.critique_many(items)):
            if isinstance(result, JudgeFailure):
                # Recorded as a failure: the turn carries no feedback rather than an invented score.
                trajectory.feedback.append(None)
                trajectory.failures.append(result.reason)
                self.stats["judge failures"] += 1
            else:
                trajectory.feedback.append(to_feedback(result, self.judge))
            crash_point("rollout.judging")

    def _refine(self, trajectories: Sequence[Trajectory]) -> tuple[list[Trajectory], list[list[int]]]:
        """Attach refinement NLF to each imperfect trajectory (concurrently); return those that continue and
        the prompts the policy answers them with."""
        imperfect = [t for t in trajectories if t.feedback[-1] is not None and not t.last_critique_perfect]
        items = [
            (t.sample.record["annotations"], t.conversation[:-1], t.conversation[-1]["content"],
             Critique(scores=t.feedback[-1]["scores"], text=t.feedback[-1]["critique"]))
            for t in imperfect
        ]
        active, prompts = [], []
        for trajectory, result in zip(imperfect, self.judge.refine_many(items)):
            if isinstance(result, JudgeFailure):
                trajectory.failures.append(result.reason)
                self.stats["judge failures"] += 1
                continue
            try:  # the policy answers next under its own condition: that prompt must fit max_length
                prompt = self.formatter.encode_prompt([*trajectory.conversation, {"role": "user", "content": result}],
                                                      self.condition)
            except PromptTooLongError:
                # The trajectory ends at its last judged answer, as one whose feedback was perfect does.
                self.stats["ended at max_length"] += 1
                continue
            trajectory.feedback[-1]["refinement"] = result
            trajectory.conversation.append({"role": "user", "content": result})
            active.append(trajectory)
            prompts.append(prompt)
        return active, prompts

    def _answer(self, trajectories: Sequence[Trajectory], prompts: Sequence[list[int]],
                pixel_values: dict[str, torch.Tensor]) -> None:
        """Let the policy answer each trajectory's latest user turn from its ``prompts`` (one batched generation)."""
        input_ids, attention_mask = left_pad(prompts, self.formatter.tokenizer.pad_token_id)
        batch = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "pixel_values": torch.stack([pixel_values[t.sample.record["id"]] for t in trajectories]),
            "ids": [t.sample.record["id"] for t in trajectories],
            "stop_token_ids": self.formatter.stop_token_ids,
        }
        self._add_negative_prompts(batch, [t.conversation for t in trajectories])
        one_each = GenerationSettings(**{**asdict(self.generation), "num_samples": 1})
        for trajectory, (response,) in zip(trajectories, self.policy.generate(batch, one_each)):
            trajectory.conversation.append({"role": "assistant", "content": response})

    def _add_negative_prompts(self, batch: dict[str, Any], conversations: Sequence[Sequence[Turn]]) -> None:
        """With guidance on, the batch's prompts again under the negative condition (classifier-free guidance)."""
        if self.generation.guidance_scale == 1.0:
            return
        prompts = [self.formatter.encode_prompt(c, self.negative_condition) for c in conversations]
        ids, mask = left_pad(prompts, self.formatter.tokenizer.pad_token_id)
        batch["negative_input_ids"], batch["negative_attention_mask"] = ids.to(self.device), mask.to(self.device)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[Trajectory]:
        self._add_negative_prompts(batch, [s["record"]["conversation"][:1] for s in batch["samples"]])
        trajectories = []
        for fields, responses in zip(batch["samples"], self.policy.generate(batch, self.generation)):
            sample = Sample(**fields)
            question = sample.record["conversation"][0]
            for index, response in enumerate(responses):
                conversation = [dict(question), {"role": "assistant", "content": response}]
                trajectories.append(Trajectory(sample, index, conversation))
        crash_point("rollout.generated")
        pixel_values = dict(zip(batch["ids"], batch["pixel_values"]))
        self._judge(trajectories)
        active = trajectories
        for _ in range(self.refinement_turns):
            active, prompts = self._refine(active)
            if not active:
                break
            self._answer(active, prompts, pixel_values)
            crash_point("rollout.refinement_answered")
            self._judge(active)
        self.stats["trajectories"] += len(trajectories)
        return trajectories


class NLFShardWriter(BasePredictionWriter):
    """Writes each rank's trajectories to its own shards, with per-turn feedback and provenance.

    Crash safety: a shard is written under a ``.partial`` name and renamed when it is closed, so a
    ``.tar`` on disk is always complete; a shard is closed at the end of the first batch that fills
    it to ``shard_size`` (a prompt's samples never straddle two shards), so a crash loses at most
    the shard being filled, and the rerun generates those prompts again. Trajectories an earlier run
    already wrote (``done_ids``) are not written twice.
    """

    def __init__(self, out_dir: Path, provenance: dict[str, Any], shard_size: int = 500,
                 done_ids: frozenset[str] = frozenset()) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.provenance = provenance
        self.shard_size = shard_size
        self.done_ids = done_ids
        self.written = 0
        self.shards: list[Path] = []
        self._run: int | None = None
        self._shard: wds.TarWriter | None = None
        self._shard_path: Path | None = None
        self._in_shard = 0

    def _open_shard(self, rank: int) -> wds.TarWriter:
        if self._run is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for unfinished in self.out_dir.glob(f"rollout-rank{rank}-run*{SHARD_SUFFIX}{PARTIAL_SUFFIX}"):
                unfinished.unlink()  # a crashed run's shard in progress: its prompts are generated again
            self._run = next_run_number(self.out_dir, rank)
        self._shard_path = self.out_dir / f"rollout-rank{rank}-run{self._run}-{len(self.shards):06d}{SHARD_SUFFIX}"
        self._shard = wds.TarWriter(str(partial_path(self._shard_path)), encoder=False, mtime=SHARD_MTIME)
        return self._shard

    def _close_shard(self) -> None:
        self._shard.close()
        crash_point("rollout.shard_closed")
        commit(partial_path(self._shard_path), self._shard_path)
        self.shards.append(self._shard_path)
        self._shard, self._shard_path, self._in_shard = None, None, 0

    def to_sample(self, trajectory: Trajectory) -> Sample:
        """The trajectory as a schema sample: the source record with the new dialogue and feedback."""
        source = trajectory.sample.record
        annotations = dict(source["annotations"])
        if "queries" in annotations:
            # The trajectory answers the first question only; later user turns are refinement NLF.
            annotations["queries"] = annotations["queries"][:1]
        record = {
            **source,
            "annotations": annotations,
            "id": trajectory_id(source["id"], trajectory.index),
            "source": ROLLOUT_SOURCE,
            "conversation": trajectory.conversation,
            "feedback": trajectory.feedback,
            "provenance": {**self.provenance, "prompt_id": source["id"], "prompt_source": source["source"],
                           "sample_index": trajectory.index, "judge_failures": trajectory.failures},
        }
        validate_sample(record)
        return Sample(record=record, image=trajectory.sample.image, image_ext=trajectory.sample.image_ext)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for trajectory in prediction:
            sample = self.to_sample(trajectory)
            if sample.record["id"] in self.done_ids:
                continue
            shard = self._shard or self._open_shard(trainer.global_rank)
            shard.write(encode_sample(sample))
            self._in_shard += 1
            self.written += 1
            crash_point("rollout.shard_write")
        if self._shard is not None and self._in_shard >= self.shard_size:
            self._close_shard()

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._shard is not None:
            self._close_shard()


def trajectory_id(prompt_id: str, index: int) -> str:
    """The sample id of a prompt's ``index``-th trajectory."""
    return f"{prompt_id}-r{index}"


_SHARD_NAME = re.compile(r"rollout-rank(?P<rank>\d+)-run(?P<run>\d+)-\d+")


def next_run_number(out_dir: Path, rank: int) -> int:
    """A run number no finished shard of this rank uses yet (shards of several runs share a directory)."""
    runs = [int(m["run"]) for p in out_dir.glob(f"rollout-rank{rank}-run*{SHARD_SUFFIX}")
            if (m := _SHARD_NAME.match(p.name))]
    return max(runs, default=-1) + 1


def rollout_shards(out_dir: Path, rank: int | None = None) -> list[str]:
    """The finished rollout shards in ``out_dir`` (of one rank, or of all)."""
    pattern = f"rollout-rank{'*' if rank is None else rank}-run*-*{SHARD_SUFFIX}"
    return sorted(str(p) for p in Path(out_dir).glob(pattern))


@dataclass
class RolloutProgress:
    """What earlier runs left in an output directory, read back from the shards themselves."""

    trajectory_ids: set[str]
    """Ids of every trajectory on disk."""
    complete_prompts: set[str]
    """Prompts with all ``num_samples`` trajectories on disk: done."""
    incomplete_prompts: set[str]
    """Prompts with some trajectories missing (a damaged shard): generated again, present ones kept."""
    skips: dict[str, int]
    """Unreadable shards and invalid samples found, by reason."""


def read_progress(out_dir: Path, num_samples: int) -> RolloutProgress:
    """Which prompts are done: a prompt counts only when every one of its ``num_samples`` trajectories is on disk."""
    skips = SkipLog()
    indices: dict[str, set[int]] = defaultdict(set)
    ids = set()
    for sample in iter_samples(rollout_shards(out_dir), skips):
        provenance = sample.record["provenance"]
        indices[provenance["prompt_id"]].add(provenance["sample_index"])
        ids.add(sample.record["id"])
    complete = {prompt for prompt, found in indices.items() if found >= set(range(num_samples))}
    return RolloutProgress(ids, complete, set(indices) - complete, skips.counts())


def rollout_provenance(checkpoint: str, generation: GenerationSettings, judge: Judge, seed: int,
                       refinement_turns: int) -> dict[str, Any]:
    """What produced a rollout: recorded in every sample it writes."""
    return {
        "tool": "dress-lightning feedback rollout",
        "dress_lightning_version": __version__,
        "checkpoint": checkpoint,
        "generation": asdict(generation),
        "seed": seed,
        "refinement_turns": refinement_turns,
        "judge": {"name": judge.name, "version": judge.version},
        "conversation_format": FORMAT_VERSION,
    }


def summarize(out_dir: Path, rank: int, world_size: int, this_run: dict[str, Any]) -> dict[str, Any]:
    """Counts over every trajectory on disk (all runs), plus ``this_run`` appended to the earlier runs' records.

    The totals are read from the shards, not added up from run records, so a run killed before it
    wrote its summary is still counted exactly; its judge calls are the only thing lost (they are
    in the judge cache).
    """
    skips = SkipLog()
    shards = rollout_shards(out_dir, None if world_size == 1 else rank)
    prompts, trajectories, failures = set(), 0, 0
    scores: dict[tuple[int, str], list[float]] = defaultdict(list)
    """(assistant turn, aspect) -> scores as fractions of the scale."""
    for sample in iter_samples(shards, skips):
        trajectories += 1
        prompts.add(sample.record["provenance"]["prompt_id"])
        failures += len(sample.record["provenance"]["judge_failures"])
        for turn, feedback in enumerate(sample.record["feedback"]):
            for aspect, score in (feedback or {}).get("scores", {}).items():
                scores[(turn, aspect)].append(score / feedback["score_max"])
    turns = sorted({t for t, _ in scores})
    path = summary_path(out_dir, rank, world_size)
    return {
        "samples": trajectories,
        "prompts": len(prompts),
        "shards": len(shards),
        # Later turns exist only for trajectories that still needed refining: compare means with that in mind.
        "judged_responses_per_turn": {
            f"turn{turn}": max(len(v) for (t, _), v in scores.items() if t == turn) for turn in turns
        },
        "judge_failures": failures,
        "mean_score_fraction": {
            f"turn{turn}": {aspect: sum(v) / len(v) for (t, aspect), v in sorted(scores.items()) if t == turn}
            for turn in turns
        },
        "unreadable": skips.counts(),
        "runs": [*_earlier_runs(path), this_run],
        "shards_dir": str(out_dir),
    }


def run_record(writer: NLFShardWriter, module: RolloutModule, judge: Judge, skipped_prompts: dict[str, int]) -> dict:
    """What one run did: trajectories generated and written, judge calls and failures, prompts skipped."""
    return {
        "samples_written": writer.written,
        "trajectories": module.stats["trajectories"],
        "judge": {"name": judge.name, "version": judge.version, **judge.stats()},
        "judge_failures": module.stats["judge failures"],
        "ended_at_max_length": module.stats["ended at max_length"],
        "skipped_prompts": skipped_prompts,
    }


def summary_path(out_dir: Path, rank: int = 0, world_size: int = 1) -> Path:
    """``summary.json`` next to the shards (``summary-rank{R}.json`` per rank when several wrote)."""
    return Path(out_dir) / ("summary.json" if world_size == 1 else f"summary-rank{rank}.json")


def _earlier_runs(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("runs", []))
    except (ValueError, AttributeError, TypeError):
        log.warning("%s is unreadable; earlier runs' records are dropped (the counts come from the shards).", path)
        return []


def write_summary(summary: dict[str, Any], out_dir: Path, rank: int = 0, world_size: int = 1) -> Path:
    """Write the summary atomically (a crash leaves the previous one)."""
    path = summary_path(out_dir, rank, world_size)
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return path
