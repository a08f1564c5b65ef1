"""``python -m dress_lightning feedback rollout -c configs/rollout.yaml [--out DIR] [--samples N]``."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from dress_lightning.atomic import crash_point
from dress_lightning.data.datamodule import ShapeWorldShards
from dress_lightning.feedback.judges import Judge
from dress_lightning.stages import build_missing_inputs
from dress_lightning.tasks.base import GenerationSettings

log = logging.getLogger(__name__)


@dataclass
class TrainerSettings:
    """Where generation runs; the same strategies as training spread it over devices and nodes."""

    accelerator: str = "cpu"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"

    def build_trainer(self, callbacks: list):
        """A predict-only Trainer with these settings, ``callbacks`` and a Rich progress bar (no logger)."""
        import lightning as L

        return L.Trainer(
            accelerator=self.accelerator,
            devices=self.devices,
            num_nodes=self.num_nodes,
            strategy=self.strategy,
            precision=self.precision,
            callbacks=[*callbacks, L.pytorch.callbacks.RichProgressBar()],
            logger=False,
        )


@dataclass
class RolloutConfig:
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
    batch_size: int = 16
    """Prompts per generation batch on each rank."""
    num_workers: int = 1
    """Prompt loader workers per rank."""
    generation: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(do_sample=True, temperature=1.0, top_p=0.95, num_samples=2)
    )
    """Decoding of first responses and refinement answers; ``num_samples`` responses per prompt."""
    refinement_turns: int = 2
    """K: critique -> refinement -> new answer rounds per trajectory (stops early at the top score)."""
    judge: Judge | None = None
    """The judge (class_path + init_args); None: the exact annotation judge."""
    seed: int = 0
    """Seed of sampling (set on every rank)."""
    shard_size: int = 500
    """Trajectories per output shard."""
    trainer: TrainerSettings = field(default_factory=TrainerSettings)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="dress-lightning feedback rollout", description=RolloutConfig.__doc__,
                            parser_mode="omegaconf")
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config (several compose).")
    parser.add_class_arguments(RolloutConfig, nested_key=None, fail_untyped=False)
    return parser


def run_rollout(config: RolloutConfig) -> dict:
    """Run the rollout job ``config`` describes; returns the summary (also written to ``summary.json``)."""
    import lightning as L

    from dress_lightning.data.datamodule import ShardDataModule
    from dress_lightning.feedback.annotation_judge import AnnotationJudge
    from dress_lightning.feedback.rollout import (
        NLFShardWriter,
        RolloutModule,
        read_progress,
        rollout_provenance,
        run_record,
        summarize,
        write_summary,
    )
    from dress_lightning.inference import load_task

    checkpoint = Path(config.checkpoint)
    if config.train_config_if_missing is not None:
        log.warning("train_config_if_missing is deprecated and ignored: the stage graph (dress_lightning.stages) "
                    "builds a missing checkpoint it knows, and refuses one it does not.")
    if not checkpoint.exists():  # a file, or an exported folder
        build_missing_inputs({"checkpoint": config.checkpoint})

    L.seed_everything(config.seed, workers=True)
    policy = load_task(str(checkpoint))
    judge = config.judge or AnnotationJudge()
    out = Path(config.out)
    datamodule = ShardDataModule(
        predict_shards=config.prompts,
        predict_shapeworld=config.prompts_shapeworld,
        predict_condition=policy.generation_condition(),
        model=policy.model_config,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
    )
    datamodule.prepare_data()
    datamodule.setup()
    progress = read_progress(out, config.generation.num_samples)
    datamodule.exclude_prompt_ids = progress.complete_prompts
    if progress.trajectory_ids:
        log.warning(
            "Resuming in %s: %d prompts are done and skipped; %d have trajectories missing and are generated again "
            "(the ones on disk are kept)%s.", out, len(progress.complete_prompts), len(progress.incomplete_prompts),
            f"; skipped while reading: {progress.skips}" if progress.skips else "",
        )

    module = RolloutModule(policy, judge, datamodule.encoder.formatter, config.generation, config.refinement_turns)
    provenance = rollout_provenance(str(checkpoint), config.generation, judge, config.seed, config.refinement_turns)
    writer = NLFShardWriter(out, provenance, shard_size=config.shard_size, done_ids=frozenset(progress.trajectory_ids))
    trainer = config.trainer.build_trainer([writer])
    # `samples` counts prompts over the whole job, so a resumed run only rolls out what is missing.
    remaining = None if config.samples is None else config.samples - len(progress.complete_prompts)
    if remaining is not None:
        trainer.limit_predict_batches = max(math.ceil(remaining / (config.batch_size * trainer.world_size)), 0)
    if remaining is None or remaining > 0:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    crash_point("rollout.before_summary")
    this_run = run_record(writer, module, judge, dict(datamodule.skipped))
    summary = summarize(out, trainer.global_rank, trainer.world_size, this_run)
    write_summary(summary, out, trainer.global_rank, trainer.world_size)
    return summary


def load_rollout_config(config_files: Sequence[str], overrides: Sequence[str] = ()) -> RolloutConfig:
    """The rollout job that ``-c`` each of ``config_files`` (composed in order) and ``overrides`` describe."""
    parser = build_parser()
    args = [arg for path in config_files for arg in ("-c", path)]
    config = parser.instantiate_classes(parser.parse_args([*args, *overrides]))
    return RolloutConfig(**{k: v for k, v in vars(config).items() if k in RolloutConfig.__dataclass_fields__})


def main(argv: Sequence[str]) -> int:
    """``feedback rollout ...``: the NLF data engine's command."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dress-lightning feedback rollout -c configs/rollout.yaml [--out DIR] [--samples N]")
        return 0
    if argv[0] != "rollout":
        print(f"error: unknown feedback command {argv[0]!r}; valid: rollout")
        return 2
    summary = run_rollout(load_rollout_config([], argv[1:]))
    from dress_lightning.progress import describe_rollout

    print(describe_rollout(summary))
    return 0
