"""``fit`` / ``validate`` / ``test`` / ``predict`` through LightningCLI: a YAML picks the task (subclass mode)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from jsonargparse import lazy_instance, set_parsing_settings

from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.progress import StepProgressBar, describe_fit
from dress_lightning.tasks import VisionLanguageTask

TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    # Appended to the YAML's callbacks (so not repeated there); disable the bar with enable_progress_bar: false.
    "callbacks": [lazy_instance(StepProgressBar)],
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
    """LightningCLI with the model config linked into the data module and a clear CPU check."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One model config decides both the backbone and the batches (tokenizer, image transform).
        parser.link_arguments("model.init_args.model", "data.init_args.model", apply_on="parse")

    def before_instantiate_classes(self) -> None:
        if torch.cuda.is_available():
            return
        config = self.config.get(self.subcommand, self.config)
        trainer = config["trainer"]
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


def main(argv: Sequence[str]) -> int:
    """Run a LightningCLI subcommand (``fit -c configs/sft.yaml`` ...)."""
    # omegaconf+ resolves ${...} interpolations once, on the config merged from every -c file and
    # command-line override, so `--trainer.max_steps 600` also reaches the scheduler's total_steps
    # (plain omegaconf resolves each file alone). The configs' paths are written from the subcommand
    # (`${trainer.max_steps}`, not `${fit.trainer.max_steps}`).
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    DressCLI(
        model_class=VisionLanguageTask,
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
