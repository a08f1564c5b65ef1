"""A tiny conditional-RL model with LoRA, trained through the real CLI, and its export (once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dress_lightning.cli import main
from dress_lightning.export import export_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def lora_crl_checkpoint(tmp_path_factory) -> Path:
    """A ``CRLTask`` with LoRA adapters trained for 2 steps (on SFT data: only the task class and adapters matter)."""
    tmp = tmp_path_factory.mktemp("lora-crl")
    main(["fit", "-c", str(ROOT / "configs/sft.yaml"), "-c", str(ROOT / "configs/overlays/ci_tiny.yaml"),
          "--model.class_path", "dress_lightning.tasks.CRLTask", "--model.init_args.lora", "{r: 4, alpha: 8}",
          "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--trainer.default_root_dir", str(tmp), "--trainer.logger", "false",
          "--trainer.callbacks.init_args.dirpath", str(tmp / "checkpoints"),
          "--data.init_args.train_shards", str(tmp / "train"), "--data.init_args.val_shards", str(tmp / "val")])
    return tmp / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def exported(lora_crl_checkpoint, tmp_path_factory) -> Path:
    """``lora_crl_checkpoint`` exported to a self-contained folder."""
    return export_checkpoint(lora_crl_checkpoint, tmp_path_factory.mktemp("export") / "tiny-crl")
