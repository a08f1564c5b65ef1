"""The setup the predict-loop jobs share: ``feedback rollout`` and ``evaluate``.

A job is a dataclass parsed by jsonargparse (``-c`` YAML files compose, ``--key value`` overrides):
``PredictJob`` holds what all of them configure (the policy ``checkpoint``, prompt batches, the
judge, the seed, devices), and its methods build the pieces in one way for all: the policy, the
judge (default: the exact annotation judge), a prepared prompt DataModule, a predict Trainer and
its batch limit.

This module imports no torch, not even for type checking (jsonargparse executes ``TYPE_CHECKING``
blocks of the modules it reads), so that ``--help`` of the commands built on it is fast; the heavy
types are named in the docstrings instead.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser, set_docstring_parse_options

from dress_lightning.data.shapeworld import ShapeWorldShards
from dress_lightning.feedback.judges import Judge

log = logging.getLogger(__name__)

Job = TypeVar("Job", bound="PredictJob")


@dataclass
class TrainerSettings:
    """Where generation runs; the same strategies as training spread it over devices and nodes."""

    accelerator: str = "cpu"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"

    def build_trainer(self, callbacks: list):
        """A predict-only ``lightning.Trainer`` with these settings, ``callbacks`` and a Rich progress bar (no logger)."""
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
class PredictJob:
    """What every predict-loop job configures: a policy checkpoint answers prompt shards, a judge scores it."""

    checkpoint: str = "runs/crl/checkpoints/last.ckpt"
    """Policy checkpoint: a LightningCLI checkpoint of any task, or a folder written by ``export``."""
    batch_size: int = 16
    """Prompts per generation batch on each rank."""
    num_workers: int = 1
    """Prompt loader workers per rank."""
    max_length: int = 512
    """Token budget of a prompt (multi-turn ones included); a trajectory whose next prompt outgrows it ends."""
    judge: Judge | None = None
    """The judge (class_path + init_args); None: the exact annotation judge."""
    seed: int = 0
    """Seed set on every rank (matters when sampling)."""
    trainer: TrainerSettings = field(default_factory=TrainerSettings)

    def load_policy(self):
        """The task (a ``VisionLanguageTask``) in ``checkpoint``, weights loaded, in eval mode."""
        from dress_lightning.inference import load_task

        return load_task(self.checkpoint)

    def resolve_judge(self) -> Judge:
        """The configured judge, or the exact annotation judge."""
        if self.judge is not None:
            return self.judge
        from dress_lightning.feedback.annotation_judge import AnnotationJudge

        return AnnotationJudge()

    def prompt_datamodule(self, shards: str, shapeworld: ShapeWorldShards | None, policy, condition: str | None):
        """A ``ShardDataModule`` of prompt batches for ``policy`` from ``shards`` (generated first if
        ``shapeworld`` says so), each prompt under ``condition``; prepared and set up."""
        from dress_lightning.data.datamodule import ShardDataModule
        from dress_lightning.pretrained import conversation_settings

        datamodule = ShardDataModule(
            predict_shards=shards,
            predict_shapeworld=shapeworld,
            predict_condition=condition,
            model=policy.model_config,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            max_length=self.max_length,
            # A conditioned policy is prompted with its condition where it was trained with it.
            condition_placement=conversation_settings(getattr(policy, "condition", None))["condition_placement"],
        )
        datamodule.prepare_data()
        datamodule.setup()
        return datamodule

    def predict_trainer(self, callbacks: list, prompts: int | None = None):
        """A predict Trainer that stops after ``prompts`` prompts over all ranks (None: all of them)."""
        trainer = self.trainer.build_trainer(callbacks)
        if prompts is not None:
            trainer.limit_predict_batches = max(math.ceil(prompts / (self.batch_size * trainer.world_size)), 0)
        return trainer

    @classmethod
    def parser(cls, prog: str) -> ArgumentParser:
        """The job's argument parser: ``-c`` YAML files (several compose) and one option per field."""
        set_docstring_parse_options(attribute_docstrings=True)  # field docstrings become the options' help
        parser = ArgumentParser(prog=prog, description=cls.__doc__, parser_mode="omegaconf")
        parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config (several compose).")
        parser.add_class_arguments(cls, nested_key=None, fail_untyped=False)
        return parser

    @classmethod
    def parse(cls: type[Job], prog: str, argv: Sequence[str]) -> Job:
        """The job that ``argv`` (``-c`` files and overrides, in order) describes, its judge instantiated."""
        parser = cls.parser(prog)
        config = parser.instantiate_classes(parser.parse_args(list(argv)))
        return cls(**{k: v for k, v in vars(config).items() if k in cls.__dataclass_fields__})


def warn_deprecated(option: str, instead: str) -> None:
    """Tell the user that ``option`` is deprecated and what to do instead."""
    warnings.warn(f"`{option}` is deprecated: {instead}", FutureWarning, stacklevel=3)
