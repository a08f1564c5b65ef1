"""Exported models: one self-contained folder, loaded without Lightning and without unpickling.

``dress-lightning export`` (``export.py``) writes::

    DIR/
      config.json                    what to build: model, task, condition, conversation and decoding settings
      vision_projector.safetensors   the open_clip image tower and the projector
      open_clip/<vision_model>.json  the tower's open_clip architecture (registered on load: no lookup by name)
      language_model/                a standard Hugging Face causal-LM folder (LoRA merged) with the tokenizer
      README.md                      the model card

``from_pretrained(DIR)`` reads only JSON and safetensors, so loading an export runs no pickled code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dress_lightning.conditions import ConditionSettings, target_condition
from dress_lightning.conversation import ConversationFormatter

if TYPE_CHECKING:  # the models import torch; this module's formats and paths must not (`export --help`)
    from dress_lightning.models import VisionLanguageConfig, VisionLanguageModel

EXPORT_FORMAT = "dress-export-v1"
"""Version of the folder layout above; bump it when files or config keys change."""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "vision_projector.safetensors"
LANGUAGE_MODEL_DIR = "language_model"
OPEN_CLIP_DIR = "open_clip"
MODEL_CARD_FILE = "README.md"

CONVERSATION_DEFAULTS = {"template": "vicuna_v1", "system_prompt": None, "condition_placement": "assistant_prefix",
                         "max_length": 512}
"""The prompt format of an export. Checkpoints do not record the data module's template, so these are the
settings ``evaluate`` and ``feedback rollout`` prompt every checkpoint with (``ShardDataModule``'s defaults),
except where the condition goes, which a conditioned model's checkpoint records (``conversation_settings``)."""


def conversation_settings(condition: ConditionSettings | None) -> dict[str, Any]:
    """The prompt format of a model trained under ``condition`` (None: unconditioned)."""
    settings = dict(CONVERSATION_DEFAULTS)
    if condition is not None:
        settings["condition_placement"] = condition.placement
    return settings



class NotAnExportError(ValueError):
    """A path given as an exported model folder is not one."""


@dataclass
class PretrainedVisionLanguageModel:
    """An exported model ready to answer: the model, its tokenizer, its prompt format and its condition."""

    model: VisionLanguageModel
    formatter: ConversationFormatter
    condition: ConditionSettings | None
    """The condition format a conditional-RL model was trained with; None for unconditioned models."""
    config: dict[str, Any]
    """The export's ``config.json``."""

    @property
    def tokenizer(self):
        return self.formatter.tokenizer

    @property
    def image_transform(self) -> Callable:
        """open_clip's preprocessing of the tower (PIL image -> (3, H, W) tensor)."""
        return self.model.vision.image_transform

    def generation_condition(self) -> str | None:
        """The condition answers get by default (conditional RL: the target ``C(f*)``; otherwise none)."""
        return None if self.condition is None else target_condition(self.condition)


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``dress-lightning export``."""
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def read_export_config(path: str | Path) -> dict[str, Any]:
    """The export's ``config.json``; raises ``NotAnExportError`` saying what is missing."""
    path = Path(path)
    if not is_export(path):
        raise NotAnExportError(
            f"{path} is not an exported model folder (it needs {CONFIG_FILE} and {WEIGHTS_FILE}); write one with "
            f"`python -m dress_lightning export --checkpoint CKPT --out {path}`."
        )
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise NotAnExportError(
            f"{path / CONFIG_FILE} has format {config.get('format')!r}; this version reads {EXPORT_FORMAT!r}: "
            "export the checkpoint again with this version."
        )
    return config


def exported_model_config(path: str | Path, config: dict[str, Any] | None = None) -> VisionLanguageConfig:
    """The ``VisionLanguageConfig`` that rebuilds an export: its LM is the folder's, its tower is registered."""
    import open_clip

    from dress_lightning.models import VisionLanguageConfig

    path = Path(path).resolve()
    config = config or read_export_config(path)
    open_clip.add_model_config(path / OPEN_CLIP_DIR)
    return VisionLanguageConfig(
        **{**config["model"], "language_model": str(path / LANGUAGE_MODEL_DIR), "tokenizer": None,
           "vision_pretrained": None}  # the tower's weights come from WEIGHTS_FILE
    )


def load_exported_model(path: str | Path, config: dict[str, Any] | None = None) -> tuple[VisionLanguageModel, Any]:
    """Build the model of an export and load its weights (safetensors only); returns it (eval mode) and its tokenizer."""
    from safetensors.torch import load_file

    from dress_lightning.models import build_tokenizer, build_vision_language_model

    path = Path(path)
    model_config = exported_model_config(path, config)
    tokenizer = build_tokenizer(model_config)
    model = build_vision_language_model(model_config, tokenizer)
    weights = load_file(path / WEIGHTS_FILE)
    for name in ("vision", "projector"):
        prefix = f"{name}."
        getattr(model, name).load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    return model.eval(), tokenizer


def from_pretrained(path: str | Path) -> PretrainedVisionLanguageModel:
    """Load a folder written by ``dress-lightning export`` (no Lightning, no pickle), ready for generation."""
    config = read_export_config(path)
    model, tokenizer = load_exported_model(path, config)
    condition = config.get("condition")
    return PretrainedVisionLanguageModel(
        model=model,
        formatter=ConversationFormatter(tokenizer, model.num_image_tokens, **config["conversation"]),
        condition=None if condition is None else ConditionSettings(**condition),
        config=config,
    )
