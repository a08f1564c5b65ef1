"""LightningModules: one per training objective, sharing the backbone and the base task."""

from dress_lightning.decoding import GenerationSettings
from dress_lightning.tasks.base import LoraSettings, VisionLanguageTask
from dress_lightning.tasks.clip import ContrastiveTowerTask
from dress_lightning.tasks.crl import CRLTask
from dress_lightning.tasks.dpo import DPOTask
from dress_lightning.tasks.rft import RFTTask
from dress_lightning.tasks.sft import PretrainTask, SFTTask

__all__ = [
    "CRLTask",
    "ContrastiveTowerTask",
    "DPOTask",
    "GenerationSettings",
    "LoraSettings",
    "PretrainTask",
    "RFTTask",
    "SFTTask",
    "VisionLanguageTask",
]
