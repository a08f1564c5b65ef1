"""DRESS stage 3: conditional RL on natural-language feedback (docs/design.md s.4)."""

from __future__ import annotations

from typing import Any

from dress_lightning.conditions import ConditionSettings, target_condition
from dress_lightning.data.crl import with_condition_tokens
from dress_lightning.tasks.sft import SFTTask


class CRLTask(SFTTask):
    """SFT's backbone and loss, trained on responses conditioned on the feedback they received.

    The objective lives in the data (``CRLDataModule``: which turns carry loss, under which
    condition); the task records the condition format so that generation, rollouts and evaluation
    condition on the target ``C(f*)`` by default.
    """

    def __init__(self, *args: Any, condition: ConditionSettings | None = None, **kwargs: Any) -> None:
        """
        Args:
            condition: The condition format the model is trained with (link the data module's to it).
            *args, **kwargs: Everything ``SFTTask`` takes.
        """
        super().__init__(*args, **kwargs)
        self.condition = condition or ConditionSettings()
        self.model_config = with_condition_tokens(self.model_config, self.condition)

    def generation_condition(self) -> str | None:
        return target_condition(self.condition)
