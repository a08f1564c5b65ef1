"""Rollouts with NLF: sample responses, judge them, refine over turns, write NLF shards.

Generation runs inside Lightning's predict loop (``RolloutModule.predict_step``), so the Trainer's
strategy and device settings spread it over GPUs and nodes; each rank writes its own shards
(``NLFShardWriter``). Per prompt, ``num_samples`` first responses are drawn; each starts a
trajectory: critique -> refinement (a user turn) -> the model answers it -> critique again, for up
to ``refinement_turns`` turns or until every aspect reaches the top score.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from lightning.pytorch.callbacks import BasePredictionWriter

from dress_lightning import __version__
from dress_lightning.conversation import FORMAT_VERSION, ConversationFormatter
from dress_lightning.data.datamodule import left_pad
from dress_lightning.data.schema import ASPECTS, Sample, encode_sample, validate_sample
from dress_lightning.data.shards import SHARD_MTIME
from dress_lightning.feedback.judges import Critique, Judge, JudgeFailure, to_feedback
from dress_lightning.tasks.base import GenerationSettings, VisionLanguageTask

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

    def _refine(self, trajectories: Sequence[Trajectory]) -> list[Trajectory]:
        """Attach refinement NLF to each imperfect trajectory (concurrently); return those that continue."""
        imperfect = [t for t in trajectories if t.feedback[-1] is not None and not t.last_critique_perfect]
        items = [
            (t.sample.record["annotations"], t.conversation[:-1], t.conversation[-1]["content"],
             Critique(scores=t.feedback[-1]["scores"], text=t.feedback[-1]["critique"]))
            for t in imperfect
        ]
        active = []
        for trajectory, result in zip(imperfect, self.judge.refine_many(items)):
            if isinstance(result, JudgeFailure):
                trajectory.failures.append(result.reason)
                self.stats["judge failures"] += 1
                continue
            trajectory.feedback[-1]["refinement"] = result
            trajectory.conversation.append({"role": "user", "content": result})
            active.append(trajectory)
        return active

    def _answer(self, trajectories: Sequence[Trajectory], pixel_values: dict[str, torch.Tensor]) -> None:
        """Let the policy answer each trajectory's latest user turn (one batched generation)."""
        prompts = [self.formatter.encode_prompt(t.conversation, self.condition) for t in trajectories]
        input_ids, attention_mask = left_pad(prompts, self.formatter.tokenizer.pad_token_id)
        batch = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "pixel_values": torch.stack([pixel_values[t.sample.record["id"]] for t in trajectories]),
            "ids": [t.sample.record["id"] for t in trajectories],
            "stop_token_ids": self.formatter.stop_token_ids,
        }
        one_each = GenerationSettings(**{**asdict(self.generation), "num_samples": 1})
        for trajectory, (response,) in zip(trajectories, self.policy.generate(batch, one_each)):
            trajectory.conversation.append({"role": "assistant", "content": response})

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[Trajectory]:
        trajectories = []
        for fields, responses in zip(batch["samples"], self.policy.generate(batch, self.generation)):
            sample = Sample(**fields)
            question = sample.record["conversation"][0]
            for index, response in enumerate(responses):
                conversation = [dict(question), {"role": "assistant", "content": response}]
                trajectories.append(Trajectory(sample, index, conversation))
        pixel_values = dict(zip(batch["ids"], batch["pixel_values"]))
        self._judge(trajectories)
        active = trajectories
        for _ in range(self.refinement_turns):
            active = self._refine(active)
            if not active:
                break
            self._answer(active, pixel_values)
            self._judge(active)
        self.stats["trajectories"] += len(trajectories)
        return trajectories


class NLFShardWriter(BasePredictionWriter):
    """Writes each rank's trajectories to its own shards, with per-turn feedback and provenance."""

    def __init__(self, out_dir: Path, provenance: dict[str, Any], shard_size: int = 500) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.provenance = provenance
        self.shard_size = shard_size
        self.writer: wds.ShardWriter | None = None
        self.written = 0
        self.scores: dict[tuple[int, str], list[float]] = defaultdict(list)
        """(assistant turn, aspect) -> scores as fractions of the scale."""

    def _open(self, trainer: L.Trainer) -> wds.ShardWriter:
        if self.writer is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            run = len(list(self.out_dir.glob(f"rollout-rank{trainer.global_rank}-run*-000000.tar")))
            pattern = str(self.out_dir / f"rollout-rank{trainer.global_rank}-run{run}-%06d.tar")
            self.writer = wds.ShardWriter(pattern, maxcount=self.shard_size, verbose=0, encoder=False,
                                          mtime=SHARD_MTIME)
        return self.writer

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
            "id": f"{source['id']}-r{trajectory.index}",
            "source": ROLLOUT_SOURCE,
            "conversation": trajectory.conversation,
            "feedback": trajectory.feedback,
            "provenance": {**self.provenance, "prompt_id": source["id"], "prompt_source": source["source"],
                           "sample_index": trajectory.index, "judge_failures": trajectory.failures},
        }
        validate_sample(record)
        return Sample(record=record, image=trajectory.sample.image, image_ext=trajectory.sample.image_ext)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        writer = self._open(trainer)
        for trajectory in prediction:
            writer.write(encode_sample(self.to_sample(trajectory)))
            self.written += 1
            for turn, feedback in enumerate(trajectory.feedback):
                for aspect, score in (feedback or {}).get("scores", {}).items():
                    self.scores[(turn, aspect)].append(score / feedback["score_max"])

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def completed_prompt_ids(out_dir: Path) -> set[str]:
    """Prompt ids whose trajectories an earlier (possibly interrupted) run already wrote."""
    from dress_lightning.data.shards import SkipLog, iter_samples

    shards = sorted(str(p) for p in Path(out_dir).glob("rollout-rank*-run*-*.tar"))
    if not shards:
        return set()
    # A shard cut off by an interruption is read up to the damage; its last prompt may be partial
    # and is then generated again.
    return {s.record["provenance"]["prompt_id"] for s in iter_samples(shards, SkipLog())}


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


def summarize(writer: NLFShardWriter, module: RolloutModule, judge: Judge) -> dict[str, Any]:
    """Samples, judge calls, cache hits, failures and mean score per aspect and turn."""
    turns = sorted({t for t, _ in writer.scores})
    mean = {
        f"turn{turn}": {aspect: sum(v) / len(v) for (t, aspect), v in sorted(writer.scores.items()) if t == turn}
        for turn in turns
    }
    # Later turns exist only for trajectories that still needed refining: compare means with that in mind.
    judged = {f"turn{turn}": max(len(v) for (t, _), v in writer.scores.items() if t == turn) for turn in turns}
    return {
        "samples": writer.written,
        "trajectories": module.stats["trajectories"],
        "judged_responses_per_turn": judged,
        "judge": {"name": judge.name, "version": judge.version, **judge.stats()},
        "judge_failures": module.stats["judge failures"],
        "mean_score_fraction": mean,
        "shards_dir": str(writer.out_dir),
    }


def write_summary(summary: dict[str, Any], out_dir: Path, rank: int = 0, world_size: int = 1) -> Path:
    """Write ``summary.json`` next to the shards (``summary-rank{R}.json`` per rank when several wrote)."""
    path = Path(out_dir) / ("summary.json" if world_size == 1 else f"summary-rank{rank}.json")
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
