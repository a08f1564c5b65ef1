"""Loading trained tasks for generation (rollouts, evaluation, notebooks)."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import torch

from dress_lightning.tasks.base import VisionLanguageTask


def load_task(checkpoint: str, map_location: str = "cpu") -> VisionLanguageTask:
    """Rebuild the task a LightningCLI checkpoint came from (its class, config and trained weights), in eval mode.

    Checkpoints hold only what trained; the rest is rebuilt from the saved config (and the
    task's ``init_checkpoint``, which must still exist), so missing frozen keys are expected. A folder
    written by ``dress-lightning export`` is loaded from its safetensors instead.
    """
    if Path(checkpoint).is_dir():
        from dress_lightning.export import load_exported_task

        return load_exported_task(checkpoint).to(map_location)
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    module_name, _, class_name = hparams.get("_class_path", "dress_lightning.tasks.VisionLanguageTask").rpartition(".")
    task_class = getattr(importlib.import_module(module_name), class_name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
        task = task_class.load_from_checkpoint(checkpoint, map_location=map_location)
    return task.eval()
