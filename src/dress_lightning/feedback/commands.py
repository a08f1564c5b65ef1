"""``python -m dress_lightning feedback rollout -c configs/rollout.yaml [--out DIR] [--samples N]``."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from dress_lightning.data.datamodule import ShapeWorldShards
from dress_lightning.feedback.judges import Judge
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
    """Policy checkpoint (a LightningCLI checkpoint of any task, or a folder written by ``export``)."""
    train_config_if_missing: str | None = "configs/sft.yaml"
    """If ``checkpoint`` does not exist, train it first with ``fit -c`` this config (None: fail instead)."""
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
        completed_prompt_ids,
        rollout_provenance,
        summarize,
        write_summary,
    )
    from dress_lightning.inference import load_task

    checkpoint = Path(config.checkpoint)
    if not checkpoint.exists():
        if config.train_config_if_missing is None:
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist.")
        from dress_lightning.lightning_cli import main as lightning_main

        log.warning("No checkpoint at %s: training it first with fit -c %s.", checkpoint,
                    config.train_config_if_missing)
        lightning_main(["fit", "-c", config.train_config_if_missing])
        if not checkpoint.is_file():
            raise FileNotFoundError(f"fit -c {config.train_config_if_missing} did not write {checkpoint}.")

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
    datamodule.exclude_prompt_ids = completed_prompt_ids(out)
    if datamodule.exclude_prompt_ids:
        log.warning("Resuming: %d prompts in %s are done and skipped.", len(datamodule.exclude_prompt_ids), out)

    module = RolloutModule(policy, judge, datamodule.encoder.formatter, config.generation, config.refinement_turns)
    provenance = rollout_provenance(str(checkpoint), config.generation, judge, config.seed, config.refinement_turns)
    writer = NLFShardWriter(out, provenance, shard_size=config.shard_size)
    trainer = config.trainer.build_trainer([writer])
    # `samples` counts prompts over the whole job, so a resumed run only rolls out what is missing.
    remaining = None if config.samples is None else config.samples - len(datamodule.exclude_prompt_ids)
    if remaining is not None:
        trainer.limit_predict_batches = max(math.ceil(remaining / (config.batch_size * trainer.world_size)), 0)
    if remaining is None or remaining > 0:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    summary = summarize(writer, module, judge)
    summary["skipped_prompts"] = dict(datamodule.skipped)
    write_summary(summary, out, trainer.global_rank, trainer.world_size)
    return summary


def main(argv: Sequence[str]) -> int:
    """``feedback rollout ...``: the NLF data engine's command."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dress-lightning feedback rollout -c configs/rollout.yaml [--out DIR] [--samples N]")
        return 0
    if argv[0] != "rollout":
        print(f"error: unknown feedback command {argv[0]!r}; valid: rollout")
        return 2
    parser = build_parser()
    namespace = parser.parse_args(list(argv[1:]))
    config = parser.instantiate_classes(namespace)
    config = RolloutConfig(**{k: v for k, v in vars(config).items() if k in RolloutConfig.__dataclass_fields__})
    summary = run_rollout(config)
    from dress_lightning.progress import describe_rollout

    print(describe_rollout(summary))
    return 0
