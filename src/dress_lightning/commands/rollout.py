"""``python -m dress_lightning feedback rollout -c configs/rollout.yaml [--out DIR] [--samples N]``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dress_lightning.atomic import crash_point
from dress_lightning.data.shapeworld import ShapeWorldShards
from dress_lightning.decoding import GenerationSettings
from dress_lightning.commands.jobs import PredictJob, warn_deprecated
from dress_lightning.stages import build_missing_inputs

log = logging.getLogger(__name__)

PROG = "dress-lightning feedback rollout"


@dataclass
class RolloutConfig(PredictJob):
    """A rollout job: policy checkpoint, prompts, decoding, judge, refinement turns, output."""

    checkpoint: str = "runs/sft/checkpoints/last.ckpt"
    """Policy checkpoint (a LightningCLI checkpoint of any task, or a folder written by ``export``); if missing,
    the stage that writes it runs first (``dress_lightning.stages``: ``runs/sft/checkpoints/last.ckpt`` is
    trained by ``fit -c configs/sft.yaml``); any other missing path is an error."""
    train_config_if_missing: str | None = None
    """Deprecated and ignored: a missing checkpoint is built by the stage graph (``dress_lightning.stages``)."""
    prompts: str = "data/shards/shapeworld/rollout"
    """Prompt shards (directory, brace pattern or URL); the first user turn of each sample is the prompt."""
    prompts_shapeworld: ShapeWorldShards | None = field(
        default_factory=lambda: ShapeWorldShards(split="train", samples=300, seed=1, shard_size=50)
    )
    """Generate ShapeWorld prompt shards into ``prompts`` when it holds none."""
    out: str = "data/shards/nlf/shapeworld"
    """Output directory of the NLF shards (one set per rank) and ``summary.json``."""
    samples: int | None = None
    """Prompts to roll out at most (None: all)."""
    generation: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(do_sample=True, temperature=1.0, top_p=0.95, num_samples=2)
    )
    """Decoding of first responses and refinement answers; ``num_samples`` responses per prompt."""
    refinement_turns: int = 2
    """K: critique -> refinement -> new answer rounds per trajectory (stops early at the top score)."""
    shard_size: int = 500
    """Trajectories per output shard."""

    def __post_init__(self) -> None:
        if self.train_config_if_missing is not None:
            warn_deprecated("train_config_if_missing", "it is ignored; the stage graph (dress_lightning.stages) "
                            "builds a missing checkpoint it knows, and refuses one it does not.")


def run_rollout(config: RolloutConfig) -> dict:
    """Run the rollout job ``config`` describes; returns the summary (also written to ``summary.json``)."""
    import lightning as L

    from dress_lightning.feedback.rollout import (
        NLFShardWriter,
        RolloutModule,
        read_progress,
        rollout_provenance,
        run_record,
        summarize,
        write_summary,
    )

    if not Path(config.checkpoint).exists():  # a file, or an exported folder
        build_missing_inputs({"checkpoint": config.checkpoint})
    L.seed_everything(config.seed, workers=True)
    policy = config.load_policy()
    judge = config.resolve_judge()
    out = Path(config.out)
    datamodule = config.prompt_datamodule(config.prompts, config.prompts_shapeworld, policy,
                                          policy.generation_condition())
    progress = read_progress(out, config.generation.num_samples)
    datamodule.exclude_prompt_ids = progress.complete_prompts
    if progress.trajectory_ids:
        log.warning(
            "Resuming in %s: %d prompts are done and skipped; %d have trajectories missing and are generated again "
            "(the ones on disk are kept)%s.", out, len(progress.complete_prompts), len(progress.incomplete_prompts),
            f"; skipped while reading: {progress.skips}" if progress.skips else "",
        )

    module = RolloutModule(policy, judge, datamodule.encoder.formatter, config.generation, config.refinement_turns)
    provenance = rollout_provenance(config.checkpoint, config.generation, judge, config.seed, config.refinement_turns)
    writer = NLFShardWriter(out, provenance, shard_size=config.shard_size, done_ids=frozenset(progress.trajectory_ids))
    # `samples` counts prompts over the whole job, so a resumed run only rolls out what is missing.
    remaining = None if config.samples is None else config.samples - len(progress.complete_prompts)
    trainer = config.predict_trainer([writer], remaining)
    if remaining is None or remaining > 0:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    crash_point("rollout.before_summary")
    this_run = run_record(writer, module, judge, dict(datamodule.skipped))
    summary = summarize(out, trainer.global_rank, trainer.world_size, this_run)
    write_summary(summary, out, trainer.global_rank, trainer.world_size)
    return summary


def load_rollout_config(config_files: Sequence[str], overrides: Sequence[str] = ()) -> RolloutConfig:
    """The rollout job that ``-c`` each of ``config_files`` (composed in order) and ``overrides`` describe."""
    return RolloutConfig.parse(PROG, [*(arg for path in config_files for arg in ("-c", path)), *overrides])


def main(argv: Sequence[str]) -> int:
    """``feedback rollout ...``: the NLF data engine's command."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} -c configs/rollout.yaml [--out DIR] [--samples N]\n"
              f"       {PROG} --help   (every option)")
        return 0
    if argv[0] != "rollout":
        print(f"error: unknown feedback command {argv[0]!r}; valid: rollout", file=sys.stderr)
        return 2
    summary = run_rollout(RolloutConfig.parse(PROG, argv[1:]))
    from dress_lightning.progress import describe_rollout

    print(describe_rollout(summary))
    return 0
