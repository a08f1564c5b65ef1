"""``fit`` / ``validate`` / ``test`` / ``predict`` through LightningCLI: a YAML picks the task (subclass mode)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from jsonargparse import lazy_instance, set_parsing_settings
from lightning.pytorch import LightningModule

from dress_lightning.checkpoints import load_checkpoint
from dress_lightning.data.datamodule import ShardDataModule, SkippedSamplesReport
from dress_lightning.inference import task_class_of
from dress_lightning.progress import StepProgressBar, describe_fit
from dress_lightning.stages import build_missing_inputs

TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    # Appended to the YAML's callbacks (so not repeated there); the progress bar goes with enable_progress_bar: false.
    "callbacks": [lazy_instance(StepProgressBar), lazy_instance(SkippedSamplesReport)],
    "logger": lazy_instance(CSVLogger, save_dir="runs"),
}

# Settings that need a GPU, and what to use instead on a CPU-only machine.
GPU_ONLY = {
    "strategy": {
        "fsdp": "strategy: ModelParallelStrategy (FSDP2, runs on CPU with gloo; see configs/overlays/fsdp_cpu.yaml) or ddp",
        "deepspeed": "strategy: ddp (DeepSpeed needs CUDA)",
    },
    "precision": {
        "16-mixed": "precision: bf16-mixed (fp16 autocast is GPU-only)",
        "16-true": "precision: bf16-true",
    },
}


class DressCLI(LightningCLI):
    """LightningCLI with the model config linked into the data module, safe checkpoint loading and a clear CPU check."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One model config decides both the backbone and the batches (tokenizer, image transform).
        parser.link_arguments("model.init_args.model", "data.init_args.model", apply_on="parse")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        # Before LightningCLI reads --ckpt_path's hyperparameters (and the task class they name).
        self._load_checkpoints_safely(self.config.get(self.config.get("subcommand"), self.config))

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        self._check_cpu_settings(config["trainer"])
        # Missing inputs this config reads are built by their stages now, before any Trainer exists.
        if build_missing_inputs(stage_inputs(config)):
            self._set_seed()  # those stages seeded the global RNGs; this run starts from its own seed

    def instantiate_trainer(self, **kwargs):
        if self._get(self.config_init, "trainer", default={}).get("enable_progress_bar") is False:
            # TRAINER_DEFAULTS appends a progress bar, which Lightning refuses next to enable_progress_bar: false.
            callbacks = [c for c in self.trainer_defaults["callbacks"] if not isinstance(c, ProgressBar)]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": callbacks}
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def _load_checkpoints_safely(config) -> None:
        """Resume (``--ckpt_path``) only from tensors and plain data: ``weights_only=True``, checked up front."""
        if config.get("weights_only") is False:
            raise SystemExit(
                "--weights_only false would let a checkpoint run code while it loads; dress_lightning loads "
                "checkpoints with weights_only=True only. Remove the option."
            )
        if "weights_only" in config:
            config["weights_only"] = True
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():  # not the keywords "last", "hpc", "registry"
            # Read once here so that a refused file stops the run with a clear message, before anything is built.
            task_class_of(load_checkpoint(ckpt_path, role="--ckpt_path"), ckpt_path)

    @staticmethod
    def _check_cpu_settings(trainer) -> None:
        if torch.cuda.is_available():
            return
        problems = []
        accelerator = str(trainer.get("accelerator") or "auto")
        if accelerator in ("gpu", "cuda"):
            problems.append(f"trainer.accelerator={accelerator!r}: use accelerator: cpu (or auto)")
        strategy = trainer.get("strategy")
        strategy_name = strategy if isinstance(strategy, str) else ""
        for key, fix in GPU_ONLY["strategy"].items():
            if strategy_name.startswith(key):
                problems.append(f"trainer.strategy={strategy_name!r}: use {fix}")
        precision = str(trainer.get("precision"))
        if precision in GPU_ONLY["precision"]:
            problems.append(f"trainer.precision={precision!r}: use {GPU_ONLY['precision'][precision]}")
        if problems:
            raise SystemExit(
                "This machine has no GPU, but the config asks for GPU-only settings:\n  - "
                + "\n  - ".join(problems)
                + "\nChange them in the YAML or on the command line (e.g. --trainer.precision bf16-mixed)."
            )

    def before_fit(self) -> None:
        self.fit_started = time.monotonic()

    def after_fit(self) -> None:
        # After trainer.fit returns, so the progress bar has finished drawing above this summary.
        if self.trainer.is_global_zero:
            print(describe_fit(self.trainer, self.model, time.monotonic() - self.fit_started))


def stage_inputs(config) -> dict[str, str | None]:
    """The paths a training config reads that an earlier stage may write (option -> path)."""

    def get(key: str) -> str | None:
        value = config.get(key)
        return value if isinstance(value, str) else None

    return {
        "model.init_args.model.vision_pretrained": get("model.init_args.model.vision_pretrained"),
        "model.init_args.init_checkpoint": get("model.init_args.init_checkpoint"),
        "data.init_args.nlf_shards": get("data.init_args.nlf_shards"),
    }


def fit(config_files: Sequence[str], overrides: Sequence[str] = ()) -> None:
    """Train the task ``config_files`` describe (composed in order, then ``overrides``), as ``fit -c ...`` does."""
    args = ["fit"]
    for path in config_files:
        args += ["-c", path]
    main([*args, *overrides])


def main(argv: Sequence[str]) -> int:
    """Run a LightningCLI subcommand (``fit -c configs/sft.yaml`` ...)."""
    # omegaconf+ resolves ${...} interpolations once, on the config merged from every -c file and
    # command-line override, so `--trainer.max_steps 600` also reaches the scheduler's total_steps
    # (plain omegaconf resolves each file alone). The configs' paths are written from the subcommand
    # (`${trainer.max_steps}`, not `${fit.trainer.max_steps}`).
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    DressCLI(
        # Any task: the vision-language objectives (VisionLanguageTask) and the tower's contrastive stage.
        model_class=LightningModule,
        datamodule_class=ShardDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        # From the console, let LightningCLI read sys.argv itself (it warns when given both).
        args=None if list(argv) == sys.argv[1:] else list(argv),
    )
    return 0
