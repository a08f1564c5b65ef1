"""A tiny conditional-RL model with LoRA, trained through the real CLI, and its export (once per session)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from dress_lightning.export import export_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TrainingRun:
    """A ``fit`` run as a user starts it: its directory, checkpoint and everything it printed."""

    root: Path
    checkpoint: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def lora_crl_run(tmp_path_factory) -> TrainingRun:
    """``fit`` of a ``CRLTask`` with LoRA for 2 steps, in a subprocess (its output is read as a newcomer reads it).

    It trains on SFT data: what matters here is the task class (its condition) and the adapters to merge. The
    tower is the random ViT: its features are large enough that this 2-step model's greedy answers differ and are
    not empty, which the export's equality test needs (a random ResNet's are near zero, since open_clip starts its
    residual branches at zero, and the model answers every image with an immediate end of turn).
    """
    tmp = tmp_path_factory.mktemp("lora-crl")
    command = [sys.executable, "-m", "dress_lightning", "fit", "-c", str(ROOT / "configs/sft.yaml"),
               "-c", str(ROOT / "configs/overlays/ci_tiny.yaml"),
               "--model.class_path", "dress_lightning.tasks.CRLTask", "--model.init_args.lora", "{r: 4, alpha: 8}",
               "--model.init_args.model.vision_model", "dress-tiny-vit", "--model.init_args.model.vision_layer", "-2",
               "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
               "--trainer.default_root_dir", str(tmp), "--trainer.logger.init_args.save_dir", str(tmp),
               "--trainer.callbacks.init_args.dirpath", str(tmp / "checkpoints"),
               "--data.init_args.train_shards", str(tmp / "train"), "--data.init_args.val_shards", str(tmp / "val")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "160"})
    assert result.returncode == 0, result.stderr
    return TrainingRun(tmp, tmp / "checkpoints" / "last.ckpt", result.stdout, result.stderr)


@pytest.fixture(scope="session")
def lora_crl_checkpoint(lora_crl_run) -> Path:
    """The checkpoint of ``lora_crl_run``."""
    return lora_crl_run.checkpoint


@pytest.fixture(scope="session")
def exported(lora_crl_checkpoint, tmp_path_factory) -> Path:
    """``lora_crl_checkpoint`` exported to a self-contained folder."""
    return export_checkpoint(lora_crl_checkpoint, tmp_path_factory.mktemp("export") / "tiny-crl")
