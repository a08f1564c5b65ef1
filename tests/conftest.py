"""Shared fixtures: the tiny preset, built once per session (offline, a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dress_lightning.cli import main
from dress_lightning.models import VisionLanguageConfig, build_tokenizer, build_vision_language_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_config() -> VisionLanguageConfig:
    return VisionLanguageConfig()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_config):
    return build_tokenizer(tiny_config)


@pytest.fixture
def tiny_model(tiny_config, tiny_tokenizer):
    """A fresh tiny VLM per test (tests mutate weights); the build is cheap."""
    torch.manual_seed(0)
    return build_vision_language_model(tiny_config, tiny_tokenizer)


@pytest.fixture(scope="session")
def policy_checkpoint(tmp_path_factory):
    """A policy trained for a few steps through the real CLI (its answers are poor: refinements happen)."""
    tmp = tmp_path_factory.mktemp("policy")
    main(["fit", "-c", str(ROOT / "configs/sft.yaml"), "-c", str(ROOT / "configs/overlays/ci_tiny.yaml"),
          "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--trainer.default_root_dir", str(tmp), "--trainer.logger", "false",
          "--trainer.callbacks.init_args.dirpath", str(tmp / "checkpoints"),
          "--data.init_args.train_shards", str(tmp / "train"), "--data.init_args.val_shards", str(tmp / "val")])
    return tmp / "checkpoints" / "last.ckpt"
