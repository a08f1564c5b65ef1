"""Shared fixtures: the tiny preset, built once per session (offline, a few seconds)."""

from __future__ import annotations

import pytest
import torch

from dress_lightning.models import VisionLanguageConfig, build_tokenizer, build_vision_language_model


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
