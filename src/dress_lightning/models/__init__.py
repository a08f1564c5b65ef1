"""Vision-language model: pure PyTorch + open_clip + transformers (no Lightning here)."""

from dress_lightning.models.factory import (
    ParameterReport,
    VisionLanguageConfig,
    build_tokenizer,
    build_vision_language_model,
    count_parameters,
)
from dress_lightning.models.feature_cache import StaleFeatureCacheError, VisionFeatureCache
from dress_lightning.models.projector import PROJECTORS, build_projector
from dress_lightning.models.vision import VisionSpec, VisionTower, build_vision_tower, describe_vision_tower
from dress_lightning.models.vlm import ImageTokenMismatchError, VisionLanguageModel

__all__ = [
    "PROJECTORS",
    "ImageTokenMismatchError",
    "ParameterReport",
    "StaleFeatureCacheError",
    "VisionFeatureCache",
    "VisionLanguageConfig",
    "VisionLanguageModel",
    "VisionSpec",
    "VisionTower",
    "build_projector",
    "build_tokenizer",
    "build_vision_language_model",
    "build_vision_tower",
    "count_parameters",
    "describe_vision_tower",
]
