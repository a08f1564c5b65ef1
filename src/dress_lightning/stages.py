"""The stage graph of the embedded default, and the runner that builds a command's missing inputs first.

    ShapeWorld shards -> clip (vision tower) -> grounding_warmup (projector + LM on where-questions) -> sft
                      -> rollout (NLF shards) -> crl (or another objective) -> evaluate

(``pretrain``, LLaVA's stage 1 that trains the projector alone on captions, is a stage too; SFT starts from it
with a real model, and from the warm-up on ShapeWorld.)

Each stage is a command (``fit``, ``rollout`` or ``evaluate``) over composed configs and overrides
that writes one output, run in this process through the command's library function
(``DEFAULT_STAGES``; ``dress_lightning.experiment`` builds the experiment's graph of the same
stages, one chain per seed). A command's
inputs are the paths its config reads: ``vision_pretrained``, ``init_checkpoint``, ``nlf_shards``,
a rollout's ``checkpoint``. Before a command builds its Trainer, ``build_missing_inputs`` looks up
the stage that writes each missing input and runs it to completion first, as a separate, logged
stage (whose own missing inputs are built the same way, before it). An input that no stage writes
is an error naming the option, and nothing that exists is rebuilt or overwritten. So
``fit -c configs/crl.yaml`` on a fresh clone builds the whole chain, and a config that points
elsewhere (the reproduction's ``runs/repro/...``) builds nothing it did not ask for.

ShapeWorld shards are not stages here: a DataModule generates them into an empty shard directory
(``*_shapeworld`` options), since they are data, not a model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One node of the graph: ``command -c configs[0] -c configs[1] ... overrides`` writes ``output``."""

    name: str
    command: Literal["fit", "rollout", "evaluate"]
    configs: tuple[str, ...]
    output: str
    overrides: tuple[str, ...] = ()

    def run(self) -> None:
        """Run the stage in this process (the missing inputs of a ``fit`` are built first)."""
        if self.command == "fit":
            from dress_lightning.lightning_cli import fit

            fit(self.configs, self.overrides)
        elif self.command == "rollout":
            from dress_lightning.commands.rollout import load_rollout_config, run_rollout

            run_rollout(load_rollout_config(self.configs, self.overrides))
        else:
            from dress_lightning.commands.evaluate import PROG, EvalConfig, run_evaluation

            run_evaluation(EvalConfig.parse(PROG, self.arguments()))

    def arguments(self) -> list[str]:
        """``-c`` each config, then the overrides."""
        return [*(arg for config in self.configs for arg in ("-c", config)), *self.overrides]

    def describe(self) -> str:
        """The command line that does the same, e.g. ``python -m dress_lightning fit -c configs/sft.yaml``."""
        command = "feedback rollout" if self.command == "rollout" else self.command
        return " ".join(["python -m dress_lightning", command, *self.arguments()])


GROUNDING_WARMUP = Stage("grounding_warmup", "fit", ("configs/sft.yaml", "configs/overlays/grounding_warmup.yaml"),
                         "runs/grounding_warmup/checkpoints/last.ckpt")
"""The stage SFT starts from (configs/sft.yaml's ``init_checkpoint``); the experiment's seeds share one."""

DEFAULT_STAGES: tuple[Stage, ...] = (
    Stage("clip", "fit", ("configs/clip.yaml",), "runs/clip/tower.safetensors"),
    Stage("pretrain", "fit", ("configs/pretrain.yaml",), "runs/pretrain/checkpoints/last.ckpt"),
    GROUNDING_WARMUP,
    Stage("sft", "fit", ("configs/sft.yaml",), "runs/sft/checkpoints/last.ckpt"),
    Stage("rollout", "rollout", ("configs/rollout.yaml",), "data/shards/nlf/shapeworld"),
)
"""The embedded default's stages, in order; paths are relative to the working directory (the repository)."""


def is_local_path(value: str) -> bool:
    """Whether an input names a local file or directory (not a pretrained tag, URL or brace pattern)."""
    return ("/" in value or Path(value).suffix != "") and ":" not in value and "{" not in value


def exists(path: str | Path) -> bool:
    """A file, or a directory of shards with at least one readable sample (an empty or damaged ``.tar`` is not data)."""
    from dress_lightning.data.shards import holds_samples

    path = Path(path)
    return holds_samples(path) if path.is_dir() else path.is_file()


def producer(path: str, stages: Iterable[Stage] = DEFAULT_STAGES) -> Stage | None:
    """The stage that writes ``path``, if any."""
    wanted = Path(path).resolve()
    return next((stage for stage in stages if Path(stage.output).resolve() == wanted), None)


def build_missing_inputs(inputs: Mapping[str, str | None], stages: Iterable[Stage] = DEFAULT_STAGES) -> list[str]:
    """Run the stages that write the missing ones of ``inputs`` (option -> path); returns their names.

    Raises ``FileNotFoundError`` for a missing input that no stage writes, naming the option.
    """
    stages = tuple(stages)
    ran = []
    for option, path in inputs.items():
        if path is None or not is_local_path(path) or exists(path):
            continue
        stage = producer(path, stages)
        if stage is None:
            known = ", ".join(f"{s.name} -> {s.output}" for s in stages)
            raise FileNotFoundError(
                f"{option}={path!r} does not exist, and no stage of the default graph writes it ({known}). "
                "Fix the path, or produce it first."
            )
        log.warning("Stage %s: %s=%s is missing; running `%s` first.", stage.name, option, path, stage.describe())
        run_stage(stage)
        ran.append(stage.name)
    return ran


def run_stage(stage: Stage) -> float:
    """Run ``stage``, check that it wrote its output, log it; returns its wall time in seconds."""
    start = time.perf_counter()
    stage.run()
    if not exists(stage.output):
        raise RuntimeError(f"stage {stage.name} (`{stage.describe()}`) did not write {stage.output}")
    seconds = time.perf_counter() - start
    log.warning("Stage %s done in %.0f s: %s.", stage.name, seconds, stage.output)
    return seconds
