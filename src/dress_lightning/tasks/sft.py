"""DRESS stages 1 and 2: projector pretraining on captions and supervised instruction tuning."""

from __future__ import annotations

from dataclasses import replace

from dress_lightning.models import VisionLanguageConfig
from dress_lightning.tasks.base import VisionLanguageTask


class PretrainTask(VisionLanguageTask):
    """Stage 1: only the projector trains (vision tower and LM frozen), on caption data."""

    def configure_trainable(self, config: VisionLanguageConfig) -> VisionLanguageConfig:
        if self.lora is not None:
            raise ValueError("PretrainTask trains the projector only: remove model.init_args.lora.")
        return replace(config, freeze_vision=True, freeze_projector=False, freeze_language_model=True)


class SFTTask(VisionLanguageTask):
    """Stage 2: instruction tuning of the projector and the LM (fully, or LoRA adapters with ``lora``).

    With ``lora`` set, the LM's own weights are frozen whatever ``freeze_language_model`` says.
    """

    def configure_trainable(self, config: VisionLanguageConfig) -> VisionLanguageConfig:
        if self.lora is not None:
            return replace(config, freeze_language_model=True)
        return config
